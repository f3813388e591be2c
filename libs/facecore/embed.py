"""Face embeddings from an ArcFace-family ONNX model on aligned 112x112 crops.

Flip test-time augmentation: the crop and its mirror are embedded in one batch and
averaged, which removes some pose/illumination asymmetry from the vector.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx

from .models import InferenceModel, make_batch_dynamic, resolve


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _normalises_inside(model: onnx.ModelProto) -> bool:
    """SFace and insightface models subtract/scale the input inside the graph (Sub/Mul first)."""
    return any(n.op_type in ("Sub", "Mul") for n in model.graph.node[:4])


def embedder_version(name_or_path: str, flip_tta: bool) -> str:
    """The version stored with embeddings of this embedder setup, without loading the model."""
    return resolve(name_or_path)[1] + ("+flip" if flip_tta else "")


class Embedder(InferenceModel):
    """Any ArcFace-style ONNX model: NCHW RGB 112x112 input, one embedding output."""

    def __init__(self, name_or_path: str = "sface", *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int = 0, flip_tta: bool = True, backend: str = "onnxruntime"):
        path, _ = resolve(name_or_path)
        model = make_batch_dynamic(onnx.load(str(path)))
        self.in_graph_norm = _normalises_inside(model)
        self.dim = int(model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value)
        super().__init__(model, providers=providers, threads=threads,
                         version=embedder_version(name_or_path, flip_tta), backend=backend)
        self.flip_tta = flip_tta

    def _prepare(self, crops: np.ndarray) -> np.ndarray:
        x = crops.astype(np.float32).transpose(0, 3, 1, 2)
        if not self.in_graph_norm:
            x = (x - 127.5) / 127.5
        return np.ascontiguousarray(x)

    def embed(self, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(n, 112, 112, 3) uint8 RGB crops -> (n, dim) L2-normalised float32."""
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = []
        step = max(1, batch_size // 2 if self.flip_tta else batch_size)
        for i in range(0, len(crops), step):
            chunk = crops[i : i + step]
            if self.flip_tta:
                chunk = np.concatenate([chunk, chunk[:, :, ::-1]])
            feats = l2_normalize(self.predict(self._prepare(chunk))[0].reshape(len(chunk), -1))
            if self.flip_tta:
                half = len(feats) // 2
                feats = feats[:half] + feats[half:]
            out.append(l2_normalize(feats))
        return np.concatenate(out).astype(np.float32)
