"""Ingest worker: consumes ``photo.uploaded`` in batches and indexes the photos.

Per batch: read each photo from the object store, run the face pipeline over the whole batch,
store every photo in its own transaction, and only then announce ``faces.indexed`` and commit
the offsets. Delivery is at least once, and storing is idempotent per (user, sha256), so a kill
at any point leaves either nothing or whole photos behind and a redelivery finishes the job
without duplicates. Events are keyed by photo (``user/sha256``), so one user's bulk upload is
shared by every worker of the group and nothing here relies on a user's photos coming in order
or to one worker; the same photo twice always meets in one partition. A photo that cannot be
indexed (corrupt bytes, missing object, a model error on it alone) becomes a failed row with its
reason and goes to ``photo.dead``; it never stops the worker. Outages of the database or the
broker are waited out with backoff.

Run: ``python -m services.ingest`` (settings from ``FACECLUSTER_*``: ``database_url``,
``bus_url``, ``object_store``, ``batch_size``, model settings). SIGTERM finishes the current
batch and exits 0.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy.exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from facecore.settings import Settings
from facecore.types import PhotoResult

from .. import bus as busmod
from ..bus import Bus, Message, dead_letter, retry, worker_args
from ..publish import read_object
from ..runner import Hooks, describe_settings, run_worker
from ..store import repository as repo

log = logging.getLogger("facecluster.ingest")

GROUP = "ingest"


@dataclass
class BatchReport:
    messages: int = 0
    indexed: int = 0
    already: int = 0
    failed: int = 0
    malformed: int = 0
    faces: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def line(self, batch: list[Message]) -> str:
        spans: dict[int, list[int]] = {}
        for m in batch:
            spans.setdefault(m.partition, []).append(m.offset)
        where = " ".join(f"p{p}:{min(o)}-{max(o)}" for p, o in sorted(spans.items()))
        total = sum(self.seconds.values())
        return (f"batch of {self.messages} ({where}): {self.indexed} indexed ({self.faces} faces), "
                f"{self.already} already indexed, {self.failed} failed, {self.malformed} malformed; "
                + " ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
                + f"; {self.messages / total if total else 0:.1f} msg/s")


@dataclass(eq=False)
class _Job:
    """One distinct (user, sha256) of a batch; duplicate messages share its outcome."""

    user_id: int
    messages: list[Message]
    result: PhotoResult | None = None
    photo_id: int | None = None
    status: str | None = None
    face_ids: list[int] = field(default_factory=list)

    @property
    def value(self) -> dict:
        return self.messages[0].value


class IngestWorker:
    """The batch handler; ``pipeline`` is anything with FacePipeline's ``process``."""

    def __init__(self, settings: Settings, bus: Bus, sessions: sessionmaker[Session], pipeline,
                 stop: threading.Event):
        self.settings, self.bus, self.sessions, self.pipeline, self.stop = settings, bus, sessions, pipeline, stop
        self.store = Path(settings.object_store)
        self._pool = ThreadPoolExecutor(max_workers=4)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -------------------------------------------------------------------------- steps

    def _user_ids(self, names: set[str]) -> dict[str, int]:
        with self.sessions() as session:
            ids = {name: repo.get_or_create_user(session, name).id for name in sorted(names)}
            session.commit()
            return ids

    def _find_indexed(self, jobs: list[_Job]) -> None:
        """Jobs whose photo is already stored only need announcing again (a redelivery)."""
        by_user: dict[int, list[_Job]] = defaultdict(list)
        for job in jobs:
            by_user[job.user_id].append(job)
        with self.sessions() as session:
            for user_id, of_user in by_user.items():
                known = repo.indexed_photo_ids(session, user_id, {job.value["sha256"] for job in of_user})
                for job in of_user:
                    if job.value["sha256"] in known:
                        job.photo_id, job.status = known[job.value["sha256"]], "indexed"
                        job.face_ids = repo.photo_face_ids(session, user_id, job.photo_id)

    def _read(self, value: dict) -> bytes | str:
        """The photo's bytes, or why they cannot be had (a permanent failure for this photo)."""
        return read_object(self.store, value["object_key"], value["sha256"], self.settings.max_bytes)

    def _process(self, items: list[tuple[str, bytes]]) -> list[PhotoResult]:
        """Pipeline over the batch; if it raises, photo by photo so only the culprit fails."""
        if not items:
            return []
        try:
            return self.pipeline.process(items)
        except Exception:
            log.exception("pipeline failed on a batch of %d; retrying photo by photo", len(items))
        results = []
        for key, data in items:
            try:
                results.extend(self.pipeline.process([(key, data)]))
            except Exception as e:
                log.exception("pipeline failed on photo %s", key)
                results.append(PhotoResult(key=key, error=f"pipeline error: {type(e).__name__}: {e}"[:500]))
        return results

    def _save(self, job: _Job, jobs: list[_Job]) -> None:
        while True:
            try:
                with self.sessions() as session:
                    saved = repo.save_photo_result(session, job.user_id, job.value["uri"], job.result)
                    session.commit()  # one transaction per photo
                break
            except sa_exc.IntegrityError:
                # The user was deleted after this batch looked it up (photos of one user are in
                # several workers' hands at once). The photo is stored as if its event had come
                # after the delete, as every later upload for that name is: under the user made anew.
                name, gone = job.value["user"], job.user_id
                job.user_id = self._user_ids({name})[name]
                if job.user_id == gone:
                    raise  # the user is there: some other constraint, a bug
                log.warning("user %s was deleted while photo %s was indexed; storing it for the user anew",
                            name, job.value["uri"])
                for other in jobs:
                    if other.user_id == gone:
                        other.user_id = job.user_id
        job.photo_id, job.status, job.face_ids = saved.id, saved.status, saved.face_ids
        if saved.status == "failed":
            job.result.error = saved.error

    # -------------------------------------------------------------------------- batch

    def handle(self, batch: list[Message]) -> BatchReport:
        report = BatchReport(messages=len(batch))
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            report.seconds[stage] = report.seconds.get(stage, 0.0) + now - clock
            clock = now

        dead = [dead_letter(m, m.error) for m in batch if m.error]
        report.malformed = len(dead)
        good = [m for m in batch if not m.error]
        users = retry(lambda: self._user_ids({m.value["user"] for m in good}), "user lookup", self.stop) if good else {}
        by_key: dict[tuple[int, str], _Job] = {}
        for m in good:
            key = (users[m.value["user"]], m.value["sha256"])
            by_key.setdefault(key, _Job(key[0], [])).messages.append(m)
        jobs = list(by_key.values())
        retry(lambda: self._find_indexed(jobs), "indexed-photo lookup", self.stop)
        todo = [job for job in jobs if job.status is None]
        report.already = len(jobs) - len(todo)
        lap("lookup")
        datas = list(self._pool.map(lambda job: self._read(job.value), todo))
        lap("read")

        items = [(str(i), data) for i, data in enumerate(datas) if isinstance(data, bytes)]
        results = {r.key: r for r in self._process(items)}
        lap("pipeline")
        for i, (job, data) in enumerate(zip(todo, datas)):
            job.result = results[str(i)] if isinstance(data, bytes) else PhotoResult(key=str(i), error=data)
            # Failed rows are keyed by the bytes' hash too, so a re-upload of them is recognised.
            job.result.sha256 = job.result.sha256 or job.value["sha256"]
            retry(lambda: self._save(job, todo), f"storing {job.value['uri']}", self.stop)
        lap("store")

        indexed = []
        for job in jobs:
            if job.status == "indexed":
                indexed.append((job.value["user"], {"user": job.value["user"], "photo_id": job.photo_id,
                                                    "sha256": job.value["sha256"], "face_ids": job.face_ids}))
                if job in todo:
                    report.indexed += 1
                    report.faces += len(job.face_ids)
            else:
                report.failed += 1
                reason = job.result.error or "unknown"
                log.warning("photo failed: user %s uri %s: %s", job.value["user"], job.value["uri"], reason)
                dead.extend(dead_letter(m, reason) for m in job.messages)
        retry(lambda: self.bus.publish(busmod.INDEXED, indexed), "publishing faces.indexed", self.stop)
        retry(lambda: self.bus.publish(busmod.DEAD, dead), "publishing photo.dead", self.stop)
        lap("publish")
        log.info(report.line(batch))
        return report


def main(stop: threading.Event, argv: list[str] | None = None) -> int:
    """``stop`` is set by SIGTERM/SIGINT; ``__main__`` installs that before importing this module."""
    args = worker_args("python -m services.ingest", __doc__.split("\n\n")[0], GROUP,
                       "consumer group (workers of one group share the work)", argv, describe_settings)
    settings = Settings()

    def build(bus: Bus, sessions: sessionmaker[Session], resources: ExitStack):
        from facecore.pipeline import FacePipeline

        pipeline = FacePipeline(settings)  # before joining: a member that holds partitions should work
        resources.callback(pipeline.close)
        worker = IngestWorker(settings, bus, sessions, pipeline, stop)
        resources.callback(worker.close)
        return Hooks(worker.handle)

    return run_worker(settings, stop, busmod.UPLOADED, args.group, build, log)
