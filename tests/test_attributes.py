"""The shipped gender head: pinned file, tied to its embedder, right on real LFW-dev photos.

The photos below were in the head's training set (it is trained on all of LFW-dev), so
their accuracy only shows the head is wired up correctly; the held-out, person-disjoint
figure is the cross-validated one in the model card.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from facecore import models
from facecore.attributes import (DEFAULT_HEAD, EMBEDDING, HEADS, AttributeHead, IncompatibleEmbedderError, head_for,
                                  vector_version)
from facecore.embed import Embedder
from facecore.pipeline import FacePipeline
from facecore.settings import Settings
from badinput import lfw_dev

CARD = Path(models.REGISTRY[DEFAULT_HEAD].path()).with_suffix(".json")


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads(CARD.read_text())


SHIPPED = [(DEFAULT_HEAD, "sface"), ("gender-head-w600k-mbf", "w600k-mbf")]  # (head, embedder)


@pytest.fixture(scope="module", params=[embedder for _, embedder in SHIPPED])
def pipeline(request):
    p = FacePipeline(Settings(threads=2, embedder=request.param))
    yield p
    p.close()


@pytest.mark.parametrize("head, embedder", SHIPPED)
def test_shipped_heads_are_pinned_and_match_their_cards(head, embedder):
    entry = models.REGISTRY[head]
    path, version = models.resolve(head)  # raises unless the file has the pinned sha256
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["sha256"] == entry.sha256 == models.sha256_file(path)
    assert card["version"] == version
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["embedder_version"] == card["embedder_version"]
    assert meta["input"] == card["input"]["reads"]
    assert json.loads(meta["attributes"]) == card["labels"]
    assert card["embedder_version"] == models.resolve(embedder)[1]
    assert head in HEADS and head_for(card["embedder_version"]) == head  # each embedder finds its own
    fold_acc = [f["accuracy"] for f in card["metrics"]["gender"]["folds"]]
    assert len(fold_acc) == 5 and min(fold_acc) > 0.9  # the held-out figures; see the card


def test_a_changed_file_is_refused(monkeypatch, card):
    entry = models.REGISTRY[DEFAULT_HEAD]
    monkeypatch.setitem(models.REGISTRY, DEFAULT_HEAD, dataclasses.replace(entry, sha256="0" * 64))
    with pytest.raises(models.ModelIntegrityError, match="sha256"):
        AttributeHead(vector_version(card["embedder_version"], card["input"]["reads"]))


def test_other_vectors_are_refused(card):
    reads = card["input"]["reads"]
    assert reads != EMBEDDING  # the shipped head reads a pooled feature map, not the embeddings
    own = vector_version(card["embedder_version"], reads)
    for other in (vector_version(card["embedder_version"], EMBEDDING),  # the 128-d embeddings
                  vector_version(card["embedder_version"], "avgpool:conv_13_relu"),  # another layer
                  vector_version("insightface-w600k", reads)):  # another model
        with pytest.raises(IncompatibleEmbedderError, match="trained on vectors"):
            AttributeHead(other)
        assert AttributeHead.for_vectors(other) is None
    assert AttributeHead.for_vectors(own) is not None


def test_pipeline_with_an_embedder_lacking_the_feature_sets_no_attributes():
    p = FacePipeline(Settings(threads=1), embedder=Embedder("sface", threads=1, flip_tta=False))
    try:
        assert p.attributes is None
        (r,) = p.process([("x", lfw_dev() / "images" / balanced_sample(1)[0][0])])
        assert r.faces and all(f.embedding is not None and not f.attributes for f in r.faces)
    finally:
        p.close()


def test_flip_tta_keeps_gender_because_the_head_reads_the_unmirrored_crop():
    p = FacePipeline(Settings(threads=1, flip_tta=not Settings().flip_tta))
    try:
        assert p.attributes is not None
    finally:
        p.close()


def balanced_sample(per_class: int) -> list[tuple[str, str]]:
    """``per_class`` photos of each gender, spread over the alphabet, same photos every run."""
    with open(lfw_dev() / "gender.tsv", newline="") as f:
        rows = sorted((r["image"], r["gender"]) for r in csv.DictReader(f, delimiter="\t"))
    out = []
    for g in ("F", "M"):
        of_g = [r for r in rows if r[1] == g]
        out += of_g[:: len(of_g) // per_class][:per_class]
    return out


def central(faces, width: int, height: int):
    d = [(((f.box[:2] + f.box[2:4]) / 2 - [width / 2, height / 2]) ** 2).sum() for f in faces]
    return faces[int(np.argmin(d))]


def test_pipeline_predicts_gender_on_lfw_dev(pipeline):
    sample = balanced_sample(50)
    results = pipeline.process([(name, lfw_dev() / "images" / name) for name, _ in sample])
    right = total = 0
    for (_, truth), r in zip(sample, results):
        assert r.ok, r.error
        for face in r.faces:  # every embedded face gets attributes, none without an embedding
            assert ("gender" in face.attributes) == (face.embedding is not None)
        face = central(r.faces, r.width, r.height)
        if face.embedding is None:
            continue
        assert face.attributes["gender"] in ("M", "F")
        assert 0.5 <= face.attributes["gender_p"] <= 1.0
        total += 1
        right += face.attributes["gender"] == truth
    assert total >= 95
    assert right / total >= 0.97, f"{right}/{total}"
