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
