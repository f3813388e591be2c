"""Engines and migrations on SQLite and the real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.pool import NullPool

from services.store.db import make_engine, migrate
from services.store.models import Base

REPO = Path(__file__).resolve().parents[2]


def _pragma(engine: sa.Engine, name: str):
    with engine.connect() as connection:
        return connection.exec_driver_sql(f"PRAGMA {name}").scalar()


def test_sqlite_connections_enforce_foreign_keys_and_use_wal(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        assert _pragma(engine, "foreign_keys") == 1
        assert _pragma(engine, "journal_mode") == "wal"
        assert _pragma(engine, "busy_timeout") >= 1000
    finally:
        engine.dispose()


def test_relative_sqlite_path_gets_its_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    migrate("sqlite:///var/db/facecluster.db")
    assert (tmp_path / "var" / "db" / "facecluster.db").is_file()


def test_absolute_sqlite_path_in_a_missing_directory_is_an_error(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'not-mounted' / 'facecluster.db'}")
    try:
        with pytest.raises(sa.exc.OperationalError):
            engine.connect().close()
        assert not (tmp_path / "not-mounted").exists()
    finally:
        engine.dispose()


def test_migrate_leaves_sqlite_foreign_keys_on(tmp_path):
    # env.py switches them off for the migration on the caller's own pooled connection.
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        migrate(engine)
        assert _pragma(engine, "foreign_keys") == 1
    finally:
        engine.dispose()


def assert_at_head(url: str) -> None:
    """The database records exactly one applied revision: the head."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            head = ScriptDirectory.from_config(Config(str(REPO / "alembic.ini"))).get_current_head()
            assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == [head]
    finally:
        engine.dispose()


def test_migrate_is_idempotent(empty_db_url):
    migrate(empty_db_url)
    migrate(empty_db_url)
    assert_at_head(empty_db_url)


def test_concurrent_migrations_do_not_collide(empty_db_url):
    # Several processes starting at once (pods, CLI instances) each run migrate(). Processes,
    # not threads: alembic keeps its migration context in module globals.
    code = "import sys; from services.store.db import migrate; migrate(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, empty_db_url], cwd=REPO, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    assert_at_head(empty_db_url)


def test_migrations_match_models(db_engine):
    with db_engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(context, Base.metadata) == []


def test_downgrade_to_empty_and_upgrade_again(empty_db_url):
    engine = make_engine(empty_db_url)
    config = Config(str(REPO / "alembic.ini"))
    try:
        with engine.connect() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            command.downgrade(config, "base")
            assert set(sa.inspect(connection).get_table_names()) == {"alembic_version"}
            command.upgrade(config, "head")
            assert "faces" in sa.inspect(connection).get_table_names()
    finally:
        engine.dispose()


def test_alembic_command_line_takes_the_url_from_x_before_the_environment(tmp_path):
    env = {**os.environ, "FACECLUSTER_DATABASE_URL": f"sqlite:///{tmp_path / 'from-env.db'}"}
    proc = subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url=sqlite:///{tmp_path / 'from-x.db'}", "upgrade", "head"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Running upgrade  -> 0001" in proc.stderr
    assert (tmp_path / "from-x.db").is_file()
    assert not (tmp_path / "from-env.db").exists()


@pytest.mark.cloud
def test_postgres_engine_replaces_dead_pooled_connections(pg_url):
    # What a server restart does to a pool, without restarting a server other tests share.
    engine = make_engine(pg_url)
    admin = sa.create_engine(pg_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with admin.connect() as connection:
            assert connection.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
    finally:
        engine.dispose()
        admin.dispose()
