"""Milliseconds per photo for detection (MTCNN) and embedding (SFace) at batch sizes 1 to 256,
on each ONNX Runtime provider asked for: TensorRT (SFace in float16, MTCNN in float32 as the
detector asks; engine cache on disk), CUDA, and the CPU for reference. Run by benchmarks/gpu.sh on a machine with an NVIDIA GPU.

Photos: the first --photos of LFW-dev (sorted by name), decoded once. Detection at batch b:
``MTCNN.detect`` on b photos at a time, over all the photos. Embedding at batch b: the aligned
crops of every face found, b faces per SFace run (flip TTA off, as indexing runs it),
reported per photo and per face. Each (provider, batch) pair is run once untimed first, then
--reps times; the median pass is reported. The models are loaded (and TensorRT's engines
built) before any timing: "load" is construction plus one pass at the largest batch, and
"reload" is the same a second time, when TensorRT reads its engines from the cache.

    python benchmarks/gpu_batches.py --providers TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider
    python benchmarks/gpu_batches.py --providers CPUExecutionProvider --batches 1,8 --photos 16   # dry run, no GPU

``--knn 1000,4000,16000`` also times the clustering's exact kNN with faiss on the CPU and
on the GPU, which is where facecore.cluster.GPU_KNN_MIN_FACES should be set.

``--write-docs docs/BENCHMARKS.md`` replaces the section between the markers
``<!-- gpu-batches:start -->`` and ``<!-- gpu-batches:end -->`` with the table; it refuses
to when no GPU provider ran, so a CPU dry run never stands in for GPU figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from score import DEFAULT_DATA

START, END = "<!-- gpu-batches:start -->", "<!-- gpu-batches:end -->"
ACCELERATORS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
SHORT = {"TensorrtExecutionProvider": "TensorRT", "CUDAExecutionProvider": "CUDA",
         "CPUExecutionProvider": "CPU"}


def machine() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        return "; ".join(line.strip() for line in out.splitlines()) or "no GPU"
    except (OSError, subprocess.SubprocessError):
        return "no GPU (nvidia-smi not found or failed)"


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("onnxruntime-gpu", "onnxruntime", "tensorrt-cu12", "faiss-gpu-cu12", "faiss-cpu"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def load_photos(data: Path, n: int, max_side: int) -> list[np.ndarray]:
    from facecore.decode import load

    paths = sorted((data / "images").rglob("*.jpg"))[:n]
    if len(paths) < n:
        raise SystemExit(f"{data / 'images'}: {len(paths)} photos, {n} asked for")
    return [load(p, max_bytes=100 << 20, max_pixels=80_000_000, max_side=max_side).rgb for p in paths]


def timed(fn, reps: int) -> float:
    fn()  # untimed: new shapes (cuDNN's search, a profile switch) settle here
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def models_for(provider: str, threads: int):
    """(detector, embedder, seconds to construct) on this provider alone (with the CPU under it)."""
    from facecore.detect import MTCNN
    from facecore.embed import Embedder

    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    t = time.perf_counter()
    det = MTCNN(providers=providers, threads=threads, backend="onnxruntime")
    emb = Embedder("sface", providers=providers, threads=threads, flip_tta=False, backend="onnxruntime")
    return det, emb, time.perf_counter() - t


def running(det, emb) -> dict:
    return {"pnet": det.pnet.session.get_providers()[0], "rnet": det.rnet.session.get_providers()[0],
            "onet": det.onet.session.get_providers()[0], "sface": emb.session.get_providers()[0]}


def bench_provider(provider: str, photos: list[np.ndarray], batches: list[int], reps: int, threads: int) -> dict:
    from facecore.align import align_faces

    top = max(batches)
    det, emb, construct_s = models_for(provider, threads)
    ran = running(det, emb)
    t = time.perf_counter()
    dets = [d for i in range(0, len(photos), top) for d in det.detect(photos[i:i + top])]
    crops = np.concatenate([align_faces(im, d.landmarks) for im, d in zip(photos, dets) if len(d.landmarks)]
                           or [np.zeros((0, 112, 112, 3), np.uint8)])
    if len(crops):
        emb.embed(crops, batch_size=top)
    load_s = construct_s + time.perf_counter() - t
    del det, emb
    det, emb, construct_s = models_for(provider, threads)  # again: TensorRT now loads its engines from the cache
    t = time.perf_counter()
    det.detect(photos[:top])
    if len(crops):
        emb.embed(crops[:top], batch_size=top)
    reload_s = construct_s + time.perf_counter() - t

    rows = []
    n, faces = len(photos), len(crops)
    for b in batches:
        d = timed(lambda: [det.detect(photos[i:i + b]) for i in range(0, n, b)], reps)
        e = timed(lambda: emb.embed(crops, batch_size=b), reps) if faces else float("nan")
        rows.append({"batch": b, "detect_ms_per_photo": 1000 * d / n, "embed_ms_per_photo": 1000 * e / n,
                     "embed_ms_per_face": 1000 * e / max(faces, 1)})
        print(f"{SHORT.get(provider, provider):14s} batch {b:4d}: detect {rows[-1]['detect_ms_per_photo']:8.2f} "
              f"ms/photo, embed {rows[-1]['embed_ms_per_photo']:8.2f} ms/photo "
              f"({rows[-1]['embed_ms_per_face']:.3f} ms/face)", flush=True)
    return {"provider": provider, "running": ran, "load_s": load_s, "reload_s": reload_s, "faces": faces,
            "rows": rows}


def bench_knn(sizes: list[int], reps: int) -> list[dict]:
    """facecore.cluster's exact kNN (k = 32) of n random 128-d unit vectors, faiss on the CPU
    and, where it has one, on the GPU: where GPU_KNN_MIN_FACES should sit."""
    import faiss

    from facecore.cluster import KNN

    res = faiss.StandardGpuResources() if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() else None
    rows = []
    for n in sizes:
        x = np.random.default_rng(n).normal(size=(n, 128)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)

        def run(gpu: bool) -> None:
            index = faiss.IndexFlatIP(128)
            if gpu:
                index = faiss.index_cpu_to_gpu(res, 0, index)
            index.add(x)
            index.search(x, KNN + 1)

        row = {"faces": n, "cpu_ms": 1000 * timed(lambda: run(False), reps)}
        if res is not None:
            row["gpu_ms"] = 1000 * timed(lambda: run(True), reps)
        rows.append(row)
        print(f"kNN {n:7d} faces: CPU {row['cpu_ms']:9.1f} ms, GPU {row.get('gpu_ms', float('nan')):9.1f} ms",
              flush=True)
    return rows


def table(results: list[dict], photos: int) -> str:
    lines = []
    for r in results:
        ran = ", ".join(f"{k} {SHORT.get(v, v)}" for k, v in r["running"].items())
        lines.append(f"- **{SHORT.get(r['provider'], r['provider'])}** (running: {ran}): load (with any engine "
                     f"build) {r['load_s']:.1f} s, reload {r['reload_s']:.1f} s; {r['faces']} faces in "
                     f"{photos} photos")
    lines += ["", "| provider | batch | detection ms/photo | embedding ms/photo | embedding ms/face |",
              "|---|---:|---:|---:|---:|"]
    for r in results:
        for row in r["rows"]:
            lines.append(f"| {SHORT.get(r['provider'], r['provider'])} | {row['batch']} | "
                         f"{row['detect_ms_per_photo']:.2f} | {row['embed_ms_per_photo']:.2f} | "
                         f"{row['embed_ms_per_face']:.3f} |")
    return "\n".join(lines)


def knn_table(rows: list[dict]) -> str:
    lines = ["| faces | kNN on the CPU, ms | kNN on the GPU, ms |", "|---:|---:|---:|"]
    for r in rows:
        gpu = f"{r['gpu_ms']:.1f}" if "gpu_ms" in r else "no GPU"
        lines.append(f"| {r['faces']:,} | {r['cpu_ms']:.1f} | {gpu} |")
    return "\n".join(lines)


def write_docs(path: Path, body: str) -> None:
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path}: no {START} ... {END} section to replace")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{START}\n{body}\n{END}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LFW-dev folder (default: ../shared/data/lfw-dev)")
    ap.add_argument("--providers", default="TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider",
                    help="providers to measure, each on its own, comma-separated")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--cpu-batches", help="batch sizes for the CPU provider (default: --batches)")
    ap.add_argument("--photos", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per model; 0 = one per core")
    ap.add_argument("--max-side", type=int, default=2048)
    ap.add_argument("--trt-cache", type=Path, default=Path("var/tensorrt"),
                    help="TensorRT engine cache (FACECLUSTER_TRT_CACHE) for this run")
    ap.add_argument("--knn", default="", help="also time the clustering kNN at these face counts, e.g. "
                    "1000,4000,16000,64000")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--write-docs", type=Path, help="replace the gpu-batches section of this file (GPU runs only)")
    args = ap.parse_args()
    # the models' log lines say which provider runs each of them, and why not another
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)

    batches = [int(b) for b in args.batches.split(",")]
    cpu_batches = [int(b) for b in (args.cpu_batches or args.batches).split(",")]
    # the models read the GPU options from the settings, as in the service
    os.environ["FACECLUSTER_TRT_CACHE"] = str(args.trt_cache)
    os.environ["FACECLUSTER_BATCH_SIZE"] = str(max(batches))
    os.environ["FACECLUSTER_ACCELERATOR_BATCH"] = str(max(batches))
    os.environ["FACECLUSTER_MAX_SIDE"] = str(args.max_side)
    photos = load_photos(args.data, args.photos, args.max_side)
    results = []
    for p in args.providers.split(","):
        results.append(bench_provider(p, photos, cpu_batches if p == "CPUExecutionProvider" else batches,
                                      args.reps, args.threads))
    knn_rows = bench_knn([int(n) for n in args.knn.split(",")], args.reps) if args.knn else []
    command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    head = (f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}; "
            f"{', '.join(f'{k} {v}' for k, v in versions().items())}; `{command}`; the first "
            f"{args.photos} LFW-dev photos, decoded to at most {args.max_side} px, median of {args.reps} passes.")
    body = head + "\n\n" + table(results, args.photos)
    if knn_rows:
        body += "\n\nThe clustering's exact kNN (faiss, k = 32, random 128-d unit vectors):\n\n" + knn_table(knn_rows)
    print("\n" + body)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "versions": versions(), "command": command,
                                         "photos": args.photos, "results": results, "knn": knn_rows}, indent=1))
    if args.write_docs:
        if not any(v in ACCELERATORS for r in results for v in r["running"].values()):
            raise SystemExit("no model ran on a GPU provider: the docs keep their GPU table")
        write_docs(args.write_docs, body)
        print(f"wrote {args.write_docs}")


if __name__ == "__main__":
    main()
