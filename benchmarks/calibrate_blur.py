"""Calibrate the blur threshold on LFW-dev with synthetic Gaussian blur.

For every central face of the LFW-dev pair photos: the blur score of the aligned crop,
then of the same crop blurred with sigma 1..4 px (in 112x112 crop pixels), and how far
the blurred crop's embedding moves from the sharp one. The threshold is the highest
score that flags at most ``--max-sharp-flagged`` of the untouched faces; the output
shows what share of each blur level it catches and what those embeddings lost.

    python benchmarks/calibrate_blur.py [--data ../shared/data/lfw-dev] [--limit 1500]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from facecore import decode
from facecore.align import align_faces
from facecore.detect import MTCNN
from facecore.embed import Embedder
from facecore.quality import DEFAULT_BLUR_THRESHOLD, blur_scores
from facecore.verify import read_pairs

REPO = Path(__file__).resolve().parents[1]
SIGMAS = (1.0, 1.5, 2.0, 3.0, 4.0)


def central_crops(data: Path, limit: int) -> np.ndarray:
    photos = sorted({p for pair in read_pairs(data / "pairs.txt") for p in pair})[:limit]
    det = MTCNN(threads=2)
    crops = []
    for i in tqdm(range(0, len(photos), 32), desc="detect"):
        ims = [decode.load(data / "images" / p, max_bytes=1 << 27, max_pixels=1 << 26).rgb for p in photos[i:i + 32]]
        for im, d in zip(ims, det.detect(ims)):
            if len(d):
                c = np.array([im.shape[1] / 2, im.shape[0] / 2])
                k = int(np.argmin((((d.boxes[:, :2] + d.boxes[:, 2:]) / 2 - c) ** 2).sum(1)))
                crops.append(align_faces(im, d.landmarks[k:k + 1])[0])
    return np.stack(crops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/lfw-dev")
    ap.add_argument("--limit", type=int, default=1500)
    ap.add_argument("--max-sharp-flagged", type=float, default=0.001)
    ap.add_argument("--threshold", type=float, default=DEFAULT_BLUR_THRESHOLD,
                    help="also report what this threshold flags (default: the shipped one)")
    args = ap.parse_args()
    crops = central_crops(args.data, args.limit)
    emb = Embedder("sface", threads=2, flip_tta=False)
    sharp = blur_scores(crops)
    e0 = emb.embed(crops)
    threshold = float(np.quantile(sharp, args.max_sharp_flagged))
    rows = {"faces": len(crops), "quantile_threshold": threshold, "shipped_threshold": args.threshold,
            "sharp": {"flagged": float(np.mean(sharp < threshold)),
                      "flagged_by_shipped": float(np.mean(sharp < args.threshold)),
                      "median_score": float(np.median(sharp))}}
    for s in SIGMAS:
        blurred = np.stack([cv2.GaussianBlur(c, (0, 0), s) for c in crops])
        b = blur_scores(blurred)
        cos = np.sum(emb.embed(blurred) * e0, axis=1)
        rows[f"sigma_{s}"] = {"flagged": float(np.mean(b < threshold)),
                              "flagged_by_shipped": float(np.mean(b < args.threshold)),
                              "median_score": float(np.median(b)),
                              "median_cos_to_sharp": float(np.median(cos))}
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
