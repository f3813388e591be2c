"""Clustering for users with up to a million faces, with bounded memory.

``cluster.cluster`` runs scipy's exact average linkage inside each connected component
of a kNN graph. ``graph_cluster`` here takes the same steps, so it gives the same labels
where today's code can run (identical on LFW-dev), but nothing of size n x n is built
and no step loops over all faces once per component:

1. a kNN graph from faiss: exact (IndexFlatIP) up to ``EXACT_MAX_FACES`` faces, an
   inverted-file index (IndexIVFFlat) beyond; benchmarks/scale.py measures its recall;
2. components at a loose similarity, a component above ``dense_max`` faces split again
   at a stricter one (its own faces' kNN, searched again up to EXACT_MAX_FACES, else the
   whole graph's edges inside it), exact linkage inside a component of at most
   ``dense_max`` faces (a dense_max^2 matrix at most);
3. where the split reaches the cut and a component is still larger (today's code would
   build its full matrix there), average linkage over its kNN edges only,
   ``sparse_average_linkage``: a pair of faces with no edge counts as cosine similarity 0
   (distance 1, "far"). That is *exact* average linkage of a modified distance matrix
   (kNN edges keep their cosine, all other pairs sit at 1), so with a complete graph
   (k >= n - 1) it is exact average linkage. The approximation: a pair outside each
   other's k nearest counts as far. Merges run as reciprocal-nearest-neighbour rounds
   (RAC): every pair of clusters that are each other's most similar neighbour, above
   the cut, merges in the same round; average linkage is reducible, so this gives the
   clusters of merging one pair at a time. The similarity of clusters A and B is
   S(A, B) / (|A| |B|), S the summed similarity of the edges between them, which merges
   add up. A cluster whose every edge is below the cut can never merge again (a merge
   averages edges), so it leaves the graph with its edges. Memory is O(n k).
4. one person once per photo, as ``cluster.one_face_per_photo`` decides it (the face most
   similar to the cluster's faces from other photos stays, the others become clusters of
   their own), vectorised.

``sparse_cluster`` is step 3 alone on the whole kNN graph (no components, no dense step).
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from .cluster import (DEFAULT_DISTANCE, KNN, LOOSE_SIMILARITY, MAX_COMPONENT, average_linkage, components,
                      relabel_by_size)

log = logging.getLogger(__name__)

# Exact kNN up to this many faces; an IVF index beyond (benchmarks/scale.py measured the
# crossing point and IVF's recall, docs/BENCHMARKS.md "Million-face users").
EXACT_MAX_FACES = 20_000
# IVF: about 4 sqrt(n) lists, trained on up to 64 faces per list, searched in NPROBE lists
IVF_LISTS_PER_SQRT_N = 4
NPROBE = 16
SEARCH_BLOCK = 16384


def knn_graph(x: np.ndarray, k: int = KNN, *, exact: bool | None = None, nprobe: int = NPROBE,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """kNN of L2-normalised rows by inner product: (similarities, indices), both (n, k),
    self excluded; index -1 where the search found fewer than k neighbours."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    k1 = min(k + 1, n)
    if exact is None:
        exact = n <= EXACT_MAX_FACES
    if exact:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = max(16, int(IVF_LISTS_PER_SQRT_N * np.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = x[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))]
        index.train(train)
        index.nprobe = nprobe
    index.add(x)
    sims = np.empty((n, k1), np.float32)
    idx = np.empty((n, k1), np.int64)
    for s in range(0, n, SEARCH_BLOCK):
        sims[s:s + SEARCH_BLOCK], idx[s:s + SEARCH_BLOCK] = index.search(x[s:s + SEARCH_BLOCK], k1)
    # drop self (usually column 0; with ties or IVF it may sit elsewhere or be missing)
    is_self = idx == np.arange(n)[:, None]
    has_self = is_self.any(1)
    drop = np.where(has_self, is_self.argmax(1), k1 - 1)
    keep = np.ones((n, k1), bool)
    keep[np.arange(n), drop] = False
    sims = sims[keep].reshape(n, k1 - 1)
    idx = idx[keep].reshape(n, k1 - 1)
    return sims, idx


