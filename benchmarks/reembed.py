"""What switching a library's embedder costs and gives: `facecluster reembed` on LFW-dev.

Takes a library that `benchmarks/product.py` indexed with the default embedder, puts its photos
into an object store (as `facecluster publish` does), copies the database, and times the
re-embedding job with another embedder, re-clustering included. The migrated library is then
scored like a product run (OUTDIR/NAME_scores.tsv, NAME_faces.csv, NAME_score.json), so it can
be compared with a fresh index made with that embedder.

    python benchmarks/product.py --out out/bench                      # -> out/bench/product.db
    python benchmarks/reembed.py --library out/bench/product.db --out out/bench [--embedder w600k-mbf]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from facecore.pipeline import FacePipeline
from facecore.settings import load_settings
from services import bus as busmod
from services.indexing import folder_items
from services.publish import publish_photos
from services.reembed import reembed_library
from services.store.db import make_engine, migrate, session_factory
from services.store.models import Face

from product import score_library
from score import DEFAULT_DATA


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", type=Path, required=True, help="SQLite file of a product.py run (left unchanged)")
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--embedder", default="w600k-mbf")
    ap.add_argument("--name", help="output prefix (default: reembed_<embedder>)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    name = args.name or f"reembed_{args.embedder.replace('-', '_')}"
    prefix = args.out / name
    db = prefix.with_suffix(".db")
    shutil.copyfile(args.library, db)
    url = f"sqlite:///{db}"
    settings = load_settings(database_url=url, threads=args.threads, default_user="bench", embedder=args.embedder)

    store = args.out / "objects"
    bus = busmod.connect(f"memory://reembed-bench-{uuid.uuid4().hex}")
    bus.ensure_topics()
    t = time.perf_counter()
    published = publish_photos(bus, store, "bench", folder_items(args.data / "images"), max_bytes=settings.max_bytes)
    print(f"object store {store}: {published.published} photos, {published.stored_bytes / 1e6:.1f} MB new, "
          f"{time.perf_counter() - t:.1f}s")

    engine = make_engine(url)
    migrate(engine)  # a library indexed by older code, as `facecluster reembed` would find it
    sessions = session_factory(engine)
    with engine.connect() as c:
        before = dict(c.execute(sa.select(Face.model_version, sa.func.count()).group_by(Face.model_version)).all())
    pipeline = FacePipeline(settings)
    cpu0 = time.process_time()
    summary = reembed_library(sessions, pipeline, store, bus, ["bench"], batch_size=settings.batch_size,
                              max_bytes=settings.max_bytes, min_size=settings.min_cluster_size)
    cpu = time.process_time() - cpu0
    pipeline.close()
    with engine.connect() as c:
        after = dict(c.execute(sa.select(Face.model_version, sa.func.count()).group_by(Face.model_version)).all())
    engine.dispose()
    clustered = summary.clustered["bench"]
    n = max(summary.photos, 1)
    timing = {
        "run": name, "library": str(args.library), "faces_before": before, "faces_after": after,
        "photos": summary.photos, "faces": summary.faces, "failures": len(summary.failures),
        "wall_s": summary.seconds, "cluster_s": clustered.seconds,
        "ms_per_photo": {**{k: 1000 * v / n for k, v in pipeline.timer.seconds.items()},
                         "total": 1000 * (summary.seconds - clustered.seconds) / n},
        "cpu_ms_per_photo": 1000 * cpu / n,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": args.threads,
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "embedder": summary.model_version,
    }
    Path(f"{prefix}_timing.json").write_text(json.dumps(timing, indent=1))
    print(json.dumps(timing))

    print(json.dumps(score_library(url, "bench", prefix, args.data)))

if __name__ == "__main__":
    main()
