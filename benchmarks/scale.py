"""Clustering one user of up to a million synthetic faces: time, peak memory, quality.

    python benchmarks/scale.py --faces 1000000 --json
    python benchmarks/scale.py --faces 100000 --recall     # also the IVF kNN's recall@k against exact

Faces come from benchmarks/synth_faces.py (persons, vectors and photos shaped like SFace
on LFW-dev). ``recluster_s`` is ``facecore.graph_cluster.graph_cluster`` on all faces but
the held-out ones, with the one-person-per-photo rule; ``recluster_peak_rss_mb`` the
process's peak RSS after it (the generated faces included). ``bcubed_f1`` is against
the generator's persons.

Assignment is the simplest honest version: the clusters' normalised mean vectors go into
a faiss index (exact inner product up to 20,000 clusters, IVF beyond), and each held-out
face is searched alone (one query per call, as a face arriving at the cluster worker
would be); it joins the nearest cluster when the similarity reaches 1 - cut, else starts
one. The index is not updated after an assignment. ``assign_p50_ms``/``assign_p99_ms``
are the per-face latencies of that search and decision.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_faces import generate  # noqa: E402

from facecore import graph_cluster as gc  # noqa: E402
from facecore.cluster import DEFAULT_DISTANCE  # noqa: E402


def bcubed_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """BCubed F1 (Amigo et al. 2009); a face labelled -1 is a cluster of its own."""
    pred = pred.copy()
    lone = pred < 0
    pred[lone] = pred.max() + 1 + np.arange(lone.sum())
    _, p = np.unique(pred, return_inverse=True)
    _, t = np.unique(truth, return_inverse=True)
    _, pt, both = np.unique(p.astype(np.int64) * (t.max() + 1) + t, return_inverse=True, return_counts=True)
    inter = both[pt].astype(np.float64)
    prec = (inter / np.bincount(p)[p]).mean()
    rec = (inter / np.bincount(t)[t]).mean()
    return float(2 * prec * rec / (prec + rec))


def knn_recall(x: np.ndarray, k: int, min_similarity: float, queries: int = 2000, seed: int = 0) -> dict:
    """recall@k of graph_cluster's IVF kNN against exact search, on a sample of faces; and
    the recall of the exact neighbours at or above ``min_similarity`` (those that can merge)."""
    rng = np.random.default_rng(seed)
    q = np.sort(rng.choice(len(x), min(queries, len(x)), replace=False))
    _, approx = gc.knn_graph(x, k, exact=False)
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    es, exact = flat.search(x[q], k + 1)
    hits, near, near_hits = 0, 0, 0
    for j, i in enumerate(q):
        own = exact[j] != i
        e, s = exact[j][own][:k], es[j][own][:k]
        found = set(approx[i])
        hits += len(set(e) & found)
        close = e[s >= min_similarity]
        near += len(close)
        near_hits += sum(int(c) in found for c in close)
    return {"knn_recall_at_k": round(hits / (len(q) * k), 4),
            "knn_recall_above_cut": round(near_hits / max(near, 1), 4)}


def assign_latency(x: np.ndarray, labels: np.ndarray, new: np.ndarray, max_distance: float) -> dict:
    ok = labels >= 0
    ids, inv = np.unique(labels[ok], return_inverse=True)
    cent = np.zeros((len(ids), x.shape[1]), np.float32)
    np.add.at(cent, inv, x[ok])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    d = x.shape[1]
    if len(ids) <= 20_000:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * np.sqrt(len(ids)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(cent[np.random.default_rng(0).choice(len(cent), min(len(cent), 64 * nlist), replace=False)])
        index.nprobe = gc.NPROBE
    index.add(cent)
    lat, joined = [], 0
    for v in new:
        t = time.perf_counter()
        s, i = index.search(v[None], 1)
        joined += bool(s[0, 0] >= 1 - max_distance)
        lat.append(time.perf_counter() - t)
    lat = np.array(lat) * 1000
    return {"assign_p50_ms": round(float(np.percentile(lat, 50)), 3),
            "assign_p99_ms": round(float(np.percentile(lat, 99)), 3),
            "assign_joined": round(joined / len(new), 4), "assign_index": type(index).__name__}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="faiss and BLAS threads (default 1)")
    ap.add_argument("--cut", type=float, default=DEFAULT_DISTANCE)
    ap.add_argument("--assign", type=int, default=1000, help="faces held out and assigned one by one")
    ap.add_argument("--recall", action="store_true", help="also measure the IVF kNN's recall@k (slow: an exact search)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    g = generate(args.faces, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    held = np.zeros(args.faces, bool)
    held[rng.choice(args.faces, min(args.assign, args.faces // 10), replace=False)] = True
    x, person, photo = g.x[~held], g.person[~held], g.photo[~held]
    t = time.perf_counter()
    labels = gc.graph_cluster(x, args.cut, photos=photo)
    recluster_s = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"faces": args.faces, "persons": int(len(np.unique(g.person))), "threads": args.threads,
           "knn": "exact" if len(x) <= gc.EXACT_MAX_FACES else f"ivf nprobe={gc.NPROBE}",
           "recluster_s": round(recluster_s, 2), "recluster_peak_rss_mb": round(rss),
           "clusters": int(len(np.unique(labels[labels >= 0]))),
           "bcubed_f1": round(bcubed_f1(labels, person), 4)}
    out.update(assign_latency(x, labels, g.x[held], args.cut))
    if args.recall:
        out.update(knn_recall(x, gc.KNN, 1 - args.cut))
    if not args.json:
        print(f"{args.faces} faces, {out['persons']} persons, {args.threads} thread(s), pid {os.getpid()}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
