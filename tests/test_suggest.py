"""services.persons.suggest on small hand-made vectors whose answers are known."""

import numpy as np
import pytest

from services.persons.suggest import (face_margins, least_sure_faces, nearest_person, nearest_persons,
                                      person_centroids, similar_face_pairs, similar_pairs, similar_persons)


def unit(*angles_deg):
    """Unit vectors in the plane at these angles (degrees), as float32 rows."""
    a = np.radians(np.array(angles_deg, np.float64))
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


def test_centroids_are_normalised_means_and_ignore_faces_in_no_person():
    x = np.concatenate([unit(0, 90), unit(180), unit(45)])
    person_of = np.array([7, 7, 3, -1], np.int64)
    ids, c = person_centroids(person_of, x)
    assert ids.tolist() == [3, 7]
    np.testing.assert_allclose(c[0], [-1, 0], atol=1e-6)
    np.testing.assert_allclose(c[1], unit(45)[0], atol=1e-6)  # mean of 0 and 90 degrees, normalised
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-6)


def test_centroids_check_shapes():
    with pytest.raises(ValueError):
        person_centroids(np.array([1, 2], np.int64), unit(0, 10, 20))


def test_similar_persons_most_similar_first_without_itself_and_excluded():
    ids = np.array([1, 2, 3, 4], np.int64)
    c = unit(0, 10, 50, 30)
    assert [p for p, _ in similar_persons(ids, c, 1, 10)] == [2, 4, 3]
    got = similar_persons(ids, c, 1, 2)
    assert [p for p, _ in got] == [2, 4]
    assert got[0][1] == pytest.approx(np.cos(np.radians(10)), abs=1e-6)
    assert [p for p, _ in similar_persons(ids, c, 1, 10, exclude={2})] == [4, 3]
    with pytest.raises(KeyError):
        similar_persons(ids, c, 9, 1)


def test_similar_pairs_global_order_and_exclusion():
    ids = np.array([10, 20, 30, 40], np.int64)
    c = unit(0, 5, 40, 60)  # pairs by angle: 10-20 5, 30-40 20, 20-30 35, ...
    pairs = similar_pairs(ids, c, 3)
    assert [(a, b) for a, b, _ in pairs] == [(10, 20), (30, 40), (20, 30)]
    assert pairs[0][2] == pytest.approx(np.cos(np.radians(5)), abs=1e-6)
    assert [(a, b) for a, b, _ in similar_pairs(ids, c, 2, exclude=[(20, 10)])] == [(30, 40), (20, 30)]
    assert similar_pairs(ids[:1], c[:1], 3) == []


def test_margin_leaves_the_face_out_of_its_own_centroid():
    # person 1: two faces at 0 and 80 degrees; person 2: one face at 100 degrees.
    x = unit(0, 80, 100)
    person_of = np.array([1, 1, 2], np.int64)
    ids, c = person_centroids(person_of, x)
    margin, own, other = face_margins(person_of, x, ids, c)
    # face at 80: without it, person 1 is just the face at 0 (cos 80); person 2 is 20 degrees away
    assert own[1] == pytest.approx(np.cos(np.radians(80)), abs=1e-6)
    assert other[1] == 2
    assert margin[1] == pytest.approx(np.cos(np.radians(80)) - np.cos(np.radians(20)), abs=1e-6)
    # face at 0: own is the face at 80 (cos 80), person 2 is 100 degrees away
    assert margin[0] == pytest.approx(np.cos(np.radians(80)) - np.cos(np.radians(100)), abs=1e-6)
    # the only face of person 2 is not judged
    assert np.isnan(margin[2]) and other[2] == -1


def test_least_sure_faces_order_skips_singletons_unassigned_and_excluded():
    # person 1 at 0, 10, 60 degrees (the face at 60 is the stray); person 2 at 90 and 95;
    # person 3 a single face; face 16 in no person.
    x = unit(0, 10, 60, 90, 95, 200, 70)
    face_ids = np.array([10, 11, 12, 13, 14, 15, 16], np.int64)
    person_of = np.array([1, 1, 1, 2, 2, 3, -1], np.int64)
    ids, c = person_centroids(person_of, x)
    ranked = least_sure_faces(face_ids, person_of, x, ids, c, 10)
    assert ranked[0][0] == 12 and ranked[0][1] < 0
    assert {f for f, _ in ranked} == {10, 11, 12, 13, 14}
    margins = [m for _, m in ranked]
    assert margins == sorted(margins)
    assert [f for f, _ in least_sure_faces(face_ids, person_of, x, ids, c, 1, exclude={12})] != [12]
    assert len(least_sure_faces(face_ids, person_of, x, ids, c, 2)) == 2


def test_margin_without_any_other_person():
    x = unit(0, 30)
    person_of = np.array([5, 5], np.int64)
    ids, c = person_centroids(person_of, x)
    margin, own, other = face_margins(person_of, x, ids, c)
    np.testing.assert_allclose(margin, np.cos(np.radians(30)) + 1, atol=1e-6)
    assert other.tolist() == [-1, -1]


def test_nearest_persons_and_nearest_person_with_exclusion():
    ids = np.array([1, 2, 3], np.int64)
    c = unit(0, 90, 180)
    got, sims = nearest_persons(unit(80, 170), ids, c, 2)
    assert got.tolist() == [[2, 1], [3, 2]]
    np.testing.assert_allclose(sims[0], np.cos(np.radians([10, 80])), atol=1e-6)
    got, sims = nearest_persons(unit(0), ids, c, 5)  # fewer persons than asked: padded
    assert got.tolist() == [[1, 2, 3, -1, -1]] and np.isnan(sims[0, 3:]).all()
    assert nearest_person(unit(80)[0], ids, c) == (2, pytest.approx(np.cos(np.radians(10)), abs=1e-6))
    assert nearest_person(unit(80)[0], ids, c, exclude=[2])[0] == 1
    assert nearest_person(unit(80)[0], ids, c, exclude=[1, 2, 3]) is None


def test_similar_face_pairs_skip_one_photo_and_answered_pairs():
    face_ids = np.array([5, 6, 7, 8], np.int64)
    x = unit(0, 3, 10, 90)
    photos = np.array([1, 1, 2, 3], np.int64)  # faces 5 and 6 are in one photo: never one person
    pairs = similar_face_pairs(face_ids, x, 2, photos=photos)
    assert [(a, b) for a, b, _ in pairs] == [(6, 7), (5, 7)]
    assert pairs[0][2] == pytest.approx(np.cos(np.radians(7)), abs=1e-6)
    assert [(a, b) for a, b, _ in similar_face_pairs(face_ids, x, 1)] == [(5, 6)]  # without photos
    assert [(a, b) for a, b, _ in similar_face_pairs(face_ids, x, 1, photos=photos, exclude=[(7, 6)])] == [(5, 7)]
    assert similar_face_pairs(face_ids[:1], x[:1], 3) == []
