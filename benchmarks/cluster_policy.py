"""One clustering policy, measured (docs/ARCHITECTURE.md, "One clustering policy").

On an index of LFW-dev (``facecluster index ../shared/data/lfw-dev/images --db URL``), for all
of it or for ``--photos`` of its photos (``--pick first``: the first in path order; ``mixed``: the
people tests/test_e2e.py picks, every 7th identity and those with 4 photos or more):
persons made, one-face persons, faces left unassigned, and the independent scorer's BCubed and
pairwise F1 (unassigned faces count as singletons) of

- ``batch-1`` / ``batch-2``: the cluster job (``facecluster cluster``) with min_size 1 / 2;
- ``worker-incremental``: the cluster worker filing faces incrementally, fed the photos in path
  order in batches of ``--batch`` photos (one ``faces.indexed`` event per photo, as the ingest
  worker sends them);
- ``worker-policy``: the cluster worker as configured by default (re-clustering from scratch
  while the user has at most ``recluster_max_faces`` faces), fed the same way; it must give the
  same albums as ``batch-2``.

``--cost`` then times what one batch of ``--batch`` new photos costs the worker at several
library sizes, re-clustering from scratch against incremental (cache warm), on SQLite and,
with ``--pg``, on PostgreSQL.

Faces (boxes, vectors, blur and trash flags) are copied photo by photo from the index into
fresh databases, so every variant starts from the same vectors and no model runs.

    python benchmarks/cluster_policy.py --library sqlite:///out/lfw-dev.db --out out/policy \\
        [--photos 300 [--pick mixed]] [--cost 500 1000 2000 4000 6000] [--pg postgresql+psycopg2://...]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import statistics
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from facecore.types import FaceRecord, PhotoResult
from services import bus as busmod
from services.bus import Message
from services.cluster_worker.worker import RECLUSTER_MAX_FACES, ClusterWorker
from services.clustering import cluster_user
from services.store import repository as repo
from services.store.db import make_engine, migrate, session_factory

from score import DEFAULT_DATA, run_scorer

USER = "bench"
FIELDS = ["photo", "face", "x1", "y1", "x2", "y2", "person"]


@dataclass
class Photo:
    uri: str
    faces: list[tuple[int, tuple[float, float, float, float], np.ndarray | None]]  # (index, box, vector)


def load_library(url: str, user: str) -> tuple[list[Photo], str]:
    """Every photo of ``user`` in path order with its exported faces (trash left out, as the
    export does); a face that is not clustered (blurry, no vector) has vector None."""
    engine = make_engine(url)
    try:
        migrate(engine)
        with session_factory(engine)() as s:
            uid = repo.get_or_create_user(s, user).id
            rows = list(repo.export_rows(s, uid))
            ids, versions, x = repo.face_embeddings(s, uid, [r["face_id"] for r in rows])
    finally:
        engine.dispose()
    vector = dict(zip(ids.tolist(), x))
    photos: dict[str, Photo] = {}
    for r in rows:
        photos.setdefault(r["photo"], Photo(r["photo"], [])).faces.append(
            (r["face"], (r["x1"], r["y1"], r["x2"], r["y2"]), vector.get(r["face_id"])))
    assert len(set(versions)) == 1, set(versions)
    return sorted(photos.values(), key=lambda p: p.uri), versions[0]


def store_photos(sessions, photos: list[Photo], version: str) -> list[list[int]]:
    """Store ``photos`` for USER as the ingest worker does (a photo's faces in one go); each
    photo's face ids."""
    out = []
    with sessions() as s:
        uid = repo.get_or_create_user(s, USER).id
        for p in photos:
            faces = [FaceRecord(index=i, box=np.array(box, np.float32), landmarks=np.zeros((5, 2), np.float32),
                                det_score=0.99, blur=1.0, blurry=v is None, trash_score=None, is_trash=False,
                                embedding=v, model_version=version) for i, box, v in p.faces]
            sha = hashlib.sha256(p.uri.encode()).hexdigest()
            out.append(repo.save_photo_result(s, uid, p.uri, PhotoResult(p.uri, sha, 250, 250, faces)).face_ids)
        s.commit()
    return out


class Database:
    """A fresh migrated database: a SQLite file in ``folder``, or a scratch one on ``pg``'s server."""

    def __init__(self, folder: Path, pg: str | None = None):
        self.pg, self.name = pg, f"facecluster_policy_{uuid.uuid4().hex[:10]}"
        if pg:
            with self._admin() as c:
                c.exec_driver_sql(f'CREATE DATABASE "{self.name}"')
            self.url = sa.make_url(pg).set(database=self.name).render_as_string(hide_password=False)
        else:
            self.path = folder / f"{self.name}.db"
            self.url = f"sqlite:///{self.path}"
        self.engine = make_engine(self.url)
        migrate(self.engine)
        self.sessions = session_factory(self.engine)

    def _admin(self):
        return sa.create_engine(self.pg, isolation_level="AUTOCOMMIT", poolclass=NullPool).connect()

    def close(self) -> None:
        self.engine.dispose()
        if self.pg:
            with self._admin() as c:
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        else:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)


