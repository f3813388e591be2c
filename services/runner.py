"""The life of a bus worker process, shared by the ingest and cluster workers.

Connect to the bus and the database, create the topics and migrate (waiting for either
to come up), build the worker, join its consumer group and consume until told to stop;
whatever happens, close everything in the reverse order it was opened. A stop that
arrives while waiting leaves the uncommitted batch to be delivered again; one that arrives
while starting exits before anything is consumed.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import sqlalchemy as sa
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
