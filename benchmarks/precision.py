"""Are vectors computed in bfloat16 interchangeable with float32 ones?

Takes two `benchmarks/product.py` runs over LFW-dev that differ only in
FACECLUSTER_PRECISION (say f32 and bf16) and reports, for each photo's central face:
the cosine between its two vectors, and verification accuracy when every pair is
scored across the runs (first photo from run A, second from run B), as it would be in
a library whose photos were indexed by machines of both kinds. The scorer judges the
cross scores like any other.

    FACECLUSTER_PRECISION=f32  python benchmarks/product.py --out out/prec --name f32
    FACECLUSTER_PRECISION=bf16 python benchmarks/product.py --out out/prec --name bf16
    python benchmarks/precision.py out/prec/f32.db out/prec/bf16.db --out out/prec
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from facecore.verify import read_pairs
from product import central_faces, load_run, pair_scores
from score import DEFAULT_DATA, score_pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="index database of run A (SQLite file)")
    ap.add_argument("b", type=Path, help="index database of run B")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--user", default="bench")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    images = args.data / "images"
    central = []
    for db in (args.a, args.b):
        rows, vectors = load_run(f"sqlite:///{db}", args.user)
        central.append({p: vectors[f] for p, f in central_faces(rows, set(vectors), images).items()})
    a, b = central
    common = sorted(set(a) & set(b))
    cos = np.array([float(a[p] @ b[p]) for p in common])
    pairs = read_pairs(args.data / "pairs.txt")
    result = {"photos_compared": len(common), "photos_only_in_one_run": len(set(a) ^ set(b)),
              "central_face_cosine": {"min": float(cos.min()), "p1": float(np.percentile(cos, 1)),
                                      "median": float(np.median(cos)), "mean": float(cos.mean())}}
    for name, left, right in (("a_a", a, a), ("b_b", b, b), ("a_b", a, b), ("b_a", b, a)):
        tsv = args.out / f"precision_pairs_{name}.tsv"
        tsv.write_text("score\n" + "".join(f"{s:.6f}\n" for s in pair_scores(pairs, left, right)))
        result[f"verification_{name}"] = score_pairs(tsv, args.data)
    (args.out / "precision.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
