"""Recluster worker: consumes ``recluster.requested`` and re-clusters each user it names.

Each user is re-clustered from scratch by ``services.recluster.recluster_user``, the function
behind ``facecluster recluster``: one transaction per user, through the persons rules layer
(stable person ids, names, hidden flags, covers and every user decision kept). The batch's
offsets are committed after its users' transactions, so a worker killed mid-batch leaves its
uncommitted users to the next owner of the partition, which finds those already done with an
empty plan and does the rest: nothing is done twice in effect.

Events come from ``facecluster recluster --all --enqueue`` (one per user, keyed by user). The
workers of the consumer group ``facecluster-recluster`` share the topic's partitions, so several
of them (a Kubernetes Job with parallelism) re-cluster a population in parallel.

With ``--exit-when-idle SECONDS`` the worker exits 0 once it has polled nothing for that long
and the group has nothing left to consume (its lag is 0: a killed member's uncommitted events,
waiting for their partitions to move, keep the others running), which is how a Job completes.

Run: ``python -m services.recluster_worker [--exit-when-idle SECONDS]``.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections import Counter
from contextlib import ExitStack

from sqlalchemy.orm import Session, sessionmaker

from facecore.settings import Settings

from .. import bus as busmod
from ..bus import Bus, BusUnavailable, Message, dead_letter, retry, worker_args
from ..recluster import recluster_user
from ..runner import Hooks, describe_settings, run_worker
from ..store.repository import NotFound

log = logging.getLogger("facecluster.recluster_worker")

GROUP = "facecluster-recluster"


class ReclusterWorker:
    def __init__(self, bus: Bus, sessions: sessionmaker[Session], stop: threading.Event, group: str, *,
                 max_distance: float, min_size: int, exit_when_idle: float | None = None):
        self.bus, self.sessions, self.stop, self.group = bus, sessions, stop, group
        self.max_distance, self.min_size = max_distance, min_size
        self.exit_when_idle = exit_when_idle
        self.busy_at = time.monotonic()  # when the last batch was handled (or the worker started)

    def _recluster(self, name: str) -> str:
        try:
            plan = recluster_user(self.sessions, name, max_distance=self.max_distance, min_size=self.min_size)
        except NotFound:  # deleted since the event was sent
            log.info("user %r not found; nothing to re-cluster", name)
            return "missing"
        log.info("%s (%.2fs)", plan.line(), plan.seconds)
        return "unchanged" if plan.empty else "changed"

    def handle(self, batch: list[Message]) -> None:
        started = time.perf_counter()
        dead = [dead_letter(m, m.error) for m in batch if m.error]
        names = list(dict.fromkeys(m.value["user"] for m in batch if not m.error))  # once per batch
        outcomes = Counter()
        for name in names:
            outcomes[retry(lambda: self._recluster(name), f"re-clustering {name}", self.stop)] += 1
        retry(lambda: self.bus.publish(busmod.DEAD, dead), "publishing photo.dead", self.stop)
        log.info("batch of %d: %d users re-clustered (%d changed, %d unchanged, %d not found), %d malformed; %.2fs",
                 len(batch), len(names), outcomes["changed"], outcomes["unchanged"], outcomes["missing"], len(dead),
                 time.perf_counter() - started)
        self.busy_at = time.monotonic()

    def idle(self) -> None:
        """After an empty poll: stop once idle for ``exit_when_idle`` seconds and the group's lag is 0."""
        if self.exit_when_idle is None or time.monotonic() - self.busy_at < self.exit_when_idle:
            return
        try:
            pending = self.bus.pending(busmod.RECLUSTER, self.group)
        except BusUnavailable as e:
            log.warning("could not read the group's lag (%s); not exiting yet", e)
            return
        if pending:
            log.info("idle, but %d events of the group are not committed yet (another member has them, or they "
                     "wait for a dead member's partitions to move); waiting", pending)
            self.busy_at = time.monotonic()
            return
        log.info("nothing to consume for %.0fs and the group's lag is 0: exiting", self.exit_when_idle)
        self.stop.set()


def main(stop: threading.Event, argv: list[str] | None = None) -> int:
    """``stop`` is set by SIGTERM/SIGINT; ``__main__`` installs that before importing this module."""

    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--exit-when-idle", type=float, metavar="SECONDS",
                            help="exit 0 after SECONDS with nothing to consume and nothing left to the group "
                                 "(a batch Job); default: run until stopped")
        describe_settings(parser)

    settings = Settings()
    args = worker_args("python -m services.recluster_worker", __doc__.split("\n\n")[0], GROUP,
                       "consumer group (workers of one group share the users)", argv, options)

    def build(bus: Bus, sessions: sessionmaker[Session], resources: ExitStack):
        worker = ReclusterWorker(bus, sessions, stop, args.group, max_distance=settings.cluster_threshold,
                                 min_size=settings.min_cluster_size, exit_when_idle=args.exit_when_idle)
        return Hooks(worker.handle, idle=worker.idle)

    return run_worker(settings, stop, busmod.RECLUSTER, args.group, build, log)
