"""Alignment against transforms computed by hand, and against insightface's own face_align."""

import math

import numpy as np
import pytest

from facecore.align import ARCFACE_TEMPLATE_112, align_faces, similarity_transform


def test_recovers_known_similarity():
    # dst = 2 * R(90 deg) @ src + (10, -5): written out by hand
    src = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 2.0]])
    dst = np.array([[10.0, -5.0], [10.0, -3.0], [8.0, -5.0], [8.0, -3.0], [6.0, -4.0]])
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m, [[0.0, -2.0, 10.0], [2.0, 0.0, -5.0]], atol=1e-9)


def test_least_squares_scale_and_no_reflection():
    # a mirrored point set cannot be reached by rotation + scale: the result must stay a rotation
    src = ARCFACE_TEMPLATE_112.copy()
    mirrored = src * [-1, 1]
    m = similarity_transform(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    # a pure scale about the origin is found exactly
    m = similarity_transform(src, src * 0.5)
    np.testing.assert_allclose(m, [[0.5, 0, 0], [0, 0.5, 0]], atol=1e-9)


def test_rotated_face_lands_on_template():
    """Landmarks rotated by 30 deg and shifted map back onto the template (residual ~0)."""
    a = math.radians(30)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    pts = ARCFACE_TEMPLATE_112 @ r.T * 1.7 + [40, 25]
    m = similarity_transform(pts, ARCFACE_TEMPLATE_112)
    back = pts @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(back, ARCFACE_TEMPLATE_112, atol=1e-6)


def test_matches_insightface_norm_crop():
    face_align = pytest.importorskip("insightface.utils.face_align")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (200, 220, 3), dtype=np.uint8)
    lm = ARCFACE_TEMPLATE_112 * 1.3 + [30, 20] + rng.normal(0, 1.5, (5, 2))
    ours = align_faces(img, lm[None].astype(np.float32))[0]
    theirs = face_align.norm_crop(img, lm.astype(np.float32), image_size=112)
    # same transform up to interpolation/border details: compare the interior
    diff = np.abs(ours[8:-8, 8:-8].astype(int) - theirs[8:-8, 8:-8].astype(int))
    assert np.mean(diff) < 2.0
