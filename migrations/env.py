"""Alembic environment for both backends.

Run from code through ``services.store.db.migrate`` (which hands over its connection in
``config.attributes["connection"]``) or from the ``alembic`` command line.
"""

from __future__ import annotations

from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context

from facecore.settings import Settings
from services.store.db import SQLITE_BEGIN_IMMEDIATE, make_engine
from services.store.models import Base

# Arbitrary, fixed key of the PostgreSQL advisory lock that serialises concurrent upgrades.
MIGRATION_LOCK_ID = 7_253_012_001

config = context.config
target_metadata = Base.metadata

# Only the command line configures logging; an application calling migrate() keeps its own.
if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    """``-x url=...``, else the settings (FACECLUSTER_DATABASE_URL, the config file, the default)."""
    return context.get_x_argument(as_dictionary=True).get("url") or Settings().database_url


def _set_sqlite_foreign_keys(connection: sa.Connection, on: bool) -> None:
    # The pragma is a no-op inside a transaction, so it goes straight to the driver connection,
    # which has not begun one yet.
    connection.connection.driver_connection.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def run_migrations(connection: sa.Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # Take the write lock before reading the version, so concurrent upgrades queue up.
        connection.execution_options(**{SQLITE_BEGIN_IMMEDIATE: True})
        # Batch mode rebuilds a table by copy, drop and rename; with foreign keys on, the drop
        # would cascade and delete every face of every photo. Integrity is checked afterwards.
        _set_sqlite_foreign_keys(connection, False)
    try:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=sqlite,  # SQLite cannot ALTER most things in place
            # SQLite has transactional DDL too once BEGIN is really sent (make_engine sees to
            # that): a failed migration leaves nothing half done on either backend.
            transactional_ddl=True,
            compare_type=True,
            compare_server_default=True,
        )
        with context.begin_transaction():
            if not sqlite:
                # Pods starting together all call migrate(); the first upgrades, the rest wait
                # here and then find the database at head. Released at commit.
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
            context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"migration left dangling foreign keys: {broken[:10]}")
    finally:
        if sqlite:
            _set_sqlite_foreign_keys(connection, True)


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the SQL for a DBA instead of running it."""
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=sa.make_url(url).get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            run_migrations(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
