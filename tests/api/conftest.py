"""The API as a client meets it: a real uvicorn server over HTTP on a migrated database (SQLite,
and the project's real PostgreSQL), seeded with a synthetic library, and bearer tokens."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from apiserver import LiveApi, start_api, stop_api
from testdb import scratch_pg_database
from services import tokens
from services.store.db import make_engine, migrate, session_factory

from apilibrary import Library, seed_library


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.cloud)]


@pytest.fixture(params=BACKENDS)
def api_db(request, tmp_path) -> Iterator[str]:
    """URL of a freshly migrated database of its own (SQLite file, or a scratch PostgreSQL database)."""
    if request.param == "sqlite":
        path = tmp_path / "api.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    with scratch_pg_database(request.getfixturevalue("pg_url")) as url:
        engine = make_engine(url)
        migrate(engine)
        engine.dispose()
        yield url


@dataclass
class Seeded:
    api: LiveApi
    ann: Library
    bob: Library
    ann_token: str
    bob_token: str


def seed_two_users(db_url: str, root: Path) -> tuple[Library, Library, str, str]:
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as session:
            ann = seed_library(session, "ann", root, persons=4, faces_per_person=3, seed=1)
            bob = seed_library(session, "bob", root, persons=3, faces_per_person=2, seed=2)
            _, ann_token = tokens.create(session, "ann")
            _, bob_token = tokens.create(session, "bob")
            session.commit()
    finally:
        engine.dispose()
    return ann, bob, ann_token, bob_token


@pytest.fixture
def seeded(api_db, tmp_path) -> Iterator[Seeded]:
    """Two users (ann: 4 persons x 3 faces, bob: 3 x 2) with tokens, served by a live API."""
    ann, bob, ann_token, bob_token = seed_two_users(api_db, tmp_path / "photos")
    proc, api = start_api(api_db, tmp_path)
    try:
        yield Seeded(api, ann, bob, ann_token, bob_token)
    finally:
        stop_api(proc)
