"""Clustering for users with up to a million faces, with bounded memory.

``cluster.cluster`` runs scipy's exact average linkage inside each connected component
of a kNN graph. ``graph_cluster`` here takes the same steps, so it gives the same labels
where today's code can run (identical on LFW-dev), but nothing of size n x n is built
and no step loops over all faces once per component:

1. a kNN graph from faiss (exact inner product) and components at a loose similarity,
   a component above ``dense_max`` faces split again at a stricter one (its own faces'
   kNN), exact average linkage inside a component of at most ``dense_max`` faces (a
   dense_max^2 matrix at most);
2. where the split reaches the cut and a component is still larger (today's code would
   build its full matrix there), average linkage over its graph edges only,
   ``sparse_average_linkage``: a pair of faces with no edge counts as cosine similarity 0
   (distance 1, "far"). That is *exact* average linkage of a modified distance matrix
   (graph edges keep their cosine, all other pairs sit at 1), so with a complete graph
   it is exact average linkage. Merges run as reciprocal-nearest-neighbour rounds
   (RAC): every pair of clusters that are each other's most similar neighbour, above
   the cut, merges in the same round; average linkage is reducible, so this gives the
   clusters of merging one pair at a time. The similarity of clusters A and B is
   S(A, B) / (|A| |B|), S the summed similarity of the edges between them, which merges
   add up. A cluster whose every edge is below the cut can never merge again (a merge
   averages edges), so it leaves the graph with its edges. Memory is O(edges);
3. one person once per photo, as ``cluster.one_face_per_photo`` decides it (the face most
   similar to the cluster's faces from other photos stays, the others become clusters of
   their own), vectorised.

Above ``EXACT_MAX_FACES`` faces an exact kNN search costs n^2 d, so step 1 changes:
``cell_edges`` cuts the faces into cells of about ``CELL_SIZE`` by spherical k-means and
compares each face with the faces of its ``CELL_PROBE`` nearest cells, one matrix product
per cell, keeping each face's ``KNN`` most similar pairs at or above a similarity: the kNN
graph's edges there. On a user that large, ``cluster.cluster``'s components stay above
``dense_max`` faces at its loose similarity and each 0.1 step up to the first step at or
above the cut's similarity (0.5 for the cut 0.56), so the graph keeps the pairs from that
step; its components up to ``dense_max`` faces get exact average linkage of their faces,
larger ones are split 0.1 higher again, and only a part still too large at ``SPLIT_MAX``
gets the sparse step. What is approximate is the graph: a pair whose faces sit in cells
that are not probed is missed (benchmarks/scale.py measures the recall).

``sparse_cluster`` is step 2 alone on the whole kNN graph (no components, no dense step).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .cluster import (DEFAULT_DISTANCE, KNN, LOOSE_SIMILARITY, MAX_COMPONENT, average_linkage, components,
                      flat_ip_index, relabel_by_size)

log = logging.getLogger(__name__)

# Exact kNN up to this many faces; cell_edges beyond (docs/BENCHMARKS.md "Million-face users")
EXACT_MAX_FACES = 20_000
# cell_edges: faces per k-means cell, the nearest cells whose faces each face is compared
# with (its own included; 4 was 2x faster at 1M but lost 0.035 BCubed F1), and the k-means
# sample per cell (a coarse partition is all it needs)
CELL_SIZE = 1000
CELL_PROBE = 8
CELL_TRAIN = 32
SEARCH_BLOCK = 16384
# an oversized component is split at this much higher similarity each time, up to SPLIT_MAX
# (cluster.cluster's steps from its loose similarity)
SPLIT_STEP = 0.1
SPLIT_MAX = 0.9
# components up to this many faces are linked together in one vectorised call
BATCH_MAX = 64


def knn_graph(x: np.ndarray, k: int = KNN) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN of L2-normalised rows by inner product: (similarities, indices), both
    (n, k), self excluded; index -1 where there are fewer than k other faces."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    k1 = min(k + 1, n)
    index = flat_ip_index(d, n)  # on the GPU where faiss has one (cluster.GPU_KNN_MIN_FACES)
    index.add(x)
    sims = np.empty((n, k1), np.float32)
    idx = np.empty((n, k1), np.int64)
    for s in range(0, n, SEARCH_BLOCK):
        sims[s:s + SEARCH_BLOCK], idx[s:s + SEARCH_BLOCK] = index.search(x[s:s + SEARCH_BLOCK], k1)
    # drop self (usually column 0; with ties it may sit elsewhere)
    is_self = idx == np.arange(n)[:, None]
    has_self = is_self.any(1)
    drop = np.where(has_self, is_self.argmax(1), k1 - 1)
    keep = np.ones((n, k1), bool)
    keep[np.arange(n), drop] = False
    sims = sims[keep].reshape(n, k1 - 1)
    idx = idx[keep].reshape(n, k1 - 1)
    return sims, idx


def cell_edges(x: np.ndarray, min_similarity: float, *, cap: int = KNN, cell_size: int = CELL_SIZE,
               probe: int = CELL_PROBE, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of L2-normalised rows with cosine >= min_similarity, found through cells: the
    faces are cut into cells of about ``cell_size`` by spherical k-means, and each face is
    compared with the faces of its ``probe`` nearest cells, as one matrix product per cell
    (the faces that probe it against the faces in it), the cells in faiss's thread count
    of threads. A face keeps its ``cap`` most similar pairs (as a kNN graph with k = cap
    keeps its edges at the cut; an edge is kept when either face keeps it).
    -> undirected edges (a < b, each once) and their cosine.

    A matrix product and a threshold instead of a kNN index's per-query heaps: on two cores
    this is what makes a million faces take seconds, not minutes. Set the BLAS library to
    one thread (OMP_NUM_THREADS=1) so the cells, not BLAS, use the cores."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    nlist = max(1, n // cell_size)
    probe = min(probe, nlist)
    rng = np.random.default_rng(seed)
    km = faiss.Kmeans(d, nlist, niter=10, spherical=True, seed=seed, min_points_per_centroid=1,
                      max_points_per_centroid=CELL_TRAIN)
    km.train(x[np.sort(rng.choice(n, min(n, CELL_TRAIN * nlist), replace=False))])
    threads = max(1, faiss.omp_get_max_threads())
    nearest = np.empty((n, probe), np.int64)  # each face's probe nearest cells, its own first

    def near(start: int):
        sim = x[start:start + SEARCH_BLOCK] @ km.centroids.T
        rows = np.arange(len(sim))
        for j in range(probe):  # a few argmax passes beat a partial sort of every row
            nearest[start:start + SEARCH_BLOCK, j] = best = sim.argmax(1)
            sim[rows, best] = -np.inf

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(near, range(0, n, SEARCH_BLOCK)))
    inside = _by_cell(nearest[:, 0], nlist)
    probing = _by_cell(nearest.ravel(), nlist, per_face=probe)
    nearest = None  # freed before the cell products

    def one(c: int):
        q, members = probing[c], inside[c]
        sim = x[q] @ x[members].T
        hit = np.flatnonzero(sim.ravel() >= min_similarity)  # np.nonzero is ~5x slower here
        r, col = np.divmod(hit, len(members))
        s = sim.ravel()[hit]
        own = q[r] != members[col]
        r, col, s = r[own], col[own], s[own]
        count = np.bincount(r, minlength=len(q))
        if (count > cap).any():  # keep each row's cap most similar
            o = np.lexsort((-s, r))
            r, col, s = r[o], col[o], s[o]
            rank = np.arange(len(r)) - (np.cumsum(count) - count)[r]
            r, col, s = r[rank < cap], col[rank < cap], s[rank < cap]
        return q[r], members[col], s

    cells = [c for c in range(nlist) if len(inside[c]) and len(probing[c])]
    with ThreadPoolExecutor(threads) as pool:
        parts = [p for p in pool.map(one, cells) if len(p[0])]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    a = np.concatenate([p[0] for p in parts])
    b = np.concatenate([p[1] for p in parts])
    s = np.concatenate([p[2] for p in parts])
    del parts
    # each face's cap most similar over all its cells: the kNN graph's edges at the cut
    order = np.lexsort((-s, a))
    a, b, s = a[order], b[order], s[order]
    count = np.bincount(a, minlength=n)
    keep = np.arange(len(a)) - (np.cumsum(count) - count)[a] < cap
    a, b, s = a[keep], b[keep], s[keep]
    key = np.minimum(a, b) * n + np.maximum(a, b)
    del a, b
    key, first = np.unique(key, return_index=True)
    return key // n, key % n, s[first].astype(np.float64)


def _by_cell(cell: np.ndarray, nlist: int, per_face: int = 1) -> list[np.ndarray]:
    """Face numbers listed under each cell (``cell`` holds per_face cells per face, in order)."""
    order = np.argsort(cell, kind="stable")
    bounds = np.searchsorted(cell[order], np.arange(nlist + 1))
    faces = order // per_face
    return [faces[bounds[c]:bounds[c + 1]] for c in range(nlist)]


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


def _groups(comp: np.ndarray, faces: np.ndarray | None = None) -> list[np.ndarray]:
    """Members of each component (of ``faces`` only, if given), without a scan of all faces
    per component."""
    faces = np.arange(len(comp)) if faces is None else faces
    order = faces[np.argsort(comp[faces], kind="stable")]
    _, counts = np.unique(comp[order], return_counts=True)
    return np.split(order, np.cumsum(counts)[:-1])


def graph_cluster(x: np.ndarray, max_distance: float = DEFAULT_DISTANCE, *, k: int = KNN,
                  loose_similarity: float = LOOSE_SIMILARITY, dense_max: int = MAX_COMPONENT,
                  min_size: int = 1, photos: np.ndarray | None = None, exact_max: int = EXACT_MAX_FACES,
                  cell_size: int = CELL_SIZE, probe: int = CELL_PROBE) -> np.ndarray:
    """(n, d) L2-normalised embeddings -> (n,) labels, like ``cluster.cluster`` but with
    bounded memory; -1 for faces in clusters below min_size.

    Up to ``exact_max`` faces the same steps as ``cluster.cluster`` (so the same
    labels): kNN components at ``loose_similarity``, a component above ``dense_max`` faces
    split again at a stricter similarity (kNN of its own faces), exact average linkage
    inside a component of at most ``dense_max`` faces. Where today's code would run exact
    linkage on a larger component (the split reached the cut), this runs average linkage
    over the component's kNN edges (``sparse_average_linkage``) instead. Beyond
    ``exact_max``, the components of ``cell_edges``' graph at the cut (module docstring;
    ``cell_size`` and ``probe`` are its).
    """
    n = len(x)
    if n == 0:
        return np.full(0, -1, np.int64)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if n <= exact_max:
        labels = _cluster_exact_knn(x, max_distance, k, loose_similarity, dense_max)
    else:
        labels = _cluster_cells(x, max_distance, k, dense_max, cell_size, probe)
    if photos is not None:
        labels = one_face_per_photo(x, labels, np.asarray(photos))
    if min_size > 1:
        _, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
        labels[counts[inv] < min_size] = -1
    return relabel_by_size(labels)


def _cluster_exact_knn(x: np.ndarray, max_distance: float, k: int, loose_similarity: float,
                       dense_max: int) -> np.ndarray:
    n = len(x)
    labels = np.full(n, -1, np.int64)
    sims, idx = knn_graph(x, k)
    next_label = 0
    small = []  # components of 3 to BATCH_MAX faces, linked together at the end
    stack = [(m, loose_similarity) for m in _groups(components(sims, idx, loose_similarity))]
    while stack:
        members, sim = stack.pop()
        m = len(members)
        if m <= 2:
            if m == 1 or float(x[members[0]] @ x[members[1]]) < 1 - max_distance:
                local = np.arange(m)
            else:
                local = np.zeros(m, np.int64)
        elif m <= min(BATCH_MAX, dense_max):
            small.append(members)
            continue
        elif m <= dense_max:
            local = average_linkage(x[members], max_distance)
        elif sim < 1 - max_distance:
            s2, i2 = knn_graph(x[members], k)
            sub = components(s2, i2, sim + 0.1)
            stack.extend((members[g], sim + 0.1) for g in _groups(sub))
            continue
        else:
            s2, i2 = knn_graph(x[members], k)
            local = sparse_average_linkage(m, *edges_from_knn(s2, i2), max_distance)
        labels[members] = local + next_label
        next_label += int(local.max()) + 1
    if small:
        labels[np.concatenate(small)] = _batched_average_linkage(x, small, max_distance) + next_label
    return labels


def _cluster_cells(x: np.ndarray, max_distance: float, k: int, dense_max: int, cell_size: int,
                   probe: int) -> np.ndarray:
    """Average linkage per component of ``cell_edges``' graph, as ``cluster.cluster`` runs it
    on a large user: there the components at the loose similarity and every 0.1 above it
    stay over ``dense_max`` faces (LFW-dev's 6,958: 6,958, 6,954, 5,624) up to the first
    step at or above the cut's similarity (0.5 for the cut 0.56; 237 faces at most), and
    exact linkage runs inside those. So the graph here keeps the pairs at that similarity;
    a component of one or two faces is a cluster as it is, up to ``dense_max`` faces exact
    linkage of its matrix, and a larger one is split again by its own edges 0.1 higher
    each time, until its parts fit; the sparse step takes a part that still does not at
    ``SPLIT_MAX``."""
    start = cells_similarity(max_distance)
    n = len(x)
    a, b, s = cell_edges(x, start, cap=k, cell_size=cell_size, probe=probe)
    comp = _components(n, a, b)
    size = np.bincount(comp)
    labels = comp.copy()  # components of one or two faces keep their number
    next_label = len(size)
    pos = np.full(n, -1, np.int64)
    big = size > 2
    on_big = big[comp[a]]
    a, b, s = a[on_big], b[on_big], s[on_big]
    small = []  # parts of at most BATCH_MAX faces, linked together at the end
    stack = [(g, start) for g in _groups(comp, np.flatnonzero(big[comp]))]
    while stack:
        members, sim = stack.pop()
        m = len(members)
        if m <= BATCH_MAX:
            small.append(members)
            continue
        if m <= dense_max:
            local = average_linkage(x[members], max_distance)
        else:
            pos[members] = np.arange(m)
            inside = (pos[a] >= 0) & (pos[b] >= 0)
            la, lb, ls = pos[a[inside]], pos[b[inside]], s[inside]
            pos[members] = -1
            if sim + SPLIT_STEP <= SPLIT_MAX:
                strict = ls >= sim + SPLIT_STEP
                sub = _components(m, la[strict], lb[strict])
                stack.extend((members[g], sim + SPLIT_STEP) for g in _groups(sub))
                continue
            local = sparse_average_linkage(m, la, lb, ls, max_distance)
        labels[members] = local + next_label
        next_label += int(local.max()) + 1
    if small:
        labels[np.concatenate(small)] = _batched_average_linkage(x, small, max_distance) + next_label
    return labels


def cells_similarity(max_distance: float) -> float:
    """The similarity from which the cells path keeps pairs: the first of
    LOOSE_SIMILARITY + SPLIT_STEP * j (cluster.cluster's split steps) at or above the cut's."""
    similarity = 1.0 - max_distance
    return LOOSE_SIMILARITY + SPLIT_STEP * max(0, int(np.ceil((similarity - LOOSE_SIMILARITY) / SPLIT_STEP - 1e-9)))


def _batched_average_linkage(x: np.ndarray, groups: list[np.ndarray], max_distance: float) -> np.ndarray:
    """Exact average linkage of each group of faces on its own, all groups in one
    ``sparse_average_linkage`` over their complete graphs (exact on a complete graph; no
    edge joins two groups). One vectorised call instead of one scipy call per group, which
    costs ~0.5 ms of checks each: tens of seconds for a million faces' small components.
    -> labels of the faces of the groups, concatenated in order."""
    sizes = np.array([len(g) for g in groups])
    offsets = np.cumsum(sizes) - sizes
    a_parts, b_parts, s_parts = [], [], []
    for m in np.unique(sizes):
        which = np.flatnonzero(sizes == m)
        faces = np.stack([groups[i] for i in which])           # (groups of size m, m)
        i, j = np.triu_indices(m, 1)
        a_parts.append((offsets[which][:, None] + i).ravel())
        b_parts.append((offsets[which][:, None] + j).ravel())
        s_parts.append(np.einsum("gpd,gpd->gp", x[faces[:, i]], x[faces[:, j]]).ravel())
    a, b, s = (np.concatenate(p) for p in (a_parts, b_parts, s_parts))
    return sparse_average_linkage(int(sizes.sum()), a, b, s.astype(np.float64), max_distance)


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    g = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(g, directed=False)[1].astype(np.int64)


def sparse_cluster(x: np.ndarray, max_distance: float = DEFAULT_DISTANCE, *, k: int = KNN,
                   photos: np.ndarray | None = None) -> np.ndarray:
    """Average linkage over the whole kNN graph (no dense step at all): the pure sparse path,
    exact when k >= n - 1; on LFW-dev at k = 32 it is 0.04 BCubed F1 below ``graph_cluster``
    (docs/BENCHMARKS.md), so ``graph_cluster`` keeps it for oversized components only."""
    n = len(x)
    if n < 2:
        return np.zeros(n, np.int64)
    sims, idx = knn_graph(x, k)
    labels = sparse_average_linkage(n, *edges_from_knn(sims, idx), max_distance)
    if photos is not None:
        labels = one_face_per_photo(x, labels, np.asarray(photos))
    return relabel_by_size(labels)
