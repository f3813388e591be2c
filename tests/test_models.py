"""The model registry refuses files that are not the pinned ones; ONNX batch axis made dynamic."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from facecore import models
from facecore.embed import CPU_BATCH, Embedder


def test_registry_files_verify():
    for name in ("mtcnn-pnet", "sface", "yunet"):
        path, version = models.resolve(name)
        assert path.is_file() and version


def test_tampered_file_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "pkg"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "w.onnx").write_bytes(b"not the model")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(models.REGISTRY, "fake", models.ModelFile("fake", "pkg", "w.onnx", "0" * 64, "v1"))
    with pytest.raises(models.ModelIntegrityError, match="sha256"):
        models.resolve("fake")


def test_unknown_name_is_a_clear_error():
    with pytest.raises(models.ModelIntegrityError, match="neither a registered model"):
        models.resolve("no-such-model")


def test_make_batch_dynamic_runs_any_batch(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 3], [1, 2, 3])
    g = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g", [x, helper.make_tensor_value_info(
        "w", TensorProto.FLOAT, [1, 3])], [y], [w])
    m = models.make_batch_dynamic(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    assert [i.name for i in m.graph.input] == ["x"]
    out = models.InferenceModel(m).predict(np.ones((4, 3), np.float32))[0]
    np.testing.assert_allclose(out, np.tile([1, 2, 3], (4, 1)))


def test_embedder_any_batch_and_version():
    e = Embedder("sface", threads=1, flip_tta=True)
    crops = np.random.default_rng(0).integers(0, 255, (5, 112, 112, 3), dtype=np.uint8)
    out = e.embed(crops, batch_size=4)
    assert out.shape == (5, 128)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert e.version == "sface-2021dec+flip"
    # batching must not change the numbers
    np.testing.assert_allclose(e.embed(crops, batch_size=64), out, atol=1e-5)
    # on the CPU the default run is CPU_BATCH faces (4 crops and their mirrors per run here)
    assert not e.on_accelerator and e.batch_size == CPU_BATCH
    np.testing.assert_allclose(e.embed(crops), out, atol=1e-5)


def test_openvino_backend_at_f32_gives_the_same_vectors_and_features():
    crops = np.random.default_rng(3).integers(0, 255, (6, 112, 112, 3), dtype=np.uint8)
    ref = Embedder("sface", threads=1, flip_tta=True, pool_layer="conv_14_relu")
    ov = Embedder("sface", threads=1, flip_tta=True, pool_layer="conv_14_relu", backend="openvino", precision="f32")
    (a, fa), (b, fb) = ref.embed_with_features(crops), ov.embed_with_features(crops, batch_size=4)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-5)
    assert ov.version == ref.version  # the engine does not change what the vectors mean


def test_auto_backend_and_precision_choices():
    assert models.choose_backend("auto", ["CPUExecutionProvider"]) == "openvino"
    # an accelerator runs on ONNX Runtime where it is present; where absent the CPU engine is chosen
    cuda = "CUDAExecutionProvider" in models.ort.get_available_providers()
    assert models.choose_backend("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == (
        "onnxruntime" if cuda else "openvino")
    assert models.choose_backend("onnxruntime", ["CPUExecutionProvider"]) == "onnxruntime"
    with pytest.raises(ValueError, match="unknown precision"):
        Embedder("sface", threads=1, backend="openvino", precision="int4")
    with pytest.raises(ValueError, match="unknown inference backend"):
        Embedder("sface", threads=1, backend="tflite")


def test_pooled_feature_is_the_layer_mean_and_leaves_embeddings_alone():
    crops = np.random.default_rng(2).integers(0, 255, (5, 112, 112, 3), dtype=np.uint8)
    plain = Embedder("sface", threads=1, flip_tta=True)
    pooled = Embedder("sface", threads=1, flip_tta=True, pool_layer="conv_14_relu")
    assert pooled.feature_name == "avgpool:conv_14_relu" and plain.feature_name is None
    emb, feats = pooled.embed_with_features(crops, batch_size=4)
    np.testing.assert_allclose(emb, plain.embed(crops), atol=1e-5)
    assert plain.embed_with_features(crops)[1] is None

    # independent reference: the raw 4-d layer as a graph output, averaged here in numpy
    path, _ = models.resolve("sface")
    g = models.make_batch_dynamic(onnx.load(str(path)))
    g.graph.output.append(helper.make_tensor_value_info("conv_14_relu", TensorProto.FLOAT, None))
    raw = models.InferenceModel(g).predict(pooled._prepare(crops))[1]
    assert raw.shape == (5, 1024, 7, 7)
    np.testing.assert_allclose(feats, raw.mean(axis=(2, 3)), rtol=1e-4, atol=1e-5)

    # features come from the crop itself, never its mirror
    unflipped = Embedder("sface", threads=1, flip_tta=False, pool_layer="conv_14_relu")
    np.testing.assert_allclose(unflipped.embed_with_features(crops)[1], feats, rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match="no 4-d tensor"):
        Embedder("sface", threads=1, pool_layer="no_such_layer")


def test_openvino_compiles_through_its_cache_dir(tmp_path, monkeypatch):
    """The compiled-model cache named by the settings is filled on the first compile and used
    after; an empty setting means no cache."""
    import joblib

    from facecore.mtcnn_onnx import BUILDERS

    path, version = models.resolve("mtcnn-onet")
    graph = BUILDERS["onet"](joblib.load(path))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 48, 48)).astype(np.float32)
    cache = tmp_path / "ov"
    try:
        monkeypatch.setenv("FACECLUSTER_OPENVINO_CACHE", str(cache))
        models._openvino_core.cache_clear()
        first = models.InferenceModel(graph, backend="openvino", precision="f32", threads=1, version=version)
        blobs = sorted(cache.glob("*.blob"))
        assert len(blobs) == 1
        again = models.InferenceModel(graph, backend="openvino", precision="f32", threads=1, version=version)
        assert sorted(cache.glob("*.blob")) == blobs  # loaded from the cache, not compiled into a new entry
        for a, b in zip(first.predict(x), again.predict(x)):
            np.testing.assert_array_equal(a, b)

        monkeypatch.setenv("FACECLUSTER_OPENVINO_CACHE", "")
        models._openvino_core.cache_clear()
        assert models._openvino_core().get_property("CACHE_DIR") == ""
        models.InferenceModel(graph, backend="openvino", precision="f32", threads=1, version=version)
        assert sorted(cache.glob("*.blob")) == blobs
    finally:
        models._openvino_core.cache_clear()  # the next test's core reads its own settings
