"""Interleaved speed comparison: our whole `index` vs the OpenCV bare loop on the same photos.

Ours is what `facecluster index` does, decode to database row: read and hash each file,
skip bytes already indexed, decode, detect, align, blur, embed, trash and gender, and
one SQLite transaction per photo (a fresh database file each round). The bare loop
reads, detects with YuNet and embeds with SFace, and stores nothing. The two run
alternately, several rounds, in one process, so a busy or throttled machine slows both
alike; prints wall and CPU ms per photo per round and the medians. Settings come from
FACECLUSTER_* variables as usual (e.g. FACECLUSTER_PRECISION=f32).

    python benchmarks/speed_ab.py [--photos 320] [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import cv2

from facecore import models
from facecore.pipeline import FacePipeline
from facecore.settings import load_settings
from services.indexing import index_items
from services.store.db import make_engine, migrate, session_factory

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=REPO.parent / "shared/data/lfw-dev/images")
    ap.add_argument("--photos", type=int, default=320)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    files = sorted(str(p) for p in args.dir.rglob("*.jpg"))
    files = files[:: max(1, len(files) // args.photos)][: args.photos]

    cv2.setNumThreads(args.threads)
    yunet = cv2.FaceDetectorYN.create(str(models.resolve("yunet")[0]), "", (320, 320), 0.7)
    sface = cv2.FaceRecognizerSF.create(str(models.resolve("sface")[0]), "")

    def bare_loop() -> None:
        for f in files:
            im = cv2.imread(f)
            yunet.setInputSize((im.shape[1], im.shape[0]))
            _, faces = yunet.detect(im)
            for face in faces if faces is not None else []:
                sface.feature(sface.alignCrop(im, face))

    pipeline = FacePipeline(load_settings(threads=args.threads))
    tmp = tempfile.TemporaryDirectory()
    runs = iter(range(1_000_000))

    def ours() -> None:
        engine = make_engine(f"sqlite:///{tmp.name}/round{next(runs)}.db")
        migrate(engine)
        summary = index_items(pipeline, session_factory(engine), "bench", [(f, Path(f)) for f in files])
        engine.dispose()
        assert summary.indexed == len(files), summary.failures

    ours(), bare_loop()  # warm-up: model load, first allocations
    res: dict[str, list[tuple[float, float]]] = {"facecluster": [], "opencv_bare_loop": []}
    for r in range(args.rounds):
        for name, fn in (("facecluster", ours), ("opencv_bare_loop", bare_loop)):
            c, t = time.process_time(), time.perf_counter()
            fn()
            wall, cpu = (time.perf_counter() - t) * 1000 / len(files), (time.process_time() - c) * 1000 / len(files)
            res[name].append((wall, cpu))
            print(f"round {r}: {name:17s} wall {wall:6.1f} ms/photo  cpu {cpu:6.1f} ms/photo", flush=True)
    summary = {k: {"wall_ms_median": statistics.median(w for w, _ in v),
                   "cpu_ms_median": statistics.median(c for _, c in v)} for k, v in res.items()}
    summary["photos"] = len(files)
    s = pipeline.settings
    summary["config"] = {"backend": models.choose_backend(s.backend, s.providers), "precision": s.precision,
                         "batch_size": s.batch_size, "batches_in_flight": s.batches_in_flight, "threads": args.threads}
    print(json.dumps(summary))
    tmp.cleanup()


if __name__ == "__main__":
    main()
