"""Clustering one user of up to a million synthetic faces: time, peak memory, quality.

    OMP_NUM_THREADS=1 python benchmarks/scale.py --faces 1000000 --threads 2 --json
    OMP_NUM_THREADS=1 python benchmarks/scale.py --faces 100000 --recall   # also the graph's recall

Faces come from benchmarks/synth_faces.py (persons, vectors and photos shaped like SFace
on LFW-dev). ``recluster_s`` is ``facecore.graph_cluster.graph_cluster`` on all faces but
the held-out ones, with the one-person-per-photo rule, as the recluster job runs it;
``recluster_peak_rss_mb`` the process's peak RSS during it (the generated faces, which stay
resident, included; the peak is reset before it on Linux). ``bcubed_f1`` is against the
generator's persons.

Assignment is the cluster worker's: the clustered faces go into a ``facecore.assign.FaceIndex``
labelled with their clusters, and each held-out face is searched alone (one query per call,
as a face arriving at the cluster worker is) and filed by ``facecore.assign.assign``.
``assign_p50_ms``/``assign_p99_ms`` are the per-face latencies of that search and decision,
on one faiss thread.

``--lfw-vectors`` instead writes LFW-dev's clusters by each path for the independent scorer
(``lfw_score.py clusters IMAGES FACES.csv``): ``cluster.cluster`` (today's), ``graph_cluster``
as it runs there (exact kNN) and ``graph_cluster`` with the cells path forced (the path of
users above 20,000 faces)::

    python benchmarks/scale.py --lfw-vectors out/scale/lfw_dev_sface.npz --lfw-images DIR --out out/scale

``--recall`` also files the held-out faces by exact search (``assign_same_as_exact``: the
share the index files under the same person, or nobody, as exact search does), and compares
the cells path's graph (built here whatever the size) with exact
search for a sample of faces: the share of the pairs at or above the similarity it keeps
pairs from (``graph_cluster.cells_similarity``: 0.5 for the cut 0.56) that the cells found,
and of those of one person.
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
from facecore.assign import FaceIndex, assign  # noqa: E402
from facecore.cluster import DEFAULT_DISTANCE, KNN  # noqa: E402


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


def graph_recall(x: np.ndarray, person: np.ndarray, min_similarity: float, queries: int = 1000,
                 seed: int = 0) -> dict:
    """Share of the exact kNN graph's edges at or above ``min_similarity`` (each sampled
    face's KNN nearest) that ``cell_edges`` finds, all and same-person ones."""
    rng = np.random.default_rng(seed)
    q = np.sort(rng.choice(len(x), min(queries, len(x)), replace=False))
    a, b, _ = gc.cell_edges(x, min_similarity, cap=gc.KNN)
    found = set(zip(a.tolist(), b.tolist()))
    es, ei = faiss.knn(x[q], x, gc.KNN + 1, metric=faiss.METRIC_INNER_PRODUCT)
    near = hits = same = same_hits = 0
    for j, i in enumerate(q):
        for o, sim in zip(ei[j], es[j]):
            if o == i or sim < min_similarity:
                continue
            hit = (min(i, o), max(i, o)) in found
            near, hits = near + 1, hits + hit
            if person[o] == person[i]:
                same, same_hits = same + 1, same_hits + hit
    return {"graph_min_similarity": round(min_similarity, 3), "graph_recall": round(hits / max(near, 1), 4),
            "graph_recall_same_person": round(same_hits / max(same, 1), 4)}


def assign_latency(x: np.ndarray, labels: np.ndarray, new: np.ndarray, max_distance: float,
                   against_exact: bool = False) -> dict:
    ok = labels >= 0
    faiss.omp_set_num_threads(1)  # as the cluster worker searches: one face, one thread
    t = time.perf_counter()
    index = FaceIndex(x.shape[1])
    index.add(x[ok], labels[ok])
    build_s = time.perf_counter() - t
    lat, chosen = [], []
    for v in new:
        t = time.perf_counter()
        sims, idx = index.search(v[None], KNN)
        person, _ = assign(sims, idx, index.labels, max_distance)
        lat.append(time.perf_counter() - t)
        chosen.append(int(person[0]))
    lat = np.array(lat) * 1000
    out = {"assign_p50_ms": round(float(np.percentile(lat, 50)), 3),
           "assign_p99_ms": round(float(np.percentile(lat, 99)), 3),
           "assign_joined": round(float(np.mean(np.array(chosen) >= 0)), 4),
           "assign_index": "exact" if not index.approximate else "pq scan + exact re-rank",
           "assign_index_build_s": round(build_s, 2)}
    if against_exact and index.approximate:
        exact = FaceIndex(x.shape[1], exact_max=len(x))
        exact.add(x[ok], labels[ok])
        person, _ = assign(*exact.search(new, KNN), exact.labels, max_distance)
        out["assign_same_as_exact"] = round(float(np.mean(person == np.array(chosen))), 4)
    return out


