"""Throughput of the cloud path (Kafka -> ingest worker -> PostgreSQL) and what the path itself costs.

Publishes N LFW-dev photos into a fresh Kafka namespace, object store and PostgreSQL database,
then runs the ingest worker's own loop (``services.bus.consume`` + ``IngestWorker.handle``) in
this process until every event is committed:

- ``--pipeline real``: FacePipeline with the configured models; photos/s from Kafka to Postgres.
- ``--pipeline stub``: a no-op pipeline that hashes the bytes and returns one fixed face per
  photo (LFW-dev averages ~1.1), so what is left is the bus, object store and database cost
  per photo: poll, read, one transaction per photo, faces.indexed, offset commit.

Needs the services (``scripts/services.sh start``; URLs from ``scripts/services.sh env``).
Prints one JSON object per run; timings on a shared machine are indicative (see cpu_ms).

    .venv/bin/python benchmarks/bus_overhead.py --photos 400 --pipeline stub real
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from facecore.settings import Settings
from facecore.types import FaceRecord, PhotoResult
from services import bus as busmod
from services.ingest.worker import IngestWorker
from services.publish import publish_photos
from services.store.db import make_engine, migrate, session_factory

REPO = Path(__file__).resolve().parents[1]
LFW = REPO.parent / "shared" / "data" / "lfw-dev" / "images"


class NoopPipeline:
    """Stands in for FacePipeline where only the cost around it is measured: no decoding, no models."""

    model_version = "stub"

    def __init__(self):
        rng = np.random.default_rng(0)
        embedding = rng.standard_normal(128).astype(np.float32)
        self.embedding = embedding / np.linalg.norm(embedding)

    def process(self, items):
        return [PhotoResult(key=key, sha256=hashlib.sha256(data).hexdigest(), width=250, height=250, faces=[
            FaceRecord(index=0, box=np.array([70, 70, 180, 180], np.float32), landmarks=np.zeros((5, 2), np.float32),
                       det_score=0.99, blur=100.0, blurry=False, trash_score=None, is_trash=False,
                       embedding=self.embedding, model_version=self.model_version)]) for key, data in items]


def service_env() -> dict[str, str]:
    out = subprocess.run(["bash", str(REPO / "scripts" / "services.sh"), "env"], capture_output=True, text=True,
                         check=True).stdout
    env = {}
    for line in out.splitlines():  # export NAME='value';
        name, _, value = line.removeprefix("export ").rstrip(";").partition("=")
        env[name] = value.strip("'")
    return env


@contextmanager
def scratch_cloud(kafka: str, pg_url: str, prefix: str):
    """A fresh Kafka topic namespace and PostgreSQL database, migrated, dropped again on exit:
    yields (bus URL, database URL, engine, bus)."""
    namespace, db = f"{prefix}{uuid.uuid4().hex[:8]}", f"facecluster_bench_{uuid.uuid4().hex[:8]}"
    admin_db = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin_db.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{db}"')
    db_url = sa.make_url(pg_url).set(database=db).render_as_string(hide_password=False)
    bus_url = f"kafka://{kafka}/{namespace}"
    engine = make_engine(db_url)
    bus = busmod.connect(bus_url)
    try:
        migrate(engine)
        bus.ensure_topics()
        yield bus_url, db_url, engine, bus
    finally:
        bus.close()
        engine.dispose()
        admin = bus._admin()
        admin.delete_topics([bus._name(t) for t in busmod.TOPICS], raise_errors=False)
        admin.close()
        with admin_db.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin_db.dispose()


def run(kind: str, photos: list[Path], settings: Settings, kafka: str, pg_url: str) -> dict:
    with tempfile.TemporaryDirectory() as store, scratch_cloud(kafka, pg_url, "bench") as (_, _, engine, bus):
        settings = settings.model_copy(update={"object_store": Path(store)})
        users = [f"user-{i}" for i in range(8)]
        t = time.perf_counter()
        for i, user in enumerate(users):
            mine = photos[i::len(users)]
            publish_photos(bus, settings.object_store, user, [(f"{p.parent.name}/{p.name}", p) for p in mine],
                           max_bytes=settings.max_bytes)
        publish_s = time.perf_counter() - t
        if kind == "real":
            from facecore.pipeline import FacePipeline

            pipeline = FacePipeline(settings)
            pipeline.process([(str(p), p.read_bytes()) for p in photos[:4]])  # warm-up, not counted
        else:
            pipeline = NoopPipeline()
        stop = threading.Event()
        worker = IngestWorker(settings, bus, session_factory(engine), pipeline, stop)
        consumer = bus.consumer(busmod.UPLOADED, "ingest", max_records=settings.batch_size)
        stages: dict[str, float] = {}
        done = [0]
        first = []

        def handle(batch):
            if not first:
                first.append((time.perf_counter(), time.process_time()))
            report = worker.handle(batch)
            for k, v in report.seconds.items():
                stages[k] = stages.get(k, 0.0) + v
            done[0] += len(batch)
            if done[0] >= len(photos):
                stop.set()

        busmod.consume(consumer, handle, stop, poll_s=0.5)
        wall, cpu = time.perf_counter() - first[0][0], time.process_time() - first[0][1]
        consumer.close()
        worker.close()
        n = len(photos)
        return {
            "pipeline": kind, "photos": n, "batch_size": settings.batch_size, "threads": settings.threads,
            "photos_per_s": round(n / wall, 2), "ms_per_photo": round(1000 * wall / n, 2),
            "cpu_ms_per_photo": round(1000 * cpu / n, 2),
            "ms_per_photo_by_stage": {k: round(1000 * v / n, 2) for k, v in stages.items()},
            "path_ms_per_photo": round(1000 * (wall - stages.get("pipeline", 0.0)) / n, 2),
            "publish_ms_per_photo": round(1000 * publish_s / n, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "loadavg": os.getloadavg()[0],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=400)
    parser.add_argument("--pipeline", nargs="+", choices=["stub", "real"], default=["stub", "real"])
    parser.add_argument("--batch-size", type=int, default=Settings().batch_size)
    parser.add_argument("--threads", type=int, default=0, help="model threads (0 = one per core)")
    args = parser.parse_args()
    env = service_env()
    photos = sorted(LFW.glob("*/*.jpg"))[:args.photos]
    if len(photos) < args.photos:
        raise SystemExit(f"need {args.photos} LFW-dev photos under {LFW}, found {len(photos)}")
    settings = Settings(batch_size=args.batch_size, threads=args.threads)
    for kind in args.pipeline:
        print(json.dumps(run(kind, photos, settings, env["FACECLUSTER_KAFKA"], env["FACECLUSTER_PG_URL"])), flush=True)


if __name__ == "__main__":
    main()
