"""Grouping a user's face embeddings into persons.

Exact average-linkage agglomeration needs all pairwise distances, which does not
scale to a photo library. A faiss kNN graph first splits the faces into connected
components at a loose similarity; average linkage then runs exactly inside each
component, which is small (one person's faces plus a few look-alikes).
"""

from __future__ import annotations

import logging
from functools import lru_cache

import faiss
import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .embed import vector_space

log = logging.getLogger(__name__)

# Cosine distance cut for average linkage, chosen on LFW-dev (benchmarks/tune_cluster.py,
# docs/BENCHMARKS.md): BCubed F1 is flat from 0.55 to 0.58 and falls off on both sides.
# The OpenCV bare-loop peer uses 0.55.
DEFAULT_DISTANCE = 0.56
# Each embedder has its own similarity scale, so each gets its own cut, chosen the same way:
# w600k-mbf is flat from 0.64 to 0.68 (BCubed F1 0.9935-0.9938) and is cut in the middle.
CALIBRATED_DISTANCE = {"sface-2021dec": DEFAULT_DISTANCE, "w600k-mbf": 0.66}
# Faces joined by a kNN edge above this similarity share a component; it must sit well
# below 1 - DEFAULT_DISTANCE so that no merge average linkage would make is cut away.
LOOSE_SIMILARITY = 0.2
KNN = 32
# a component larger than this is split again at a stricter similarity before linkage
MAX_COMPONENT = 4000


@lru_cache(maxsize=None)  # the cluster worker asks for every batch: warn once per version
def calibrated_distance(model_version: str) -> float:
    """The cut chosen for the embedder that made ``model_version`` vectors (flip TTA keeps
    the scale; an embedding head does not). A model without one gets SFace's, with a warning:
    calibrate it with benchmarks/tune_cluster.py and set FACECLUSTER_CLUSTER_THRESHOLD."""
    base = vector_space(model_version)
    if base not in CALIBRATED_DISTANCE:
        log.warning("no clustering cut was calibrated for %s; using %.2f, which was chosen for SFace",
                    model_version, DEFAULT_DISTANCE)
    return CALIBRATED_DISTANCE.get(base, DEFAULT_DISTANCE)


# Faces from which the kNN search moves to the GPU where faiss has one (the extra "gpu" installs
# faiss-gpu-cu12, the same ``faiss`` module): below it, copying to the device costs more than
# the CPU's exact search. A guess until benchmarks/gpu.sh has measured both on a GPU.
GPU_KNN_MIN_FACES = 4096


@lru_cache(maxsize=None)
def _gpu_resources():
    """faiss's GPU resources (streams, cuBLAS handles, scratch memory): one set per process.
    None where faiss has no GPU (faiss-cpu, or no device)."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        log.info("faiss kNN runs on the CPU (%s)", "no GPU visible" if hasattr(faiss, "StandardGpuResources")
                 else "faiss-cpu")
        return None
    log.info("faiss kNN runs on the GPU from %d faces (%d GPUs visible)", GPU_KNN_MIN_FACES, faiss.get_num_gpus())
    return faiss.StandardGpuResources()


def flat_ip_index(dim: int, n: int = 0):
    """An exact inner-product index: on GPU 0 when faiss has a GPU and ``n`` reaches
    GPU_KNN_MIN_FACES, else on the CPU."""
    index = faiss.IndexFlatIP(dim)
    res = _gpu_resources() if n >= GPU_KNN_MIN_FACES else None
    return faiss.index_cpu_to_gpu(res, 0, index) if res is not None else index


def knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product kNN of L2-normalised rows: (similarities, indices), self excluded."""
    n = len(x)
    k = min(k + 1, n)
    x = np.ascontiguousarray(x, dtype=np.float32)
    index = flat_ip_index(x.shape[1], n)
    index.add(x)
    sims, idx = index.search(x, k)
    return sims[:, 1:], idx[:, 1:]


def components(sims: np.ndarray, idx: np.ndarray, min_similarity: float) -> np.ndarray:
    """Connected components of the kNN graph restricted to edges above min_similarity."""
    n = len(sims)
    rows = np.repeat(np.arange(n), sims.shape[1])
    keep = (sims.ravel() >= min_similarity) & (idx.ravel() >= 0)
    g = coo_matrix((np.ones(keep.sum()), (rows[keep], idx.ravel()[keep])), shape=(n, n))
    return connected_components(g, directed=False)[1]


def average_linkage(x: np.ndarray, max_distance: float) -> np.ndarray:
    """Exact average-linkage clusters on cosine distance, cut at max_distance."""
    if len(x) == 1:
        return np.zeros(1, np.int64)
    z = linkage(x.astype(np.float64), method="average", metric="cosine")
    return fcluster(z, t=max_distance, criterion="distance").astype(np.int64) - 1


def cluster(x: np.ndarray, max_distance: float = DEFAULT_DISTANCE, *, k: int = KNN,
            loose_similarity: float = LOOSE_SIMILARITY, min_size: int = 1,
            photos: np.ndarray | None = None) -> np.ndarray:
    """(n, d) L2-normalised embeddings -> (n,) labels; -1 for faces in clusters below min_size.

    ``photos`` (n,), the photo of each face, forbids two faces of one photo in one cluster
    (see ``one_face_per_photo``).
    """
    n = len(x)
    labels = np.full(n, -1, np.int64)
    if n == 0:
        return labels
    sims, idx = knn(x, k)
    comp = components(sims, idx, loose_similarity)
    next_label = 0
    stack = [(np.flatnonzero(comp == c), loose_similarity) for c in np.unique(comp)]
    while stack:
        members, sim = stack.pop()
        if len(members) > MAX_COMPONENT and sim < 1 - max_distance:
            s2, i2 = knn(x[members], k)
            sub = components(s2, i2, sim + 0.1)
            stack.extend((members[sub == c], sim + 0.1) for c in np.unique(sub))
            continue
        local = average_linkage(x[members], max_distance)
        labels[members] = local + next_label
        next_label += int(local.max()) + 1
    if photos is not None:
        labels = one_face_per_photo(x, labels, np.asarray(photos))
    if min_size > 1:
        ids, counts = np.unique(labels, return_counts=True)
        labels[np.isin(labels, ids[counts < min_size])] = -1
    return relabel_by_size(labels)


def one_face_per_photo(x: np.ndarray, labels: np.ndarray, photos: np.ndarray) -> np.ndarray:
    """A person is in a photo once: where a cluster holds several faces of one photo, the
    face most similar to the cluster's faces from other photos stays and the others
    become clusters of their own (a twin, a poster, a mirror image: never the same album).

    Without faces from other photos to judge by, the first face stays.
    """
    labels = labels.copy()
    next_label = int(labels.max()) + 1 if len(labels) else 0
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        shared, counts = np.unique(photos[members], return_counts=True)
        for photo in shared[counts > 1]:
            same = members[photos[members] == photo]
            others = members[photos[members] != photo]
            keep = same[int(np.argmax(x[same] @ x[others].mean(0)))] if len(others) else same[0]
            for face in same[same != keep]:
                labels[face] = next_label
                next_label += 1
    return labels


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0.. by decreasing size (ties by first occurrence); -1 stays."""
    out = np.full_like(labels, -1)
    valid = labels >= 0
    if not valid.any():
        return out
    ids, first, inv, counts = np.unique(labels[valid], return_index=True, return_inverse=True, return_counts=True)
    order = np.lexsort((first, -counts))
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(len(ids))
    out[valid] = rank[inv]
    return out