def lfw_paths(vectors: Path, images: Path, out: Path, cut: float) -> None:
    """LFW-dev's faces (benchmarks/synth_faces.py extract) clustered by each path -> FACES.csv files."""
    import csv

    from facecore.cluster import cluster
    d = np.load(vectors)
    x, photo = d["x"].astype(np.float32), d["photo"]
    out.mkdir(parents=True, exist_ok=True)
    paths = {"exact": lambda: cluster(x, cut, photos=photo), "graph": lambda: gc.graph_cluster(x, cut, photos=photo),
             "cells": lambda: gc.graph_cluster(x, cut, photos=photo, exact_max=0)}
    root = str(images.resolve())
    for name, run in paths.items():
        labels = run()
        path = out / f"lfw_{name}_faces.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["photo", "x1", "y1", "x2", "y2", "person"])
            for uri, box, label in zip(d["uri"], d["box"], labels):
                rel = str(uri).removeprefix("file://").removeprefix(root).lstrip("/")
                w.writerow([rel, *(float(v) for v in box), int(label) if label >= 0 else ""])
        print(f"{name}: {len(np.unique(labels))} clusters -> lfw_score.py clusters {images} {path}")


def reset_peak_rss() -> None:
    """Linux: make the peak RSS start again from the current RSS (no-op elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="faiss threads, also the cells' thread pool (default 1; give BLAS one: OMP_NUM_THREADS=1)")
    ap.add_argument("--cut", type=float, default=DEFAULT_DISTANCE)
    ap.add_argument("--assign", type=int, default=1000, help="faces held out and assigned one by one")
    ap.add_argument("--recall", action="store_true",
                    help="also measure the graph's recall against exact search (slow: builds the graph again)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--lfw-vectors", type=Path, help="LFW-dev's SFace vectors (.npz of synth_faces.py extract): "
                    "write each path's clusters for lfw_score.py instead")
    ap.add_argument("--lfw-images", type=Path, help="the LFW-dev images folder the vectors were indexed from")
    ap.add_argument("--out", type=Path, default=Path("out/scale"), help="folder for --lfw-vectors' FACES.csv files")
    args = ap.parse_args(argv)
    if args.lfw_vectors:
        if not args.lfw_images:
            ap.error("--lfw-vectors needs --lfw-images")
        return lfw_paths(args.lfw_vectors, args.lfw_images, args.out, args.cut)
    faiss.omp_set_num_threads(args.threads)
    g = generate(args.faces, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    held = np.zeros(args.faces, bool)
    held[rng.choice(args.faces, min(args.assign, args.faces // 10), replace=False)] = True
    x, person, photo, new = g.x[~held], g.person[~held], g.photo[~held], g.x[held]
    n_persons = len(np.unique(g.person))
    del g  # one copy of the vectors resident, not two
    reset_peak_rss()
    t = time.perf_counter()
    labels = gc.graph_cluster(x, args.cut, photos=photo)
    recluster_s = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"faces": args.faces, "persons": int(n_persons), "threads": args.threads,
           "graph": "exact knn" if len(x) <= gc.EXACT_MAX_FACES else f"cells of {gc.CELL_SIZE}, probe {gc.CELL_PROBE}",
           "recluster_s": round(recluster_s, 2), "recluster_peak_rss_mb": round(rss),
           "clusters": int(len(np.unique(labels[labels >= 0]))),
           "bcubed_f1": round(bcubed_f1(labels, person), 4)}
    out.update(assign_latency(x, labels, new, args.cut, args.recall))
    if args.recall:
        out.update(graph_recall(x, person, gc.cells_similarity(args.cut)))
    if not args.json:
        print(f"{args.faces} faces, {out['persons']} persons, {args.threads} thread(s), pid {os.getpid()}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
