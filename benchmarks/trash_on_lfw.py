"""How many LFW-dev faces the shipped trash centroid flags under the current settings.

The centroid's threshold is set on single-crop vectors (``calibrate_trash.py``); this
checks it against the vectors the index actually stores, e.g. with flip TTA:

    FACECLUSTER_FLIP_TTA=1 python benchmarks/trash_on_lfw.py
    FACECLUSTER_EMBEDDER=w600k-mbf python benchmarks/trash_on_lfw.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facecore.pipeline import FacePipeline, batched
from facecore.settings import load_settings
from facecore.verify import central_face

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/lfw-dev")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    pipe = FacePipeline(load_settings(threads=args.threads))
    if pipe.trash is None:
        raise SystemExit(f"no trash centroid fits {pipe.model_version}")
    photos = sorted((args.data / "images").rglob("*.jpg"))
    central, every = [], []
    try:
        for chunk in tqdm(list(batched(photos, 32)), desc="index"):
            for r in pipe.process([(str(p), p) for p in chunk]):
                face = central_face(r)
                if face is not None and face.trash_score is not None:
                    central.append(face.trash_score)
                every += [f.trash_score for f in r.faces if f.trash_score is not None]
    finally:
        pipe.close()
    c, e = np.array(central), np.array(every)
    print(json.dumps({"embedder": pipe.model_version, "centroid": pipe.trash.version,
                      "threshold": pipe.trash.threshold, "central_faces": len(c),
                      "central_max": float(c.max()), "central_flagged": int((c >= pipe.trash.threshold).sum()),
                      "faces": len(e), "faces_flagged": int((e >= pipe.trash.threshold).sum())}, indent=2))


if __name__ == "__main__":
    main()