def worker(db: Database, **kw) -> ClusterWorker:
    bus = busmod.connect(f"memory://policy-{uuid.uuid4().hex}")
    bus.ensure_topics()
    return ClusterWorker(bus, db.sessions, threading.Event(), **kw)


def feed(w: ClusterWorker, face_ids: list[list[int]], batch: int, offset: int = 0) -> list[float]:
    """One faces.indexed event per photo, ``batch`` events per call; seconds per call."""
    seconds = []
    for start in range(0, len(face_ids), batch):
        msgs = [Message(busmod.INDEXED, 0, offset + start + k, USER, {"user": USER, "face_ids": ids}, b"")
                for k, ids in enumerate(face_ids[start:start + batch])]
        t0 = time.perf_counter()
        w.handle(msgs)
        seconds.append(time.perf_counter() - t0)
    return seconds


def albums(db: Database) -> tuple[list[dict], dict]:
    """Export rows and the partition figures of the stored albums."""
    with db.sessions() as s:
        rows = list(repo.export_rows(s, repo.find_user(s, USER).id))
    sizes = Counter(r["person"] for r in rows if r["person"] is not None)
    return rows, {"faces": len(rows), "persons": len(sizes), "one_face_persons": sum(n == 1 for n in sizes.values()),
                  "unassigned_faces": sum(r["person"] is None for r in rows)}


def partition(rows: list[dict]) -> set[frozenset]:
    groups: dict[int, set] = {}
    for r in rows:
        if r["person"] is not None:
            groups.setdefault(r["person"], set()).add((r["photo"], r["face"]))
    return {frozenset(g) for g in groups.values()}


def score(rows: list[dict], images: Path, csv_path: Path) -> dict:
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    c = run_scorer("clusters", images, csv_path)
    return {k: round(c[k], 4) for k in ("bcubed_precision", "bcubed_recall", "bcubed_f1", "pairwise_f1")}


def subset_images(photos: list[Photo], data: Path, folder: Path) -> Path:
    """A folder-per-identity tree of links to just these photos, for the scorer."""
    root = folder / "images"
    shutil.rmtree(root, ignore_errors=True)
    for p in photos:
        (root / p.uri).parent.mkdir(parents=True, exist_ok=True)
        (root / p.uri).symlink_to((data / "images" / p.uri).resolve())
    return root


def pick_mixed(photos: list[Photo], n: int) -> list[Photo]:
    """tests/test_e2e.py's choice: whole identities, every 7th one or one with at least 4 photos,
    until at least ``n`` photos."""
    people: dict[str, list[Photo]] = {}
    for p in photos:
        people.setdefault(p.uri.split("/")[0], []).append(p)
    chosen: list[Photo] = []
    for i, name in enumerate(sorted(people)):
        if i % 7 == 0 or len(people[name]) >= 4:
            chosen += people[name]
        if len(chosen) >= n:
            break
    return chosen


