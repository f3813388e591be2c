"""Time every model of the pipeline on each CPU engine, on the shapes the pipeline feeds it.

Engines: ONNX Runtime (CPU provider), OpenVINO in float32 and in bfloat16 (where the CPU
has bfloat16 units; elsewhere OpenVINO computes that in float32), and, for SFace,
OpenCV's DNN engine as the bare loop runs it. Shapes: a P-Net canvas of one 250x250 LFW
photo's pyramid, 48 R-Net and 8 O-Net crops (the per-photo mean on LFW-dev), SFace at
batch 1 and 16. Prints ms per call (median of --reps) and the largest difference from
ONNX Runtime's outputs.

    python benchmarks/engines.py [--threads 2] [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import cv2
import joblib
import numpy as np
import onnx

from facecore.detect import layout_tiles, level_shape, pyramid_scales
from facecore.models import InferenceModel, make_batch_dynamic, resolve
from facecore.mtcnn_onnx import BUILDERS


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    _, canvases = layout_tiles([level_shape(250, 250, s) for s in pyramid_scales(250, 250, 20)])
    graphs = {f"mtcnn-{n}": b(joblib.load(resolve(f"mtcnn-{n}")[0])) for n, b in BUILDERS.items()}
    graphs["sface"] = make_batch_dynamic(onnx.load(str(resolve("sface")[0])))
    cases = [("mtcnn-pnet", "canvas of one photo", (1, 3, *canvases[0])),
             ("mtcnn-rnet", "48 crops", (48, 3, 24, 24)), ("mtcnn-onet", "8 crops", (8, 3, 48, 48)),
             ("sface", "1 face", (1, 3, 112, 112)), ("sface", "16 faces", (16, 3, 112, 112))]
    engines = {"onnxruntime": dict(backend="onnxruntime"), "openvino_f32": dict(backend="openvino", precision="f32"),
               "openvino_bf16": dict(backend="openvino", precision="bf16")}
    cv2.setNumThreads(args.threads)
    results = []
    for name, what, shape in cases:
        x = rng.uniform(-1, 1, shape).astype(np.float32)
        if name == "sface":
            x = rng.uniform(0, 255, shape).astype(np.float32)  # SFace normalises inside the graph
        ref = None
        row = {"model": name, "input": what}
        for engine, kw in engines.items():
            m = InferenceModel(graphs[name], threads=args.threads, **kw)
            out = m.predict(x)
            ref = out if ref is None else ref
            row[engine] = {"ms": round(timed(lambda: m.predict(x), args.reps), 3),
                           "max_abs_diff": float(max(np.abs(a - b).max() for a, b in zip(out, ref)))}
        if name == "sface":
            net = cv2.dnn.readNetFromONNX(np.frombuffer(graphs[name].SerializeToString(), np.uint8))

            def run_cv() -> np.ndarray:
                net.setInput(x)
                return net.forward()

            row["opencv_dnn"] = {"ms": round(timed(run_cv, args.reps), 3),
                                 "max_abs_diff": float(np.abs(run_cv() - ref[0]).max())}
        results.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