def edges_from_knn(sims: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected edges (a < b, each once) with their similarity, from a kNN table."""
    n, k = idx.shape
    a = np.repeat(np.arange(n, dtype=np.int64), k)
    b = idx.ravel().astype(np.int64)
    s = sims.ravel()
    ok = (b >= 0) & (b != a)
    a, b, s = a[ok], b[ok], s[ok]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = lo * n + hi
    del a, b, lo, hi
    order = np.argsort(key, kind="stable")
    key, s = key[order], s[order]
    first = np.ones(len(key), bool)
    first[1:] = key[1:] != key[:-1]
    key, s = key[first], s[first]
    return key // n, key % n, s.astype(np.float64)


def sparse_average_linkage(n: int, a: np.ndarray, b: np.ndarray, s: np.ndarray,
                           max_distance: float = DEFAULT_DISTANCE) -> np.ndarray:
    """Average-linkage clusters of n items cut at max_distance, given only the edges
    (a, b, cosine similarity s); absent pairs count as similarity 0. -> (n,) labels."""
    threshold = 1.0 - max_distance
    label = np.arange(n, dtype=np.int64)       # item -> active cluster id (ids are items)
    size = np.ones(n, np.float64)
    rounds = 0
    while len(a):
        rounds += 1
        avg = s / (size[a] * size[b])
        # each cluster's best neighbour: highest average, ties to the lowest id
        best = np.full(n, -np.inf)
        np.maximum.at(best, a, avg)
        np.maximum.at(best, b, avg)
        partner = np.full(n, n, np.int64)
        ta = avg == best[a]
        np.minimum.at(partner, a[ta], b[ta])
        tb = avg == best[b]
        np.minimum.at(partner, b[tb], a[tb])
        # a cluster with no edge at the cut is final: it and its edges leave
        live = best >= threshold
        keep = live[a] & live[b]
        a, b, s, avg = a[keep], b[keep], s[keep], avg[keep]
        # reciprocal pairs above the cut merge into the lower id
        merge = (avg >= threshold) & (partner[a] == b) & (partner[b] == a)
        if not merge.any():
            break
        into = np.arange(n, dtype=np.int64)
        into[b[merge]] = a[merge]
        size[a[merge]] += size[b[merge]]
        a, b = into[a], into[b]
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        ok = lo != hi
        key = lo[ok] * n + hi[ok]
        s = s[ok]
        uniq, inv = np.unique(key, return_inverse=True)
        s = np.bincount(inv, weights=s, minlength=len(uniq))
        a, b = uniq // n, uniq % n
        label = into[label]
    log.debug("sparse average linkage: %d rounds", rounds)
    return np.unique(label, return_inverse=True)[1].astype(np.int64)


def one_face_per_photo(x: np.ndarray, labels: np.ndarray, photos: np.ndarray) -> np.ndarray:
    """``cluster.one_face_per_photo`` without a loop over clusters: the same choice of the
    face that stays (most similar to the mean of the cluster's faces from other photos;
    the first face where the cluster has no other photo)."""
    labels = labels.copy()
    ok = np.flatnonzero(labels >= 0)
    if len(ok) == 0:
        return labels
    _, pinv = np.unique(photos[ok], return_inverse=True)
    key = labels[ok] * (pinv.max() + 1) + pinv
    gid, ginv, gcount = np.unique(key, return_inverse=True, return_counts=True)
    dup = gcount[ginv] > 1
    if not dup.any():
        return labels
    faces = ok[dup]
    g = ginv[dup]
    c = labels[faces]
    ucl, cinv = np.unique(labels[ok], return_inverse=True)
    csum = np.zeros((len(ucl), x.shape[1]))
    np.add.at(csum, cinv, x[ok])
    ccount = np.bincount(cinv).astype(np.float64)
    ug, gi = np.unique(g, return_inverse=True)
    gsum = np.zeros((len(ug), x.shape[1]))
    np.add.at(gsum, gi, x[faces])
    gn = np.bincount(gi).astype(np.float64)
    ci = np.searchsorted(ucl, c)
    others = ccount[ci] - gn[gi]
    other_sum = csum[ci] - gsum[gi]
    score = np.einsum("ij,ij->i", x[faces].astype(np.float64), other_sum)
    score[others == 0] = 0.0
    # the keeper per group: highest score, ties (and no others) to the lowest face index
    order = np.lexsort((faces, -score, gi))
    firsts = np.ones(len(order), bool)
    firsts[1:] = gi[order][1:] != gi[order][:-1]
    split = faces[order[~firsts]]
    start = int(labels.max()) + 1
    labels[np.sort(split)] = start + np.arange(len(split))
    return labels


def _groups(comp: np.ndarray) -> list[np.ndarray]:
    """Members of each component, without a scan of all faces per component."""
    order = np.argsort(comp, kind="stable")
    _, counts = np.unique(comp[order], return_counts=True)
    return np.split(order, np.cumsum(counts)[:-1])


def graph_cluster(x: np.ndarray, max_distance: float = DEFAULT_DISTANCE, *, k: int = KNN,
                  loose_similarity: float = LOOSE_SIMILARITY, dense_max: int = MAX_COMPONENT,
                  min_size: int = 1, photos: np.ndarray | None = None, exact_knn: bool | None = None,
                  nprobe: int = NPROBE) -> np.ndarray:
    """(n, d) L2-normalised embeddings -> (n,) labels, like ``cluster.cluster`` but with
    bounded memory; -1 for faces in clusters below min_size.

    The same steps as ``cluster.cluster``: kNN components at ``loose_similarity``, a
    component above ``dense_max`` faces split again at a stricter similarity (kNN of its
    own faces), exact average linkage inside a component of at most ``dense_max`` faces
    (its dense matrix, dense_max^2 at most, never n^2). Where today's code would run
    exact linkage on a larger component (the split reached the cut), this runs average
    linkage over the component's kNN edges (``sparse_average_linkage``) instead.
    """
    n = len(x)
    labels = np.full(n, -1, np.int64)
    if n == 0:
        return labels
    x = np.ascontiguousarray(x, dtype=np.float32)
    sims, idx = knn_graph(x, k, exact=exact_knn, nprobe=nprobe)
    comp = components(sims, idx, loose_similarity)
    pos = np.full(n, -1, np.int64)

    def sub_knn(members):
        """kNN among a component's faces: searched again (as cluster.cluster does) up to
        EXACT_MAX_FACES faces, else the whole graph's edges inside the component."""
        if len(members) <= EXACT_MAX_FACES:
            return knn_graph(x[members], k, exact=True if exact_knn is None else exact_knn, nprobe=nprobe)
        pos[members] = np.arange(len(members))
        i2 = pos[idx[members]]
        s2 = np.where(i2 >= 0, sims[members], -np.inf).astype(np.float32)
        pos[members] = -1
        return s2, i2

    next_label = 0
    stack = [(m, loose_similarity) for m in _groups(comp)]
    while stack:
        members, sim = stack.pop()
        m = len(members)
        if m <= 2:
            if m == 1 or float(x[members[0]] @ x[members[1]]) < 1 - max_distance:
                local = np.arange(m)
            else:
                local = np.zeros(m, np.int64)
        elif m <= dense_max:
            local = average_linkage(x[members], max_distance)
        elif sim < 1 - max_distance:
            s2, i2 = sub_knn(members)
            sub = components(s2, i2, sim + 0.1)
            stack.extend((members[g], sim + 0.1) for g in _groups(sub))
            continue
        else:
            s2, i2 = sub_knn(members)
            local = sparse_average_linkage(m, *edges_from_knn(s2, i2), max_distance)
        labels[members] = local + next_label
        next_label += int(local.max()) + 1
    sims = idx = comp = None  # the kNN table is freed before the photo pass
    if photos is not None:
        labels = one_face_per_photo(x, labels, np.asarray(photos))
    if min_size > 1:
        _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
        labels[counts[inv] < min_size] = -1
    return relabel_by_size(labels)


def sparse_cluster(x: np.ndarray, max_distance: float = DEFAULT_DISTANCE, *, k: int = KNN,
                   photos: np.ndarray | None = None, exact_knn: bool | None = None,
                   nprobe: int = NPROBE) -> np.ndarray:
    """Average linkage over the whole kNN graph (no dense step at all): the pure sparse path,
    exact when k >= n - 1; on LFW-dev at k = 32 it is 0.04 BCubed F1 below ``graph_cluster``
    (docs/BENCHMARKS.md), so ``graph_cluster`` keeps it for oversized components only."""
    n = len(x)
    if n < 2:
        return np.zeros(n, np.int64)
    sims, idx = knn_graph(x, k, exact=exact_knn, nprobe=nprobe)
    labels = sparse_average_linkage(n, *edges_from_knn(sims, idx), max_distance)
    if photos is not None:
        labels = one_face_per_photo(x, labels, np.asarray(photos))
    return relabel_by_size(labels)
