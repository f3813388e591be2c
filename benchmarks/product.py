"""Measure facecluster itself the way peers.py measures the peers, writing the same files.

LFW mode: `index` of all LFW-dev photos into a fresh SQLite file (timed per stage, peak
RSS), `cluster`, `export` -> OUTDIR/product_faces.csv, and pair scores from the stored
embeddings of each photo's central face -> OUTDIR/product_scores.tsv (the same vectors
`facecluster verify` computes). --photos-dir mode only times `index` over any folder.

    python benchmarks/product.py --out out/bench [--threads 2] [--name product]
    python benchmarks/product.py --photos-dir DIR --out out/bench
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

from facecore.embed import embedder_version
from facecore.models import choose_backend
from facecore.pipeline import FacePipeline
from facecore.settings import load_settings
from facecore.verify import read_pairs
from services.clustering import cluster_user
from services.indexing import folder_items, index_items
from services.store import repository as repo
from services.store.db import make_engine, migrate, session_factory

from score import DEFAULT_DATA, score_clusters, score_pairs

FIELDS = ["photo", "face", "x1", "y1", "x2", "y2", "score", "blur", "person", "gender"]


def central_faces(rows: list[dict], face_ids: set[int], images: Path) -> dict[str, int]:
    """Each photo's face nearest the centre (LFW's named person) among faces that have a vector."""
    from PIL import Image

    best: dict[str, tuple[float, int]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for r in rows:
        if r["face_id"] not in face_ids:
            continue
        p = r["photo"]
        if p not in sizes:
            with Image.open(images / p) as im:
                sizes[p] = im.size
        w, h = sizes[p]
        d = ((r["x1"] + r["x2"]) / 2 - w / 2) ** 2 + ((r["y1"] + r["y2"]) / 2 - h / 2) ** 2
        if p not in best or d < best[p][0]:
            best[p] = (d, r["face_id"])
    return {p: face for p, (_, face) in best.items()}


def pair_scores(pairs, left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> np.ndarray:
    """Cosine of each pair's first photo's vector in ``left`` and second's in ``right``; -1 if missing."""
    out = np.full(len(pairs), -1.0)
    for i, (a, b) in enumerate(pairs):
        if a in left and b in right:
            out[i] = float(left[a] @ right[b])
    return out


def load_run(url: str, user: str) -> tuple[list[dict], dict[int, np.ndarray]]:
    """Export rows and face vectors of one user of an index database."""
    engine = make_engine(url)
    try:
        migrate(engine)  # an index made by older code, as the CLI would bring it up to date
        with session_factory(engine)() as s:
            uid = repo.get_or_create_user(s, user).id
            rows = list(repo.export_rows(s, uid))
            ids, x = repo.user_embeddings(s, uid)
    finally:
        engine.dispose()
    return rows, dict(zip(ids.tolist(), x))


def fresh_library(db: Path, threads: int):
    """Settings, engine and sessions of a new, migrated SQLite library at ``db`` (an old one is removed)."""
    for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        f.unlink(missing_ok=True)
    settings = load_settings(database_url=f"sqlite:///{db}", threads=threads, default_user="bench")
    engine = make_engine(settings.database_url)
    migrate(engine)
    return settings, engine, session_factory(engine)


def score_library(url: str, user: str, prefix: Path, data: Path) -> dict:
    """Export a user's LFW-dev library as PREFIX_faces.csv and its central faces' pair scores as
    PREFIX_scores.tsv, and score both with the scorer (also written to PREFIX_score.json)."""
    rows, vectors = load_run(url, user)
    with open(f"{prefix}_faces.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    central = {p: vectors[f] for p, f in central_faces(rows, set(vectors), data / "images").items()}
    scores = pair_scores(read_pairs(data / "pairs.txt"), central, central)
    Path(f"{prefix}_scores.tsv").write_text("score\n" + "".join(f"{s:.6f}\n" for s in scores))
    result = {"verification": score_pairs(Path(f"{prefix}_scores.tsv"), data),
              "clustering": score_clusters(Path(f"{prefix}_faces.csv"), data)}
    Path(f"{prefix}_score.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--photos-dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--name", default="product")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    images = args.photos_dir or args.data / "images"
    prefix = args.out / (f"{args.name}_photos" if args.photos_dir else args.name)
    db = prefix.with_suffix(".db")
    settings, _, sessions = fresh_library(db, args.threads)
    t0 = time.perf_counter()
    pipeline = FacePipeline(settings)
    load_s = time.perf_counter() - t0
    items = folder_items(images)
    cpu0 = time.process_time()
    summary = index_items(pipeline, sessions, "bench", items)
    cpu = time.process_time() - cpu0
    pipeline.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = max(summary.seen, 1)
    timing = {
        "peer": args.name, "photos": summary.seen, "indexed": summary.indexed, "failed": summary.failed,
        "faces": summary.faces, "blurry_faces": summary.blurry_faces,
        "photos_per_s": summary.seen / summary.seconds, "wall_s": summary.seconds, "model_load_s": load_s,
        "cpu_ms_per_photo": 1000 * cpu / n,
        "ms_per_photo": {**{k: 1000 * v / n for k, v in summary.stage_seconds.items()},
                         "total": 1000 * summary.seconds / n},
        "peak_rss_mb": rss, "threads": args.threads, "cpu_count": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
        "config": {"min_face_size": settings.min_face_size,
                   "embedder": embedder_version(settings.embedder, settings.flip_tta, settings.embedding_head),
                   "batch_size": settings.batch_size, "batches_in_flight": settings.batches_in_flight,
                   "backend": choose_backend(settings.backend, settings.providers), "precision": settings.precision},
        "platform": platform.platform(),
    }
    if not args.photos_dir:
        t = time.perf_counter()
        cs = cluster_user(sessions, "bench", pipeline.model_version)
        timing["cluster_s"] = time.perf_counter() - t
        timing["clusters"] = cs.clusters
        print(json.dumps(score_library(settings.database_url, "bench", prefix, args.data)))
    Path(f"{prefix}_timing.json").write_text(json.dumps(timing, indent=1))
    print(json.dumps(timing))


if __name__ == "__main__":
    main()
