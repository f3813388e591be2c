"""Fixtures shared by all test directories: databases for the storage layer.

Store tests take ``session`` (or ``db_engine`` / ``empty_db_url``) and run once on SQLite and
once on the project's real PostgreSQL (marked ``cloud``; deselect with ``-m "not cloud"``).
PostgreSQL tests never touch a developer's tables: each pytest run migrates its own scratch
database and every test rolls back what it did.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from services.store.db import make_engine, migrate, session_factory
from testdb import scratch_pg_database

REPO = Path(__file__).resolve().parents[1]
SERVICES_SH = REPO / "scripts" / "services.sh"

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.cloud)]


def _services(*args: str, timeout: float) -> str:
    proc = subprocess.run(["bash", str(SERVICES_SH), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"scripts/services.sh {' '.join(args)} exited {proc.returncode}\n"
                    f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}",
                    pytrace=False)
    return proc.stdout


def _accepts_connections(url: str) -> bool:
    engine = sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect():
            return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def pg_url() -> str:
    """SQLAlchemy URL of the project's PostgreSQL, started through scripts/services.sh if down.

    tests/cloud overrides this with a fixture that also starts Kafka; here a running server is
    enough, so the (slow) start only happens when nothing answers.
    """
    env = {}
    for line in _services("env", timeout=60).splitlines():
        words = shlex.split(line.rstrip().rstrip(";"))  # export NAME='value';
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            env[name] = value
    url = env.get("FACECLUSTER_PG_URL")
    assert url, "scripts/services.sh env did not print FACECLUSTER_PG_URL"
    if not _accepts_connections(url):
        _services("start", timeout=1200)  # a cold start installs PostgreSQL
    return url


@pytest.fixture(scope="session")
def pg_store_engine(pg_url) -> Iterator[sa.Engine]:
    """Engine on a scratch database migrated once for the whole run."""
    with scratch_pg_database(pg_url) as url:
        engine = make_engine(url)
        migrate(engine)
        yield engine
        engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """A migrated SQLite file; tests copy it instead of migrating again."""
    path = tmp_path_factory.mktemp("sqlite-template") / "facecluster.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    engine.dispose()  # the last connection closing folds the WAL back into the file
    return path


@pytest.fixture(params=BACKENDS)
def empty_db_url(request, tmp_path) -> Iterator[str]:
    """URL of an empty, unmigrated database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'facecluster.db'}"
    else:
        with scratch_pg_database(request.getfixturevalue("pg_url")) as url:
            yield url


@pytest.fixture(params=BACKENDS)
def db_engine(request, tmp_path) -> Iterator[sa.Engine]:
    """Engine on a migrated database: a fresh SQLite file, or the run's PostgreSQL database
    (use it through ``session``, which rolls back, or clean up after yourself)."""
    if request.param == "postgres":
        yield request.getfixturevalue("pg_store_engine")
        return
    path = tmp_path / "facecluster.db"
    shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
    engine = make_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


@pytest.fixture
def session(db_engine) -> Iterator[Session]:
    """A Session on a migrated database; tests may commit.

    On PostgreSQL the test runs inside an outer transaction that is rolled back afterwards;
    the session's commits only release savepoints within it.
    """
    if db_engine.dialect.name == "sqlite":
        with session_factory(db_engine)() as session:
            yield session
        return
    with db_engine.connect() as connection:
        outer = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
        try:
            yield session
        finally:
            session.close()
            outer.rollback()
