"""Attribute head training: the loss against its formula, the person split, and the whole job on synthetic data."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from facecore.attributes import AttributeHead, IncompatibleEmbedderError  # noqa: E402
from training.attribute_head import (  # noqa: E402
    ARTIFACT,
    EmbeddedSet,
    HeadConfig,
    balanced_bce,
    fit_and_export,
    log_prior_ratio,
    person_folds,
    predict_proba,
    train_head,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The heads are tiny: extra torch threads only contend with the rest of a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_log_prior_ratio_ignores_unlabelled():
    y = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [0.0, 1.0], [0.0, 1.0]])
    got = log_prior_ratio(y).numpy()
    np.testing.assert_allclose(got, [math.log(0.25 / 0.75), math.log((2 / 3) / (1 / 3))], rtol=1e-6)


def test_balanced_bce_matches_formula():
    logits = np.array([[0.3, -1.2], [2.0, 0.5], [-0.7, 1.1]])
    y = np.array([[1.0, 0.0], [0.0, np.nan], [1.0, 1.0]])
    offset = np.array([math.log(0.2 / 0.8), math.log(0.6 / 0.4)])
    terms = []
    for i, j in zip(*np.nonzero(~np.isnan(y))):
        z = logits[i, j] + offset[j]
        s = 1 / (1 + math.exp(-z))
        terms.append(-(y[i, j] * math.log(s) + (1 - y[i, j]) * math.log(1 - s)))
    got = balanced_bce(torch.tensor(logits), torch.tensor(y), torch.tensor(offset)).item()
    assert got == pytest.approx(float(np.mean(terms)), rel=1e-12)


def test_balanced_logit_is_prior_free():
    """With the offset, a head whose input says nothing learns logit ~ 0, not the majority class."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4)).astype(np.float32)
    y = (rng.random((400, 1)) < 0.2).astype(np.float32)
    p = predict_proba(train_head(x, y, HeadConfig(hidden=0, l2=1e-3)), x)
    assert abs(float(np.mean(p)) - 0.5) < 0.05


def lfw_like_people(rng, n_people=300):
    """Many people with one photo, a few with dozens; about a quarter women."""
    counts = np.minimum(rng.zipf(2.0, n_people), 60)
    female = rng.random(n_people) < 0.25
    people = np.repeat([f"p{i}" for i in range(n_people)], counts)
    y = np.repeat(female, counts).astype(np.float32)
    return people, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_person_folds_are_disjoint_and_stratified(seed):
    rng = np.random.default_rng(seed)
    people, y = lfw_like_people(rng)
    folds = person_folds(people, y, 5, seed)
    for name in np.unique(people):
        assert len(np.unique(folds[people == name])) == 1, name
    for f in range(5):
        te = folds == f
        assert not set(people[te]) & set(people[~te])
        assert abs(y[te].mean() - y.mean()) < 0.05
        assert 0.1 < te.mean() < 0.3


def synthetic_set(rng, n_people=80, dim=128):
    """Unit vectors whose gender is one direction plus per-person identity and noise."""
    people, y = lfw_like_people(rng, n_people)
    ids = {p: rng.normal(size=dim) for p in np.unique(people)}
    x = np.stack([ids[p] for p in people]) + rng.normal(size=(len(people), dim))
    x[:, 0] += np.where(y > 0, 4.0, -4.0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return EmbeddedSet([f"{p}/{i}.jpg" for i, p in enumerate(people)], people, x.astype(np.float32),
                       y[:, None], "test-embedder-1", {"no face": 0})


def test_training_job_end_to_end(tmp_path):
    ds = synthetic_set(np.random.default_rng(0))
    cfg = HeadConfig(hidden=8, max_iter=100)
    card = fit_and_export(ds, tmp_path, cfg, k=3, data_desc={"dataset": "synthetic"}, version="test-head")

    onnx_path = tmp_path / f"{ARTIFACT}.onnx"
    assert card == json.loads((tmp_path / f"{ARTIFACT}.json").read_text())
    assert card["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert card["embedder_version"] == "test-embedder-1"
    m = card["metrics"]["gender"]
    assert len(m["folds"]) == 3 and sum(f["n"] for f in m["folds"]) == len(ds.images)
    assert m["mean"]["balanced_accuracy"] > 0.9

    # the exported graph is the final torch head, for any batch size
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    final = train_head(ds.embeddings, ds.targets, cfg)
    for n in (1, 7):
        got = sess.run(None, {"embedding": ds.embeddings[:n]})[0]
        np.testing.assert_allclose(got, predict_proba(final, ds.embeddings[:n]), atol=1e-5)

    head = AttributeHead("test-embedder-1", onnx_path)
    preds = head.predict_attributes(ds.embeddings)
    acc = np.mean([(p["gender"] == "F") == bool(t) for p, t in zip(preds, ds.targets[:, 0])])
    assert acc > 0.9
    assert all(0.5 <= p["gender_p"] <= 1.0 for p in preds)
    with pytest.raises(IncompatibleEmbedderError, match="test-embedder-1"):
        AttributeHead("another-embedder", onnx_path)
