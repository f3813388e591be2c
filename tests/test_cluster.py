"""Clustering: graph components, exact average linkage, stable relabelling."""

import numpy as np

from facecore import cluster as fc
from facecore.cluster import average_linkage, cluster, components, knn, relabel_by_size
from facecore.embed import l2_normalize


def blobs(n_per=20, k=5, dim=32, spread=0.15, seed=0):
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.normal(size=(k, dim)))
    x = np.concatenate([centres[i] + spread * rng.normal(size=(n_per, dim)) / np.sqrt(dim) for i in range(k)])
    return l2_normalize(x).astype(np.float32), np.repeat(np.arange(k), n_per)


def test_separated_blobs_are_recovered_exactly():
    x, truth = blobs()
    labels = cluster(x, 0.55)
    # a perfect clustering is a bijection between labels and truth
    pairs = set(zip(labels.tolist(), truth.tolist()))
    assert len(pairs) == len(set(truth)) == len(set(labels))


def test_average_linkage_cut_by_hand():
    # three unit vectors: a, b 0.1 rad apart, c at 90 degrees
    a, b, c = [1, 0], [np.cos(0.1), np.sin(0.1)], [0, 1]
    x = np.array([a, b, c], np.float64)
    # cosine distance a-b = 1 - cos(0.1) ~ 0.005; {a,b} to c averages 1 - (0 + sin 0.1)/2 ~ 0.95
    assert average_linkage(x, 0.5).tolist() in ([0, 0, 1], [1, 1, 0])
    assert len(set(average_linkage(x, 0.96).tolist())) == 1


def test_components_and_knn():
    x, truth = blobs(n_per=5, k=3)
    sims, idx = knn(x, 4)
    assert sims.shape == (15, 4) and np.all(idx != np.arange(15)[:, None])
    comp = components(sims, idx, 0.5)
    assert len(set(comp.tolist())) == 3


def test_min_size_and_relabel():
    assert relabel_by_size(np.array([5, 5, 2, -1, 2, 2])).tolist() == [1, 1, 0, -1, 0, 0]
    x, _ = blobs(n_per=4, k=2)
    lone = l2_normalize(np.ones((1, x.shape[1]), np.float32))
    labels = cluster(np.concatenate([x, lone]), 0.3, min_size=2)
    assert labels[-1] == -1 and (labels[:-1] >= 0).all()


def test_empty():
    assert cluster(np.zeros((0, 8), np.float32)).shape == (0,)


def test_two_faces_of_one_photo_never_share_a_cluster():
    x, truth = blobs(n_per=6, k=2, seed=3)
    photos = np.arange(len(x))
    photos[1] = photos[0]  # faces 0 and 1: one person, one photo (a mirror, a poster)
    photos[6] = photos[2]  # faces 2 and 6: different people in one photo, nothing to undo
    free = cluster(x, 0.55)
    assert free[0] == free[1]  # unconstrained, the two faces of photo 0 are one person
    labels = cluster(x, 0.55, photos=photos)
    assert labels[0] != labels[1]
    # the face that matches the rest of its person stays with it
    rest = [i for i in range(6) if i not in (0, 1)]
    kept = 0 if x[0] @ x[rest].mean(0) >= x[1] @ x[rest].mean(0) else 1
    assert all(labels[kept] == labels[i] for i in rest)
    assert sum(labels == labels[1 - kept]) == 1  # the other one is on its own
    for lab in np.unique(labels):  # no cluster has two faces of one photo
        assert len(set(photos[labels == lab])) == (labels == lab).sum()
    # everything else is as without the constraint
    others = [i for i in range(len(x)) if i not in (0, 1)]
    assert len(set(zip(labels[others].tolist(), free[others].tolist()))) == len(set(labels[others].tolist()))


def test_each_embedder_gets_its_own_cut(caplog):
    assert fc.calibrated_distance("sface-2021dec") == fc.DEFAULT_DISTANCE
    assert fc.calibrated_distance("sface-2021dec+flip") == fc.DEFAULT_DISTANCE  # flip TTA keeps the scale
    assert fc.calibrated_distance("w600k-mbf") == fc.calibrated_distance("w600k-mbf+flip") == 0.66
    assert not caplog.records
    # a head (or any model given by path) changes the scale: SFace's cut, and a warning saying so
    with caplog.at_level("WARNING", logger="facecore.cluster"):
        assert fc.calibrated_distance("sface-2021dec+metric_head-01d14c8e38a2") == fc.DEFAULT_DISTANCE
    assert "no clustering cut was calibrated for sface-2021dec+metric_head" in caplog.text


def test_cluster_worker_cut_follows_the_model_unless_one_is_set():
    import threading

    from services.cluster_worker.worker import ClusterWorker

    calibrated = ClusterWorker(None, None, threading.Event())
    assert calibrated.cut("w600k-mbf") == 0.66 and calibrated.cut("sface-2021dec+flip") == fc.DEFAULT_DISTANCE
    assert ClusterWorker(None, None, threading.Event(), max_distance=0.5).cut("w600k-mbf") == 0.5


def test_knn_on_the_cpu_where_faiss_has_no_gpu(caplog):
    """The CPU branch of the GPU path's kNN (faiss-cpu here; faiss-gpu-cu12 has the same module):
    above the GPU threshold it still builds a CPU index and finds the exact neighbours."""
    import faiss
    import pytest

    cl = fc
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss sees a GPU here")
    cl._gpu_resources.cache_clear()
    with caplog.at_level("INFO", logger="facecore.cluster"):
        index = cl.flat_ip_index(16, cl.GPU_KNN_MIN_FACES)
    assert type(index) is faiss.IndexFlatIP
    assert any("faiss kNN runs on the CPU" in r.message for r in caplog.records)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(cl.GPU_KNN_MIN_FACES + 10, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims, idx = knn(x, 5)
    probe = rng.choice(len(x), 20, replace=False)
    full = x[probe] @ x.T
    full[np.arange(20), probe] = -np.inf  # self excluded
    np.testing.assert_array_equal(idx[probe], np.argsort(-full, axis=1)[:, :5])
    np.testing.assert_allclose(sims[probe], np.sort(full, axis=1)[:, ::-1][:, :5], rtol=1e-5, atol=1e-5)
