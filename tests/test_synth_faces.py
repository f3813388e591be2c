"""The synthetic faces of benchmarks/synth_faces.py: reproducible by seed, shaped as fitted."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synth_faces import generate, load_params, pair_stats  # noqa: E402


def test_same_seed_same_faces_other_seed_other_faces():
    a, b, c = generate(3000, seed=7), generate(3000, seed=7), generate(3000, seed=8)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.person, b.person) and np.array_equal(a.photo, b.photo)
    assert not np.array_equal(a.x, c.x)


def test_shape_unit_rows_and_one_person_per_photo():
    g = generate(5000, seed=0)
    assert g.x.shape == (5000, load_params()["dim"]) and g.x.dtype == np.float32
    assert np.allclose(np.linalg.norm(g.x, axis=1), 1, atol=1e-5)
    pairs = g.photo * (g.person.max() + 1) + g.person
    assert len(np.unique(pairs)) == len(pairs)  # no person twice in a photo
    _, per_photo = np.unique(g.photo, return_counts=True)
    assert per_photo.max() > 1 and 1.05 < per_photo.mean() < 1.3  # LFW-dev: 1.13 faces per photo


def test_statistics_near_lfw_dev():
    """Within/between-person cosine and persons' sizes within tolerances of LFW-dev's figures
    (docs/BENCHMARKS.md, "Synthetic faces against LFW-dev")."""
    p = load_params()
    g = generate(p["faces"], seed=0)
    st = pair_stats(g.x, g.person, max_faces=4000)
    median_within, median_between = st["within"][3], st["between"][3]
    assert abs(median_within - 0.728) < 0.02
    assert abs(median_between - 0.107) < 0.02
    assert abs(st["singleton_persons"] - 0.715) < 0.04
    assert abs(len(np.unique(g.person)) / p["persons"] - 1) < 0.1
