"""Filing new faces under persons (facecore.assign): the rule and the index it searches."""

import sys
from pathlib import Path

import numpy as np
import pytest

from facecore.assign import FaceIndex, assign, one_per_photo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from synth_faces import generate  # noqa: E402

CUT = 0.56


def reference(sims, idx, person_of, cut, top_k, rejected):
    """The rule written as a loop over each row's neighbours, nearest first."""
    out = []
    for row_sims, row_idx, never in zip(sims, idx, rejected):
        best: dict[int, list[float]] = {}
        for s, j in zip(row_sims, row_idx):
            if j >= 0 and int(person_of[j]) not in never:
                near = best.setdefault(int(person_of[j]), [])
                if len(near) < top_k:
                    near.append(float(s))
        if not best:
            out.append((-1, -np.inf))
            continue
        person, score = max(((p, float(np.mean(v))) for p, v in best.items()), key=lambda ps: ps[1])
        out.append((person if score > 1 - cut else -1, score))
    return out


def test_assign_equals_the_rule_written_as_a_loop():
    rng = np.random.default_rng(0)
    n, k = 400, 12
    sims = -np.sort(-rng.uniform(0, 1, (n, k)).astype(np.float32), axis=1)
    idx = rng.integers(-1, 60, (n, k))
    person_of = rng.integers(0, 8, 60) * 10
    rejected = [set(rng.choice(8, rng.integers(0, 3), replace=False) * 10) for _ in range(n)]
    for top_k in (1, 3):
        person, score = assign(sims, idx, person_of, CUT, top_k, rejected)
        expected = reference(sims, idx, person_of, CUT, top_k, rejected)
        assert person.tolist() == [p for p, _ in expected]
        np.testing.assert_allclose(score, [s for _, s in expected], rtol=1e-12)


def test_the_mean_of_a_persons_top_k_decides_not_its_nearest_face():
    sims = np.array([[0.9, 0.6, 0.3, 0.3]], np.float32)
    idx = np.array([[0, 1, 2, 3]])
    person_of = np.array([7, 8, 7, 7])  # 7: 0.9, 0.3, 0.3 (mean 0.5); 8: 0.6
    assert assign(sims, idx, person_of, CUT, top_k=3)[0].tolist() == [8]
    assert assign(sims, idx, person_of, CUT, top_k=1)[0].tolist() == [7]


def test_the_cut_is_strict_rejections_are_skipped_and_ties_go_to_the_person_met_first():
    idx = np.array([[0, 1]])
    person_of = np.array([5, 6])
    at_cut = np.array([[0.5, 0.4]], np.float32)
    person, score = assign(at_cut, idx, person_of, 0.5, top_k=1)
    assert person.tolist() == [-1] and score.tolist() == [0.5]
    above = np.array([[0.75, 0.75]], np.float32)
    assert assign(above, idx, person_of, 0.5, top_k=1)[0].tolist() == [5]
    assert assign(above, idx, person_of, 0.5, top_k=1, rejected=[{5}])[0].tolist() == [6]
    person, score = assign(above, idx, person_of, 0.5, top_k=1, rejected=[{5, 6}])
    assert person.tolist() == [-1] and score.tolist() == [-np.inf]


def test_rows_without_neighbours_pick_nobody():
    person, score = assign(np.zeros((2, 3), np.float32), np.full((2, 3), -1), np.zeros(0, np.int64), CUT)
    assert person.tolist() == [-1, -1] and np.isneginf(score).all()
    person, score = assign(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64), np.zeros(0, np.int64), CUT)
    assert len(person) == len(score) == 0


def test_one_face_per_photo_joins_each_person():
    photos = np.array([1, 1, 1, 2, 3, 3])
    person = np.array([4, 4, 5, 4, -1, -1])
    score = np.array([0.6, 0.7, 0.5, 0.9, 0.8, 0.8])
    assert one_per_photo(photos, person, score).tolist() == [False, True, True, True, False, False]
    ties = one_per_photo(np.array([1, 1]), np.array([4, 4]), np.array([0.6, 0.6]))
    assert ties.tolist() == [True, False]


def test_the_index_turns_approximate_past_its_bound_and_keeps_rows_and_labels():
    g = generate(3000, seed=1)
    index = FaceIndex(g.x.shape[1], exact_max=1000)
    index.add(g.x[:800], g.person[:800])
    assert not index.approximate and index.nbytes == 800 * (128 * 4 + 8)
    index.add(g.x[800:1200], g.person[800:1200])
    assert index.approximate and index.ntotal == 1200
    index.add(g.x[1200:], g.person[1200:])
    assert index.labels.tolist() == g.person.tolist()
    np.testing.assert_array_equal(index.vectors(), g.x)
    sims, idx = index.search(g.x[:5], 4)
    assert idx[:, 0].tolist() == list(range(5))  # each face finds itself first
    np.testing.assert_allclose(sims, np.einsum("rd,rkd->rk", g.x[:5], g.x[idx]), atol=1e-5)
    with pytest.raises(ValueError):
        index.add(g.x[:2], g.person[:3])


def test_approximate_and_exact_search_agree_on_the_person_decision():
    """Synthetic faces shaped like SFace's: the held-out faces are filed against the others by
    exact search and by the PQ scan re-ranked exactly; the person each picks (or nobody) is the
    same for at least 99% of them (docs/BENCHMARKS.md has the rate at a million faces)."""
    g = generate(30_000, seed=2)
    held = np.zeros(len(g.x), bool)
    held[np.random.default_rng(0).choice(len(g.x), 500, replace=False)] = True
    exact, approximate = FaceIndex(128, exact_max=10**9), FaceIndex(128, exact_max=0)
    for index in (exact, approximate):
        index.add(g.x[~held], g.person[~held])
    assert approximate.approximate and not exact.approximate
    picks = [assign(*index.search(g.x[held]), index.labels, CUT)[0] for index in (exact, approximate)]
    assert (picks[0] >= 0).mean() > 0.5  # most faces join someone: the agreement is not all "nobody"
    assert (picks[0] == picks[1]).mean() >= 0.99
