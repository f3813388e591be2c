"""Engines, sessions and schema upgrades; one code path for SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"

# Seconds a SQLite writer waits for another writer's lock before "database is locked".
SQLITE_BUSY_TIMEOUT_S = 30
# Execution option: on SQLite, begin the connection's transactions with BEGIN IMMEDIATE.
SQLITE_BEGIN_IMMEDIATE = "sqlite_begin_immediate"


def _json_default(value):
    # Pipeline attributes often hold numpy scalars, which json cannot encode on its own.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_dumps(value) -> str:
    return json.dumps(value, default=_json_default)


def make_engine(url: str | sa.URL) -> sa.Engine:
    """Engine for ``url`` with the connection settings each backend needs to be safe to share."""
    url = sa.make_url(url)
    if url.get_backend_name() != "sqlite":
        # pre_ping: a pooled connection to a restarted server is replaced, not handed out dead.
        # pool: the API serves up to 40 requests at once from its thread pool; with the default
        # 5 + 10 connections the rest opened and closed a connection per request.
        return sa.create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=20, json_serializer=_json_dumps)

    database = url.database or ""
    if database and database != ":memory:":
        path = Path(database)
        # A relative path is ours to lay out; a missing directory on an absolute path is a
        # misconfigured mount the operator should hear about.
        if not path.is_absolute():
            path.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url,
        json_serializer=_json_dumps,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # The sqlite3 module's own transaction handling skips BEGIN before SELECT and SAVEPOINT,
        # which breaks savepoints; SQLAlchemy emits BEGIN instead (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # SQLite ignores ON DELETE CASCADE unless this is set on each connection.
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL: readers (API) do not block the writer (indexer) and vice versa.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection):
        # A deferred BEGIN that reads and then writes fails at once ("database is locked") when
        # another writer got in between; transactions that must not, ask for the write lock first.
        immediate = connection.get_execution_options().get(SQLITE_BEGIN_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def session_factory(engine: sa.Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after the caller commits at the edge."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def migrate(url_or_engine: str | sa.URL | sa.Engine) -> None:
    """``alembic upgrade head``, run on start so nobody has to run alembic by hand."""
    engine = url_or_engine if isinstance(url_or_engine, sa.Engine) else make_engine(url_or_engine)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.connect() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        if engine is not url_or_engine:
            engine.dispose()
