"""The GPU path's choices, checked without a GPU: which providers run, their options
(TensorRT float16, engine and timing caches on disk, shape profiles computed from the
settings), the log line that says which provider runs a model, and the fallback of shapes
outside a TensorRT profile. ONNX Runtime's list of available providers is patched where a
test needs a GPU build; the models themselves are the real ones, run on the CPU."""

import logging

import joblib
import numpy as np
import pytest

from facecore import models
from facecore.embed import Embedder
from facecore.models import CPU, CUDA, TENSORRT, AcceleratorOptions
from facecore.mtcnn_onnx import BUILDERS
from facecore.settings import Settings

ALL = [TENSORRT, CUDA, CPU]


def mtcnn_graph(name):
    return BUILDERS[name](joblib.load(models.resolve(f"mtcnn-{name}")[0]))


def test_choose_providers_keeps_order_and_ends_with_the_cpu():
    assert models.choose_providers(ALL, ALL) == (ALL, [])
    assert models.choose_providers(ALL, [CUDA, CPU]) == ([CUDA, CPU], [TENSORRT])
    assert models.choose_providers(ALL, [CPU]) == ([CPU], [TENSORRT, CUDA])
    assert models.choose_providers([TENSORRT], [TENSORRT, CUDA, CPU]) == ([TENSORRT, CPU], [])


def test_a_missing_accelerator_is_a_warning_once(monkeypatch, caplog):
    monkeypatch.setattr(models.ort, "get_available_providers", lambda: [CPU])
    models._warn_missing.cache_clear()
    with caplog.at_level(logging.INFO, logger="facecore.models"):
        assert models.available_providers(ALL) == [CPU]
        assert models.available_providers(ALL) == [CPU]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "TensorrtExecutionProvider, CUDAExecutionProvider configured but not available" in warnings[0].message
    # with a GPU build the accelerators are chosen, and auto runs ONNX Runtime
    monkeypatch.setattr(models.ort, "get_available_providers", lambda: ALL)
    assert models.available_providers(ALL) == ALL
    assert models.choose_backend("auto", ALL) == "onnxruntime"


def test_missing_reason_names_the_extra():
    assert "onnxruntime-gpu is not installed" in models.missing_reason([TENSORRT], gpu_build=False)
    assert "onnxruntime-gpu" not in models.missing_reason([TENSORRT], gpu_build=True)


def test_profiles_from_the_settings():
    s = Settings(max_side=1024, min_face_size=20, batch_size=16, accelerator_batch=128)
    o = AcceleratorOptions.from_settings(s)
    assert (o.max_batch, o.max_photos, o.max_side) == (128, 16, 1024)
    # P-Net: a canvas is at most the first pyramid level of a 1024 px photo, 1024 * 12 / 20 = 615 -> 616
    assert models.input_profile(["N", 3, "H", "W"], o) == ((1, 3, 12, 12), (1, 3, 616, 616), (16, 3, 616, 616))
    # R-Net and O-Net: as many crops as the detector sends in one run (2**19 pixels)
    assert models.input_profile(["N", 3, 24, 24], o) == ((1, 3, 24, 24), (128, 3, 24, 24), (910, 3, 24, 24))
    assert models.input_profile(["N", 3, 48, 48], o) == ((1, 3, 48, 48), (128, 3, 48, 48), (227, 3, 48, 48))
    # SFace: the accelerator batch
    assert models.input_profile(["N", 3, 112, 112], o) == ((1, 3, 112, 112), (128, 3, 112, 112), (128, 3, 112, 112))
    assert models.input_profile([None, 128], o) == ((1, 128), (128, 128), (128, 128))
    assert models.input_profile([1, 3, 112, 112], o) is None
    # defaults: 2048 px photos, 32 photos, 256 faces; P-Net's batch is capped for memory
    d = AcceleratorOptions.from_settings(Settings(batch_size=128))
    assert models.input_profile(["N", 3, "H", "W"], d)[2] == (models.PNET_MAX_BATCH, 3, 1230, 1230)
    with pytest.raises(ValueError):
        models.input_profile(["N", "C", 24, 24], o)


def test_profiles_of_the_real_graphs():
    o = AcceleratorOptions()
    got = {}
    for name in ("pnet", "rnet", "onet"):
        inputs = models._graph_inputs(mtcnn_graph(name).SerializeToString())
        assert list(inputs) == ["input"]
        got[name] = models.input_profile(inputs["input"], o)
    assert got["pnet"][2] == (32, 3, 1230, 1230)
    assert got["rnet"][2] == (910, 3, 24, 24) and got["onet"][2] == (256, 3, 48, 48)
    sface = models._graph_inputs(str(models.resolve("sface")[0]))
    (name, dims), = sface.items()
    # the shipped file has batch 1; the Embedder makes it dynamic before the session is made
    assert dims[1:] == [3, 112, 112]


