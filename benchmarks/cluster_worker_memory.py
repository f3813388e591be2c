"""One cluster worker serving many active users: its cache's bytes, the process's RSS, the
per-face assignment latency, evictions.

    python benchmarks/cluster_worker_memory.py --users 1000 --cache-mb 256 --json

Users' library sizes are lognormal (``--median``, ``--sigma``, at most ``--max-faces``), their
faces, persons and photos synthetic (benchmarks/synth_faces.py, one seed per user). Everything
runs for real in one process: a fresh SQLite database through the store, the in-memory bus's
message type, a ``ClusterWorker`` with the cache bound ``--cache-mb`` (and
``recluster_max_faces`` 0, so every user is filed incrementally, the path this measures).

1. setup (not timed in the result): each user's library but the photos held back is stored
   and announced in one event; the worker forms the user's persons from it;
2. ``--rounds`` rounds in which every user, in a random order, uploads ``--photos`` more
   photos; events go to the worker ``--batch`` users at a time, as a consumer's batch would.

Reported: ``cache_peak_mb`` (the most the cache held after any batch of step 2) against
``cache_limit_mb``, ``rss_mb`` and ``peak_rss_mb`` (the process, the synthetic data
included), ``assign_p50_ms``/``assign_p99_ms`` (each call of the worker's assignment, search
and rule, divided by the faces it filed), ``evictions`` and ``reloads`` (users read again from
the database) during step 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_faces import generate  # noqa: E402

from facecore.types import FaceRecord, PhotoResult  # noqa: E402
from services import bus as busmod  # noqa: E402
from services.bus import Message  # noqa: E402
from services.cluster_worker import worker as cw  # noqa: E402
from services.store import repository as repo  # noqa: E402
from services.store.db import make_engine, migrate, session_factory  # noqa: E402

MODEL = "sface-2021dec"


def record(index: int, vector: np.ndarray) -> FaceRecord:
    return FaceRecord(index=index, box=np.array([10, 10, 90, 110], np.float32), landmarks=np.zeros((5, 2), np.float32),
                      det_score=0.99, blur=0.5, blurry=False, trash_score=0.0, is_trash=False, embedding=vector,
                      model_version=MODEL)


def store(sessions, name: str, photos: list[tuple[str, np.ndarray]]) -> list[int]:
    """Store photos (key, vectors of its faces) in one transaction; their face ids."""
    ids = []
    with sessions() as s:
        user = repo.get_or_create_user(s, name)
        for key, x in photos:
            saved = repo.save_photo_result(s, user.id, f"{key}.jpg", PhotoResult(
                key=key, sha256=f"{name}/{key}".encode().hex().ljust(64, "0")[:64], width=200, height=200,
                faces=[record(i, v) for i, v in enumerate(x)]))
            ids.extend(saved.face_ids)
        s.commit()
    return ids


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--median", type=float, default=100, help="median faces per user")
    ap.add_argument("--sigma", type=float, default=1.3, help="lognormal sigma of faces per user")
    ap.add_argument("--max-faces", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--photos", type=int, default=3, help="photos each user uploads per round")
    ap.add_argument("--batch", type=int, default=20, help="users' events per worker batch")
    ap.add_argument("--cache-mb", type=float, default=256)
    ap.add_argument("--threads", type=int, default=1, help="faiss and BLAS threads")
    ap.add_argument("--db", type=Path, help="SQLite file (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(args.seed)
    sizes = np.clip(np.round(args.median * np.exp(args.sigma * rng.standard_normal(args.users))),
                    2, args.max_faces).astype(int)

    tmp = tempfile.TemporaryDirectory()
    db = args.db or Path(tmp.name) / "library.db"
    engine = make_engine(f"sqlite:///{db}")
    migrate(engine)
    sessions = session_factory(engine)
    bus = busmod.connect(f"memory://cluster-worker-memory-{args.seed}")
    bus.ensure_topics()
    worker = cw.ClusterWorker(bus, sessions, threading.Event(), recluster_max_faces=0, cache_mb=args.cache_mb)
    offset = 0

    def event(name: str, face_ids: list[int]) -> Message:
        nonlocal offset
        offset += 1
        return Message(busmod.INDEXED, 0, offset, name, {"user": name, "face_ids": face_ids}, b"")

    started = time.perf_counter()
    later: dict[str, list[list[tuple[str, np.ndarray]]]] = {}
    library = np.zeros(args.users, int)
    for k, n in enumerate(sizes):
        name = f"user-{k:05d}"
        g = generate(int(n) + args.rounds * args.photos * 5, seed=args.seed * 100_000 + k)
        photos = [(f"p{p}", g.x[g.photo == p]) for p in np.unique(g.photo)]
        held = args.rounds * args.photos
        later[name] = [photos[len(photos) - held + r * args.photos:][:args.photos] for r in range(args.rounds)]
        ids = store(sessions, name, photos[:len(photos) - held])
        library[k] = len(ids)
        worker.handle([event(name, ids)])
    setup_s = time.perf_counter() - started

    reloads = 0
    load = cw._UserFaces.load.__func__

    def counted_load(cls, *a, **kw):
        nonlocal reloads
        reloads += 1
        return load(cls, *a, **kw)

    cw._UserFaces.load = classmethod(counted_load)
    per_face: list[float] = []
    assign = worker._assign

    def timed_assign(state, ids, x, *a, **kw):
        t = time.perf_counter()
        out = assign(state, ids, x, *a, **kw)
        if len(ids):
            per_face.extend([(time.perf_counter() - t) * 1000 / len(ids)] * len(ids))
        return out

    worker._assign = timed_assign
    evicted_before, peak, faces_new = worker.evictions, 0, 0
    started = time.perf_counter()
    for r in range(args.rounds):
        order = [f"user-{k:05d}" for k in rng.permutation(args.users)]
        for b in range(0, len(order), args.batch):
            batch = []
            for name in order[b:b + args.batch]:
                ids = store(sessions, name, later[name][r])
                faces_new += len(ids)
                batch.append(event(name, ids))
            worker.handle(batch)
            peak = max(peak, worker.cache_bytes)
    rounds_s = time.perf_counter() - started
    bus.close()
    lat = np.array(per_face)
    out = {"users": args.users, "faces": int(library.sum()), "largest_user": int(library.max()),
           "median_user": int(np.median(library)), "new_faces": faces_new, "threads": args.threads,
           "cache_limit_mb": args.cache_mb, "cache_peak_mb": round(peak / 2**20, 1),
           "cache_end_mb": round(worker.cache_bytes / 2**20, 1), "users_cached_end": len(worker.users),
           "rss_mb": round(rss_mb()), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "assign_p50_ms": round(float(np.percentile(lat, 50)), 3),
           "assign_p99_ms": round(float(np.percentile(lat, 99)), 3),
           "evictions": worker.evictions - evicted_before, "reloads": reloads,
           "setup_s": round(setup_s, 1), "rounds_s": round(rounds_s, 1)}
    if not args.json:
        print(f"{args.users} users, {out['faces']} library faces, cache bound {args.cache_mb} MB", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