def accuracy(photos: list[Photo], version: str, images: Path, out: Path, batch: int) -> dict:
    results, parts = {}, {}
    variants = {"batch-1": None, "batch-2": None, "worker-incremental": 0, "worker-policy": RECLUSTER_MAX_FACES}
    for name, max_faces in variants.items():
        db = Database(out)
        try:
            if max_faces is None:
                store_photos(db.sessions, photos, version)
                t0 = time.perf_counter()
                cluster_user(db.sessions, USER, version, min_size=int(name[-1]))
                per_batch, seconds = [], time.perf_counter() - t0
            else:  # each batch's photos are stored just before their events, as the ingest worker does
                w, per_batch = worker(db, recluster_max_faces=max_faces), []
                for start in range(0, len(photos), batch):
                    ids = store_photos(db.sessions, photos[start:start + batch], version)
                    per_batch += feed(w, ids, batch, offset=start)
                seconds = sum(per_batch)
            rows, figures = albums(db)
        finally:
            db.close()
        parts[name] = partition(rows)
        results[name] = {**figures, **score(rows, images, out / f"{name}_faces.csv"), "seconds": round(seconds, 2),
                         "slowest_batch_s": round(max(per_batch), 3) if per_batch else None}
        print(name, json.dumps(results[name]), flush=True)
    for name in ("worker-incremental", "worker-policy"):
        results[name]["same_albums_as_batch-2"] = parts[name] == parts["batch-2"]
    results["batch-1"]["same_albums_as_batch-2_but_singletons"] = (
        {g for g in parts["batch-1"] if len(g) > 1} == parts["batch-2"])
    return results


def cost(photos: list[Photo], version: str, sizes: list[int], batch: int, out: Path, pg: str | None) -> list[dict]:
    """For each size: a library of that many photos clustered by the batch job, then 3 batches of
    new photos through a worker; the first warms its copy of the user, the other two are timed."""
    rows = []
    for n in sizes:
        if n + 3 * batch > len(photos):
            continue
        for mode, max_faces in (("recluster", 10**9), ("incremental", 0)):
            db = Database(out, pg)
            try:
                store_photos(db.sessions, photos[:n], version)
                summary = cluster_user(db.sessions, USER, version)
                w = worker(db, recluster_max_faces=max_faces)
                times = []
                for k in range(3):
                    ids = store_photos(db.sessions, photos[n + k * batch:n + (k + 1) * batch], version)
                    times += feed(w, ids, batch, offset=k * batch)
            finally:
                db.close()
            row = {"backend": "postgresql" if pg else "sqlite", "photos": n, "faces": summary.faces, "mode": mode,
                   "warm_batch_s": [round(t, 3) for t in times[1:]], "median_s": round(statistics.median(times[1:]), 3),
                   "cold_batch_s": round(times[0], 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", required=True, help="database URL of an index of LFW-dev")
    ap.add_argument("--user", default="local", help="whose photos in --library")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("out/policy"))
    ap.add_argument("--photos", type=int, default=0, help="only N photos (0: all)")
    ap.add_argument("--pick", choices=["first", "mixed"], default="first", help="which N photos")
    ap.add_argument("--batch", type=int, default=32, help="photos per worker batch (FACECLUSTER_BATCH_SIZE)")
    ap.add_argument("--cost", type=int, nargs="*", default=[], help="library sizes (photos) to time a batch at")
    ap.add_argument("--pg", help="PostgreSQL server URL: time --cost there too (scratch databases)")
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    photos, version = load_library(args.library, args.user)
    print(f"{len(photos)} photos, {sum(len(p.faces) for p in photos)} faces, "
          f"{sum(v is not None for p in photos for _, _, v in p.faces)} clusterable ({version})", flush=True)
    report: dict = {"library": args.library, "batch": args.batch}
    if not args.no_accuracy:
        chosen = (photos[:args.photos] if args.pick == "first" else pick_mixed(photos, args.photos)) \
            if args.photos else photos
        images = subset_images(chosen, args.data, args.out) if args.photos else args.data / "images"
        report["photos"] = len(chosen)
        report["accuracy"] = accuracy(chosen, version, images, args.out, args.batch)
    if args.cost:
        report["cost"] = cost(photos, version, args.cost, args.batch, args.out, None)
        if args.pg:
            report["cost"] += cost(photos, version, args.cost, args.batch, args.out, args.pg)
    name = f"policy_{f'{args.pick}{args.photos}' if args.photos else 'all'}.json"
    (args.out / name).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
