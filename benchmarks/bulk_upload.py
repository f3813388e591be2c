"""One user's bulk upload through 1 and through 2 ingest worker processes (real Kafka + PostgreSQL).

``photo.uploaded`` is keyed by photo (``user/sha256``), so one user's photos land on every
partition and every worker of the ingest group gets a share. Per run: a fresh topic namespace,
database and object store; N worker processes (``python -m services.ingest``, as deployed) are
started and waited for until each holds its partitions; then the photos are published for one
user (``services.publish.publish_photos``) and the clock runs until every photo row is stored
and the group has committed every event. Model loading is outside the clock; publishing (one
process copying the photos into the object store) is inside it and overlaps the indexing.
``cpu_s_per_worker`` is the CPU time each worker used on the clock: on a busy host it shows
how much of a core a worker actually got.

Each worker is pinned to one thread (``FACECLUSTER_THREADS=1``, ``OMP_NUM_THREADS=1``,
``OPENCV_FOR_THREADS_NUM=1``), so a worker is a core's worth of work and two workers can at
most double the rate on a machine with two free cores.

Needs the services (``scripts/services.sh start``) and a folder of photos (``*.jpg`` below it,
e.g. LFW-dev's ``images``); the first ``--photos`` in sorted order are used, each once. Prints
one JSON line per run::

    flock /tmp/facecluster-bench.lock .venv/bin/python benchmarks/bulk_upload.py \\
        --photos-dir DIR --photos 2000 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from facecore.settings import Settings
from services import bus as busmod
from services.publish import publish_photos
from services.store.models import Face, Photo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bus_overhead import scratch_cloud, service_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
USER = "bulk"
MAX_BYTES = 100 * 1024 * 1024
WORKER_START_S = 300


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait(what: str, condition, timeout: float, workers: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc, log in zip(workers, logs):
            if proc.poll() is not None:
                raise SystemExit(f"worker exited {proc.returncode} while waiting for {what}:\n"
                                 f"{log.read_text(errors='replace')[-4000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def run(n_workers: int, photos: list[Path], batch_size: int, kafka: str, pg_url: str) -> dict:
    workers: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp, scratch_cloud(kafka, pg_url, "bulk") as (bus_url, db_url, engine, bus):
        store, logs = Path(tmp) / "objects", [Path(tmp) / f"ingest-{i}.log" for i in range(n_workers)]
        env = {**os.environ, "FACECLUSTER_DATABASE_URL": db_url, "FACECLUSTER_BUS_URL": bus_url,
               "FACECLUSTER_OBJECT_STORE": str(store), "FACECLUSTER_BATCH_SIZE": str(batch_size),
               "FACECLUSTER_MAX_BYTES": str(MAX_BYTES), "FACECLUSTER_THREADS": "1", "OMP_NUM_THREADS": "1",
               "OPENCV_FOR_THREADS_NUM": "1"}
        try:
            for log in logs:
                with open(log, "wb") as out:
                    workers.append(subprocess.Popen([sys.executable, "-m", "services.ingest"], cwd=REPO, env=env,
                                                    stdout=out, stderr=subprocess.STDOUT))
            # Every partition held, split between the workers, before the first photo is published.
            held = re.compile(r"assigned partitions \[([\d, ]+)\]")

            def assigned() -> bool:
                last = [held.findall(log.read_text(errors="replace"))[-1:] for log in logs]
                return all(last) and sum(len(a[0].split(",")) for a in last) == busmod.PARTITIONS

            _wait("every worker holding partitions", assigned, WORKER_START_S, workers, logs)

            def rows(table=Photo) -> int:
                with engine.connect() as c:
                    return c.scalar(sa.select(sa.func.count()).select_from(table))

            load, cpu = os.getloadavg(), [cpu_s(proc.pid) for proc in workers]
            start = time.perf_counter()
            summary = publish_photos(bus, store, USER, [(f"{p.parent.name}/{p.name}", p) for p in photos],
                                     max_bytes=MAX_BYTES)
            publish_s = time.perf_counter() - start
            _wait(f"{len(photos)} photos stored", lambda: rows() >= summary.published, 3600, workers, logs)
            _wait("every event committed", lambda: bus.pending(busmod.UPLOADED, "ingest") == 0, 300, workers, logs)
            wall = time.perf_counter() - start
            load_end, cpu = os.getloadavg(), [cpu_s(proc.pid) - c for proc, c in zip(workers, cpu)]
            for proc in workers:
                proc.terminate()
            for proc in workers:
                proc.wait(timeout=180)
            indexed = [sum(int(n) for n in re.findall(r"\): (\d+) indexed", log.read_text(errors="replace")))
                       for log in logs]
            n = summary.published
            return {
                "workers": n_workers, "threads_per_worker": 1, "photos": n, "skipped": len(summary.skipped),
                "batch_size": batch_size, "partitions": busmod.PARTITIONS,
                "wall_s": round(wall, 1), "photos_per_s": round(n / wall, 2), "publish_s": round(publish_s, 1),
                "indexed_per_worker": indexed, "share_per_worker": [round(i / n, 3) for i in indexed],
                "cpu_s_per_worker": [round(c, 1) for c in cpu],
                "faces": rows(Face), "loadavg_start": [round(x, 2) for x in load],
                "loadavg_end": [round(x, 2) for x in load_end], "cpus": os.cpu_count(),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        finally:
            for proc in workers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos-dir", type=Path, required=True, help="folder with *.jpg photos below it")
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts, one run each")
    parser.add_argument("--batch-size", type=int, default=Settings().batch_size,
                        help="FACECLUSTER_BATCH_SIZE of the workers")
    args = parser.parse_args()
    photos = sorted(args.photos_dir.glob("**/*.jpg"))[:args.photos]
    if len(photos) < args.photos:
        raise SystemExit(f"need {args.photos} photos under {args.photos_dir}, found {len(photos)}")
    env = service_env()
    for n in args.workers:
        print(json.dumps(run(n, photos, args.batch_size, env["FACECLUSTER_KAFKA"], env["FACECLUSTER_PG_URL"])),
              flush=True)


if __name__ == "__main__":
    main()