def test_tensorrt_and_cuda_options():
    o = AcceleratorOptions(cache_dir=models.Path("engines"), fp16=True, workspace_bytes=2 << 30, device_id=1)
    pnet = {"input": models.input_profile(["N", 3, "H", "W"], o)}
    (trt_name, trt), (cuda_name, cuda), (cpu_name, cpu) = models.provider_options(ALL, o, pnet, version="mtcnn-1.0.0-pnet")
    assert (trt_name, cuda_name, cpu_name) == (TENSORRT, CUDA, CPU) and cpu == {}
    assert trt["trt_fp16_enable"] == "True" and trt["device_id"] == "1"
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_engine_cache_path"] == "engines"
    assert trt["trt_timing_cache_enable"] == "True" and trt["trt_timing_cache_path"] == "engines"
    assert trt["trt_max_workspace_size"] == str(2 << 30)
    assert trt["trt_engine_cache_prefix"] == "mtcnn_1_0_0_pnet"
    assert trt["trt_profile_min_shapes"] == "input:1x3x12x12"
    assert trt["trt_profile_opt_shapes"] == "input:1x3x640x640"
    assert trt["trt_profile_max_shapes"] == "input:32x3x1230x1230"
    assert cuda == {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC", "cudnn_conv_use_max_workspace": "1"}
    # fixed-size crops: cuDNN may search exhaustively, once
    rnet = {"input": models.input_profile(["N", 3, 24, 24], o)}
    cuda = dict(models.provider_options([CUDA], o, rnet))[CUDA]
    assert cuda["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    no_fp16 = dict(models.provider_options([TENSORRT], AcceleratorOptions(fp16=False)))[TENSORRT]
    assert no_fp16["trt_fp16_enable"] == "False" and "trt_profile_min_shapes" not in no_fp16


def test_trt_cache_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FACECLUSTER_TRT_CACHE", str(tmp_path / "trt"))
    monkeypatch.setenv("FACECLUSTER_TRT_FP16", "false")
    o = AcceleratorOptions.from_settings()
    assert o.cache_dir == tmp_path / "trt" and o.fp16 is False


def test_describe_run_says_which_provider_and_why():
    o = AcceleratorOptions(cache_dir=models.Path("c"))
    assert models.describe_run("sface", TENSORRT, ALL, o) == (logging.INFO, "sface: TensorrtExecutionProvider "
                                                              "(fp16, engine cache c)")
    level, line = models.describe_run("sface", CPU, ALL, None, models.missing_reason([TENSORRT], False))
    assert level == logging.INFO
    assert line == ('sface: CPUExecutionProvider: TensorrtExecutionProvider was configured but onnxruntime-gpu '
                    'is not installed (the extra "gpu")')
    # installed but not loaded (e.g. libnvinfer missing): a warning
    level, line = models.describe_run("sface", CUDA, ALL, o)
    assert level == logging.WARNING and line.startswith("sface: CUDAExecutionProvider (device 0): "
                                                        "TensorrtExecutionProvider was configured but did not load")


def test_in_profile():
    p = ((1, 3, 24, 24), (8, 3, 24, 24), (16, 3, 24, 24))
    assert models.in_profile((16, 3, 24, 24), p) and models.in_profile((5, 3, 24, 24), None)
    assert not models.in_profile((17, 3, 24, 24), p) and not models.in_profile((1, 3, 25, 24), p)


def test_embedder_configured_for_tensorrt_runs_and_logs_the_cpu_here(caplog):
    """On this machine (CPU build of ONNX Runtime) the real SFace runs on the CPU and says why."""
    if models.gpu_build_installed():
        pytest.skip("this test is for a machine without onnxruntime-gpu")
    with caplog.at_level(logging.INFO, logger="facecore.models"):
        e = Embedder("sface", providers=ALL, threads=1, flip_tta=False)
    assert e.providers == [CPU] and not e.on_accelerator and e.batch_size == 8
    assert any(r.message == 'sface-2021dec: CPUExecutionProvider: TensorrtExecutionProvider was configured but '
               'onnxruntime-gpu is not installed (the extra "gpu")' for r in caplog.records)
    assert e.embed(np.zeros((3, 112, 112, 3), np.uint8)).shape == (3, 128)


def test_a_shape_outside_the_engine_profile_runs_on_a_second_session(caplog):
    """The routing only: R-Net on the CPU, given a profile as a TensorRT session would have."""
    net = models.InferenceModel(mtcnn_graph("rnet"), threads=1, version="mtcnn-rnet")
    x = np.random.default_rng(0).normal(size=(9, 3, 24, 24)).astype(np.float32)
    want = net.predict(x)
    net.profiles, net.accelerator = {"input": ((1, 3, 24, 24), (8, 3, 24, 24), (8, 3, 24, 24))}, AcceleratorOptions()
    assert net._session_for({"input": x[:8]}) is net.session
    with caplog.at_level(logging.WARNING, logger="facecore.models"):
        got = net.predict(x)
    assert net._outside is not None and net._outside is not net.session
    assert any("outside the TensorRT engine's profile" in r.message for r in caplog.records)
    for a, b in zip(want, got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_float32_models_get_a_float32_engine(monkeypatch, tmp_path):
    """The detector asks for float32 (its landmarks decide every crop): TensorRT must not
    build its engines in float16 even with trt_fp16 on. Checked on the options the model
    would hand a GPU build; the session itself runs on the CPU here."""
    seen = []
    real = models.provider_options
    monkeypatch.setattr(models.ort, "get_available_providers", lambda: ALL)
    monkeypatch.setattr(models, "provider_options", lambda p, o, *a, **k: seen.append(o) or real([CPU], o, *a, **k))
    o = AcceleratorOptions(cache_dir=tmp_path / "trt", fp16=True)
    models.InferenceModel(mtcnn_graph("onet"), providers=ALL, threads=1, precision="f32", accelerator=o)
    models.InferenceModel(mtcnn_graph("onet"), providers=ALL, threads=1, accelerator=o)
    assert [x.fp16 for x in seen] == [False, True]
