"""Metric head: the job end to end on synthetic data, its splits, its ONNX export, and facecore applying it."""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from facecore.attributes import IncompatibleEmbedderError  # noqa: E402
from facecore.embed import Embedder, l2_normalize  # noqa: E402
from facecore.models import resolve  # noqa: E402
from facecore.pipeline import FacePipeline  # noqa: E402
from facecore.settings import Settings  # noqa: E402
from badinput import lfw_dev, lfw_image  # noqa: E402
from training.attribute_head import person_folds  # noqa: E402
from training.metric_head import (  # noqa: E402
    ARTIFACT,
    FeatureSet,
    MetricConfig,
    apply_head,
    bcubed_f1,
    class_labels,
    export,
    main,
    outside_fold,
    train_head,
    validation_split,
)

BASE = "sface-2021dec"
FEATURE = "avgpool:conv_14_relu"
FAST = MetricConfig(hidden=16, epochs=4, batch=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The head is tiny: extra torch threads only contend with the rest of a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_set(rng, n_people=40, dim=128, feature_dim=1024, version=BASE) -> FeatureSet:
    """LFW-like counts (many people with one photo); embeddings and features share a per-person code."""
    counts = np.minimum(rng.zipf(1.8, n_people), 12)
    people = np.repeat([f"Person_{i:02d}" for i in range(n_people)], counts)
    images = [f"{p}/{p}_{j + 1:04d}.jpg" for p in np.unique(people) for j in range(int((people == p).sum()))]
    code = {p: rng.normal(size=32) for p in np.unique(people)}
    z = np.stack([code[p] for p in people]) + 0.7 * rng.normal(size=(len(people), 32))
    emb = l2_normalize(z @ rng.normal(size=(32, dim)) + rng.normal(size=(len(people), dim)))
    feats = np.maximum(z @ rng.normal(size=(32, feature_dim)), 0)
    landmarks = np.array([[38, 50], [74, 50], [56, 70], [42, 90], [70, 90]], np.float32) + rng.normal(
        size=(len(people), 5, 2))
    return FeatureSet(images, people, emb.astype(np.float32), feats.astype(np.float32), version, FEATURE,
                      landmarks.astype(np.float32), {"no face": 0})


def test_only_people_with_two_photos_are_classes():
    people = np.array(["a", "b", "b", "c", "c", "c"])
    keep, y = class_labels(people, 2)
    assert keep.tolist() == [False, True, True, True, True, True]
    assert y.tolist() == [0, 0, 1, 1, 1]


def test_bcubed_f1():
    truth = np.array([0, 0, 1, 1])
    assert bcubed_f1(truth, np.array([5, 5, 7, 7])) == 1.0
    # one cluster: precision 1/2 per item, recall 1
    assert bcubed_f1(truth, np.zeros(4)) == pytest.approx(2 * 0.5 / 1.5)


@pytest.mark.parametrize("seed", [0, 1])
def test_splits_are_person_disjoint(seed):
    fs = synthetic_set(np.random.default_rng(seed), n_people=120)
    val = validation_split(fs.people, seed=seed)
    assert 0.1 < val.mean() < 0.35
    assert not set(fs.people[val]) & set(fs.people[~val])
    half = person_folds(fs.people, np.zeros(len(fs.people)), 2, seed)
    assert not set(fs.people[half == 0]) & set(fs.people[half == 1])


def test_verification_folds_train_without_their_people():
    people = np.array(["A", "A", "B", "B", "C", "D", "D"])
    pairs = [("A/A_0001.jpg", "A/A_0002.jpg"), ("A/A_0001.jpg", "C/C_0001.jpg"),
             ("D/D_0001.jpg", "D/D_0002.jpg"), ("B/B_0001.jpg", "D/D_0001.jpg")]
    fold = np.array([0, 0, 1, 1])
    assert people[outside_fold(people, pairs, fold, 0)].tolist() == ["B", "B", "D", "D"]
    assert people[outside_fold(people, pairs, fold, 1)].tolist() == ["A", "A", "C"]


def test_head_starts_at_the_base_embedding():
    fs = synthetic_set(np.random.default_rng(0))
    untrained = train_head(fs, MetricConfig(hidden=8, epochs=0))
    np.testing.assert_allclose(apply_head(untrained, fs), fs.embeddings, atol=1e-6)


def test_export_equals_the_torch_head_and_the_card(tmp_path):
    fs = synthetic_set(np.random.default_rng(1))
    model = train_head(fs, FAST)
    assert model.out.weight.abs().sum() > 0  # trained off the identity
    path = export(model, fs, FAST, {"validation": {}}, tmp_path, {"dataset": "synthetic"}, "test-head")
    card = json.loads((tmp_path / f"{ARTIFACT}.json").read_text())
    assert card["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta == {"head_version": "test-head", "embedder_version": BASE, "input": f"embedding,{FEATURE}"}
    want = apply_head(model, fs)
    for n in (1, 9):
        got = sess.run(None, {"embedding": fs.embeddings[:n], "feature": fs.features[:n]})[0]
        np.testing.assert_allclose(got, want[:n], atol=1e-5)


def write_lfw_like(root, fs: FeatureSet, cache, rng) -> None:
    """A data folder (images, gender.tsv, pairs.txt) and the feature caches ``load_features`` reads."""
    for im in fs.images:
        (root / "images" / im).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / im), rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
    (root / "gender.tsv").write_text("image\tgender\n" + "".join(f"{im}\tM\n" for im in sorted(fs.images)))
    names, counts = np.unique(fs.people, return_counts=True)
    lines = []
    for k, group in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        multi = [n for n in group if counts[names == n][0] >= 2][:3]
        lines += [f"{n}\t1\t2" for n in multi] + [f"{a}\t1\t{b}\t1" for a, b in zip(group[:3], group[-3:])]
        assert len(multi) == 3, k
    (root / "pairs.txt").write_text("2\t3\n" + "\n".join(lines) + "\n")
    cache.mkdir()
    np.savez(cache / f"lfw-dev-central-{BASE}.npz", all_images=np.array(sorted(fs.images)),
             images=np.array(fs.images), embeddings=fs.embeddings, landmarks=fs.landmarks,
             skipped=json.dumps(fs.skipped))
    np.savez(cache / f"lfw-dev-central-{BASE}-{FEATURE.replace(':', '-')}.npz", images=np.array(fs.images),
             features=fs.features)


def test_training_job_end_to_end(tmp_path, capsys):
    """The CLI from cached features to head, card and the scorer's figures for SFace and the head."""
    rng = np.random.default_rng(2)
    fs = synthetic_set(rng, n_people=60)
    data, cache, out = tmp_path / "lfw", tmp_path / "cache", tmp_path / "out"
    write_lfw_like(data, fs, cache, rng)
    scorer = lfw_dev().parent.parent / "bench" / "lfw_score.py"
    main(["--data", str(data), "--out", str(out), "--cache", str(cache), "--evaluate", "--scorer", str(scorer),
          "--epochs", "3", "--hidden", "16", "--batch", "64"])

    card = json.loads((out / f"{ARTIFACT}.json").read_text())
    assert card["sha256"] == hashlib.sha256((out / f"{ARTIFACT}.onnx").read_bytes()).hexdigest()
    assert card["embedder_version"] == BASE and card["data"]["photos"] == len(fs.images)
    val = card["metrics"]["validation"]
    assert val["head"]["people"] == val["baseline"]["people"] > 0
    bench = card["metrics"]["lfw_dev"]
    assert bench == json.loads((out / "evaluation" / "summary.json").read_text())
    for method in ("baseline", "head"):
        assert bench["verification"][method]["pairs"] == 12
        assert (out / "evaluation" / f"verification_{method}.score.txt").read_text().startswith("verification:")
        for name in (method, f"{method}_tuned"):
            assert bench["clustering"][name]["photos_assigned"] == len(fs.images)
    # the halves never share a cluster: every cluster id carries its half
    rows = (out / "evaluation" / "clusters_head.csv").read_text().splitlines()[1:]
    assert {r.rsplit(",", 1)[1][:3] for r in rows} == {"h0-", "h1-"}
    assert "verification" in capsys.readouterr().out


@pytest.fixture(scope="module")
def sface_head(tmp_path_factory):
    """A head trained for the real SFace (synthetic vectors of its shapes), and one for another model."""
    tmp = tmp_path_factory.mktemp("heads")
    fs = synthetic_set(np.random.default_rng(3))
    model = train_head(fs, FAST)
    own = export(model, fs, FAST, {}, tmp / "own", {}, "test-head")
    fs.embedder_version = "other-model-1"
    other = export(model, fs, FAST, {}, tmp / "other", {}, "test-head")
    return own, other, model


def test_embedder_applies_the_head_to_crop_and_mirror(sface_head):
    path, _, model = sface_head
    crops = np.random.default_rng(4).integers(0, 255, (5, 112, 112, 3), dtype=np.uint8)
    e = Embedder("sface", threads=1, flip_tta=True, head=path)
    assert e.version == f"{BASE}+{resolve(str(path))[1]}+flip" and e.base_version == BASE
    assert e.feature_name == FEATURE  # the pooled feature the head needs is handed out too
    got = e.embed(crops, batch_size=4)

    base = Embedder("sface", threads=1, flip_tta=False, pool_layer="conv_14_relu")
    views = []
    for c in (crops, np.ascontiguousarray(crops[:, :, ::-1])):
        emb, feats = base.embed_with_features(c)
        with torch.no_grad():
            views.append(model(torch.from_numpy(emb), torch.from_numpy(feats)).numpy())
    np.testing.assert_allclose(got, l2_normalize(views[0] + views[1]), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_head_for_another_embedder_is_refused(sface_head):
    _, other, _ = sface_head
    with pytest.raises(IncompatibleEmbedderError, match="trained on 'other-model-1' vectors"):
        Embedder("sface", threads=1, head=other)


def test_pipeline_loads_the_head_from_settings(sface_head, monkeypatch):
    path, other, _ = sface_head
    monkeypatch.setenv("FACECLUSTER_EMBEDDING_HEAD", str(path))
    s = Settings(threads=1)
    assert s.embedding_head == str(path)
    p = FacePipeline(s)
    try:
        version = f"{BASE}+{resolve(str(path))[1]}" + ("+flip" if s.flip_tta else "")
        assert p.model_version == version
        assert p.attributes is not None  # the gender head still reads the base model's pooled feature
        (r,) = p.process([("x", lfw_image("Abel_Pacheco/Abel_Pacheco_0001.jpg"))])
        faces = [f for f in r.faces if f.embedding is not None]
        assert faces and all(f.model_version == version and "gender" in f.attributes for f in faces)
        np.testing.assert_allclose([np.linalg.norm(f.embedding) for f in faces], 1.0, atol=1e-5)
    finally:
        p.close()
    monkeypatch.setenv("FACECLUSTER_EMBEDDING_HEAD", str(other))
    with pytest.raises(IncompatibleEmbedderError):
        FacePipeline(Settings(threads=1))
