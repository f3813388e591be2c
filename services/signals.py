"""Graceful stop for worker processes, importable before anything heavy.

A worker's ``__main__`` installs this first, so a SIGTERM that arrives while the models and
clients are still loading (a rollout, a scale-down) is a clean stop with exit code 0 rather
than death by signal.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so a worker can finish its batch and leave cleanly."""
    stop = threading.Event()

    def handler(signum, _frame):
        log.info("received %s: finishing the current batch, then exiting", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
