"""Clustering with bounded memory (facecore.graph_cluster) against today's exact clustering."""

import sys
from pathlib import Path

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from facecore import cluster as fc
from facecore import graph_cluster as gc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synth_faces import generate  # noqa: E402


def same_partition(p, q):
    pairs = set(zip(np.asarray(p).tolist(), np.asarray(q).tolist()))
    return len(pairs) == len(set(np.asarray(p).tolist())) == len(set(np.asarray(q).tolist()))


def test_sparse_linkage_on_a_complete_graph_is_exact_average_linkage():
    for seed in range(3):
        g = generate(300, seed=seed)
        exact = fcluster(linkage(g.x.astype(np.float64), "average", "cosine"), t=0.56, criterion="distance")
        assert same_partition(gc.sparse_cluster(g.x, 0.56, k=len(g.x)), exact)


def test_sparse_linkage_equals_scipy_on_the_graphs_distance_matrix():
    """With k < n, missing pairs count as distance 1: exact average linkage of that matrix."""
    from scipy.spatial.distance import squareform
    g = generate(400, seed=3)
    n = len(g.x)
    a, b, s = gc.edges_from_knn(*gc.knn_graph(g.x, 8))
    d = np.ones((n, n))
    d[a, b] = d[b, a] = 1 - s
    np.fill_diagonal(d, 0)
    exact = fcluster(linkage(squareform(d, checks=False), "average"), t=0.56, criterion="distance")
    assert same_partition(gc.sparse_average_linkage(n, a, b, s, 0.56), exact)


def test_graph_cluster_equals_cluster_with_photos():
    g = generate(2000, seed=1)
    assert np.array_equal(gc.graph_cluster(g.x, 0.56, photos=g.photo), fc.cluster(g.x, 0.56, photos=g.photo))


def test_one_face_per_photo_same_choice_as_cluster_module():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 20, 300)
    photos = rng.integers(0, 60, 300)
    ours = gc.one_face_per_photo(x, labels, photos)
    theirs = fc.one_face_per_photo(x, labels, photos)
    assert same_partition(ours, theirs)
    key = ours * 1000 + photos
    assert len(np.unique(key)) == len(key)


def test_respects_one_person_per_photo_when_two_faces_are_near_identical():
    g = generate(500, seed=2)
    x, photo = g.x.copy(), g.photo.copy()
    x[1] = x[0]  # a mirror image: the same vector twice in one photo
    photo[1] = photo[0]
    labels = gc.graph_cluster(x, 0.56, photos=photo)
    assert labels[0] != labels[1]
    assert gc.sparse_cluster(x, 0.56, photos=photo)[0] != gc.sparse_cluster(x, 0.56, photos=photo)[1]


def test_memory_stays_linear_in_edges():
    """No n x n: a 12,000-face user (its condensed float64 distances, what scipy's linkage
    needs, would be 576 MB) clusters in far less; the sparse step's arrays are O(n k) by
    construction (edges_from_knn)."""
    import resource
    g = generate(12_000, seed=4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    labels = gc.sparse_cluster(g.x, 0.56, k=16, photos=g.photo)
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(labels) == 12_000 and grew_mb < 200


def test_cell_edges_probing_every_cell_finds_every_pair_at_the_threshold():
    g = generate(3000, seed=5)
    a, b, s = gc.cell_edges(g.x, 0.44, cap=3000, cell_size=300, probe=10)
    sim = g.x @ g.x.T
    i, j = np.nonzero(np.triu(sim >= 0.44, 1))
    assert set(zip(a.tolist(), b.tolist())) == set(zip(i.tolist(), j.tolist()))
    assert np.allclose(s, sim[a, b], atol=1e-5)
    # each face keeps at most cap pairs of each cell it probes, the most similar ones
    a, b, s = gc.cell_edges(g.x, 0.44, cap=2, cell_size=300, probe=10)
    assert 0 < len(a) <= len(g.x) * 2 * 10
    assert set(zip(a.tolist(), b.tolist())) <= set(zip(i.tolist(), j.tolist()))
    best = sim.copy()
    np.fill_diagonal(best, -1)
    top = np.argmax(best, 1)
    has = best.max(1) >= 0.44
    assert {(min(f, t), max(f, t)) for f, t in zip(np.flatnonzero(has), top[has])} <= set(zip(a.tolist(), b.tolist()))


def test_the_cells_path_is_exact_average_linkage_per_component_when_its_graph_is_complete():
    """Components of the pairs at 0.5 (the first of cluster.cluster's steps at or above the
    cut's 0.44), then exact linkage per component (those up to BATCH_MAX faces in one
    vectorised call): with every such pair in the graph, scipy's average linkage of each
    component of the full similarity matrix."""
    from scipy.sparse.csgraph import connected_components
    for seed in range(2):
        g = generate(3000, seed=seed)
        sim = g.x @ g.x.T
        np.fill_diagonal(sim, 0)
        comp = connected_components(sim >= 0.5, directed=False)[1]
        exact = np.zeros(len(g.x), np.int64)
        for c in np.unique(comp):
            m = np.flatnonzero(comp == c)
            exact[m] = c * len(g.x) + (fc.average_linkage(g.x[m], 0.56) if len(m) > 1 else 0)
        ours = gc.graph_cluster(g.x, 0.56, k=3000, exact_max=0, cell_size=300, probe=10)
        assert same_partition(ours, exact)


def test_the_cells_path_splits_an_oversized_component_and_keeps_one_face_per_photo():
    g = generate(3000, seed=6)
    labels = gc.graph_cluster(g.x, 0.56, exact_max=0, dense_max=100, cell_size=300, probe=4, photos=g.photo)
    assert (labels >= 0).all()
    key = labels * (g.photo.max() + 1) + g.photo
    assert len(np.unique(key)) == len(key)
    # every cluster of the split is still a cluster that average linkage would accept: its
    # faces' mean pairwise similarity reaches the cut
    for c in np.unique(labels):
        m = np.flatnonzero(labels == c)
        if len(m) > 1:
            sim = g.x[m] @ g.x[m].T
            assert sim[np.triu_indices(len(m), 1)].mean() >= 0.44 - 1e-6
