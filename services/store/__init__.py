"""Relational storage: schema, engines and every SQL statement of the services."""

from services.store.db import make_engine, migrate, session_factory
from services.store.repository import NotFound

__all__ = ["NotFound", "make_engine", "migrate", "session_factory"]
