"""The life of a bus worker process, shared by the ingest and cluster workers.

Connect to the bus and the database, create the topics and migrate (waiting for either
to come up), build the worker, join its consumer group and consume until told to stop;
whatever happens, close everything in the reverse order it was opened. A stop that
arrives while waiting leaves the uncommitted batch to be delivered again; one that arrives
while starting exits before anything is consumed.

A worker serves a deployment, so it refuses to start (exit code 2) unless the database and
the bus were named explicitly: the library's defaults (``./facecluster.db``, an in-process
bus) would leave it working alone on data nobody else sees.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import sqlalchemy as sa
from pydantic_settings import BaseSettings
from sqlalchemy.orm import Session, sessionmaker

from facecore.settings import Settings

from . import bus as busmod
from .bus import Bus, Message, Stopped, consume, retry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hooks:
    """What a worker does with its topic."""

    handle: Callable[[list[Message]], None]  # one batch, durably, before its offsets are committed
    on_revoke: Callable[[set[int]], None] | None = None  # the partitions this member lost
    idle: Callable[[], None] | None = None  # after a poll that brought nothing


# (bus, sessions, resources) -> hooks; what the builder opens and must be closed goes onto ``resources``
Builder = Callable[[Bus, sessionmaker[Session], ExitStack], Hooks]


# Settings a worker must be given explicitly (env var or TOML file), never left to their defaults.
REQUIRED = ("database_url", "bus_url")
EXAMPLES = {
    "database_url": "postgresql+psycopg2://facecluster:PASSWORD@postgres:5432/facecluster",
    "bus_url": "kafka://kafka:9092",
}


def env_name(field: str) -> str:
    return f"FACECLUSTER_{field.upper()}"


def _shown(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return repr(value) if value == "" else str(value)


def settings_help(*classes: type[BaseSettings]) -> str:
    """One line per setting of ``classes``, from their field descriptions, for a ``--help``."""
    lines = ["settings (FACECLUSTER_* environment variables, or the same keys in lower case in the",
             "TOML file named by FACECLUSTER_CONFIG; environment variables win):",
             f"  {'FACECLUSTER_CONFIG':34} TOML file of settings"]
    seen: set[str] = set()
    for cls in classes:
        for name, field in cls.model_fields.items():
            if name in seen:
                continue
            seen.add(name)
            if name in REQUIRED:
                text = f"required, e.g. {EXAMPLES[name]}" + (f"; {field.description}" if field.description else "")
            else:
                default = _shown(field.get_default(call_default_factory=True))
                text = f"{field.description} (default {default})" if field.description else f"default {default}"
            lines.append(f"  {env_name(name):34} {text}")
    return "\n".join(lines)


def describe_settings(parser: argparse.ArgumentParser, *classes: type[BaseSettings]) -> None:
    """Make ``parser``'s ``--help`` end with the settings the process reads."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = settings_help(*(classes or (Settings,)))


def missing_settings(settings: BaseSettings) -> list[str]:
    """The REQUIRED settings that were not given explicitly (env var, TOML file or init argument)."""
    return [n for n in REQUIRED if n not in settings.model_fields_set or not getattr(settings, n)]


def refusal(missing: list[str]) -> str:
    names = " and ".join(env_name(n) for n in missing)
    return "\n".join([
        f"refusing to start: {names} {'was' if len(missing) == 1 else 'were'} not given.",
        "A worker serves a deployment; left to the defaults it would use ./facecluster.db and an in-process",
        "bus that no other process can reach. Set both in the environment or in the TOML file named by",
        "FACECLUSTER_CONFIG, e.g.",
        *(f"  {env_name(n)}={EXAMPLES[n]}" for n in REQUIRED),
        "(`--help` lists every setting.)",
    ])


def migrate_database(engine: sa.Engine, stop: threading.Event) -> None:
    """Migrate on start, as the CLI does, waiting for the database if it is not up yet."""
    from .store.db import migrate

    try:
        retry(lambda: migrate(engine), "database migration", stop)
    except sa.exc.DBAPIError:
        # Two workers migrating an empty database at once: the loser fails on the winner's
        # tables, which are there once it commits; a second run finds the schema at head.
        log.warning("migration collided with another worker's; running it again", exc_info=True)
        time.sleep(1.0)
        retry(lambda: migrate(engine), "database migration", stop)


def run_worker(settings: Settings, stop: threading.Event, topic: str, group: str, build: Builder,
               worker_log: logging.Logger) -> int:
    """Run one worker process on ``topic`` as ``group`` until ``stop``; returns the exit code."""
    from .store.db import make_engine, session_factory

    missing = missing_settings(settings)
    if missing:
        print(refusal(missing), file=sys.stderr)
        return 2
    if stop.is_set():
        worker_log.info("stopped before starting; nothing was consumed")
        return 0
    bus = busmod.connect(settings.bus_url)
    engine = make_engine(settings.database_url)
    with ExitStack() as resources:
        resources.callback(engine.dispose)
        resources.callback(bus.close)
        try:
            retry(bus.ensure_topics, "topic creation", stop)
            migrate_database(engine, stop)
            hooks = build(bus, session_factory(engine), resources)
            if stop.is_set():  # loading the models takes long enough for a rollout to change its mind
                raise Stopped("the models to load")
            consumer = retry(lambda: bus.consumer(topic, group, max_records=settings.batch_size,
                                                  on_revoke=hooks.on_revoke),
                             "joining the consumer group", stop)
            resources.callback(consumer.close)
            worker_log.info("consuming %s as group %s (batch %d)", topic, group, settings.batch_size)
            consume(consumer, hooks.handle, stop, idle=hooks.idle)
        except Stopped as e:
            worker_log.info("stopped while waiting for %s; the uncommitted batch will be redelivered", e)
    worker_log.info("exiting")
    return 0
