"""One settings object for library, CLI and services.

Values come, in rising priority, from defaults, a TOML file named by
``FACECLUSTER_CONFIG`` (or ``--config``), and ``FACECLUSTER_*`` env vars.
"""

from __future__ import annotations

import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .decode import DEFAULT_MAX_SIDE

_config_file: ContextVar[str | None] = ContextVar("facecluster_config_file", default=None)


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the file given to load_settings, else the one named by FACECLUSTER_CONFIG."""

    def __init__(self, settings_cls: type[BaseSettings]):
        super().__init__(settings_cls)
        path = _config_file.get() or os.environ.get("FACECLUSTER_CONFIG")
        self._data: dict[str, Any] = {}
        if path:
            with open(path, "rb") as f:
                self._data = tomllib.load(f)

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class FaceclusterSettings(BaseSettings):
    """Where every settings object of the project reads from: init arguments, then
    ``FACECLUSTER_*`` environment variables, then the TOML file (``--config``/FACECLUSTER_CONFIG)."""

    model_config = SettingsConfigDict(env_prefix="FACECLUSTER_", extra="ignore")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, env_settings, _TomlSource(settings_cls), file_secret_settings)


class Settings(FaceclusterSettings):

    # where state lives
    database_url: str = "sqlite:///facecluster.db"
    bus_url: str = Field("memory://", description="memory:// (in-process) or kafka://host:port")
    object_store: Path = Path("var/objects")
    default_user: str = "local"

    # inference
    providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="ONNX Runtime providers in order of preference, e.g. "
        "TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider",
    )
    threads: int = Field(0, description="intra-op threads per model; 0 = one per core")
    backend: str = Field("auto", description="inference engine of every model: auto | onnxruntime | openvino; "
                         "auto runs ONNX Runtime when an accelerator provider is available, else "
                         "OpenVINO on the CPU (the fastest there)")
    precision: str = Field("auto", description="the embedder's compute precision under OpenVINO: auto (bfloat16 "
                           "where the CPU has bfloat16 units, else float32) | f32 | bf16; detection stays float32")
    batch_size: int = 32
    batches_in_flight: int = Field(3, description="batches the index job runs through the models at once; "
                                   "more than 1 lets one batch's pre/post-processing overlap another's inference")
    # the GPU path (extra "gpu"; docs/ARCHITECTURE.md, "GPU path"): read when a TensorRT or CUDA
    # provider is configured and present
    trt_cache: Path = Field(default_factory=lambda: Path.home() / ".cache" / "facecluster" / "tensorrt",
                            description="directory of TensorRT's engine and timing caches; an engine is built "
                            "once per model, GPU and TensorRT version (minutes) and loaded from here afterwards")
    openvino_cache: str = Field(str(Path("~/.cache/facecluster/openvino")), description="directory where OpenVINO "
                                "keeps the models it compiled for this CPU, so later starts skip most of the "
                                "compiling (about 1 s); empty = no cache")
    trt_fp16: bool = Field(True, description="let TensorRT run layers in float16")
    trt_workspace_gb: float = Field(4.0, gt=0, description="TensorRT's builder workspace, GiB")
    gpu_device: int = Field(0, ge=0, description="CUDA device the TensorRT and CUDA providers run on")
    accelerator_batch: int = Field(256, ge=1, description="faces per embedder run on an accelerator (on the "
                                   "CPU it is 8), and the largest embedder batch the TensorRT engine is built for")
    embedder: str = Field("sface", description="registry name, or a path to an ArcFace-style ONNX file")
    flip_tta: bool = Field(False, description="embed each face and its mirror image when indexing (2x the "
                           "embedder's time; on LFW-dev it no longer helps clustering once landmark_tta is on)")
    verify_flip_tta: bool = Field(True, description="flip TTA for `facecluster verify`: a one-to-one comparison "
                                  "affords the second pass, and it lifts LFW-dev verification 99.43 -> 99.57%")
    embedding_head: str = Field("", description="embedding head applied after the embedder: path to an .onnx "
                                "from training.metric_head (or a registry name); empty = none")

    # detection
    min_face_size: int = Field(20, gt=0, description="smallest face looked for, in pixels of the decoded photo")
    min_face_fraction: float = Field(0.04, ge=0, lt=1, description="smallest face looked for as a fraction of the "
                                     "photo's short side, where that is more than min_face_size; on big photos "
                                     "it is most of the detector's speed (docs/BENCHMARKS.md)")
    det_thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8)
    scale_factor: float = 0.709
    landmark_tta: bool = Field(True, description="average O-Net's landmarks of each face and of its mirror image")

    # decoding limits (bad input is refused, not crashed on)
    max_pixels: int = 80_000_000
    max_bytes: int = 100 * 1024 * 1024
    max_side: int = Field(DEFAULT_MAX_SIDE, gt=0, description="photos are decoded to at most this many pixels on their long "
                          "side; lower is faster on big photos and loses the smallest faces (docs/BENCHMARKS.md)")

    # filtering
    blur_threshold: float = Field(
        0.0, description="faces with normalised Laplacian variance below this are flagged blurry; "
        "0 = use the calibrated default in facecore.quality"
    )
    trash_threshold: float = Field(
        0.0, description="faces whose embedding has at least this cosine to the trash centroid are flagged "
        "as non-faces; 0 = the calibrated threshold in the centroid's card (facecore.trash)"
    )

    # clustering
    cluster_threshold: float = Field(0.0, description="cosine distance cut; 0 = the cut calibrated for the embedder")
    # One policy for `facecluster cluster`/`run` and the cluster worker (docs/ARCHITECTURE.md,
    # "One clustering policy").
    min_cluster_size: int = Field(2, ge=1, description="faces a cluster needs to become a person, in the cluster job "
                                  "and the cluster worker alike; a face no other face agrees with waits unassigned")
    # A re-clustering batch costs ~1.3-1.8 s at 2,000 faces and 6-8 s at 4,500 (docs/BENCHMARKS.md).
    recluster_max_faces: int = Field(2000, ge=0, description="the cluster worker re-clusters a user from scratch, as "
                                     "`facecluster cluster` does, while the user has at most this many clusterable "
                                     "faces (the same photos then give the same albums embedded and in the cloud); "
                                     "above it, it files new faces incrementally; 0 = always incrementally")



def load_settings(config: str | os.PathLike | None = None, **overrides: Any) -> Settings:
    """Settings with an explicit TOML file (ranked below env vars) and overrides (ranked above)."""
    token = _config_file.set(str(config) if config else None)
    try:
        return Settings(**overrides)
    finally:
        _config_file.reset(token)
