"""Scratch PostgreSQL databases and checks of a library's rows for tests (a plain module, so any
test folder can import it)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from services.store.models import FacePerson, Person


@contextmanager
def scratch_pg_database(pg_url: str) -> Iterator[str]:
    """URL of a new empty database on pg_url's server, dropped on exit."""
    name = f"facecluster_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def assert_counts_true(session, user_id: int) -> None:
    """Every person's face_count is its real number of links, and its cover is one of its faces."""
    session.expire_all()
    for person in session.scalars(sa.select(Person).where(Person.user_id == user_id)):
        real = session.scalar(sa.select(sa.func.count()).where(FacePerson.person_id == person.id))
        assert person.face_count == real, f"person {person.id}: face_count {person.face_count}, links {real}"
        if real:
            assert session.get(FacePerson, person.cover_face_id).person_id == person.id
