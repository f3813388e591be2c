"""Face embeddings from an ArcFace-family ONNX model on aligned 112x112 crops.

Flip test-time augmentation: the crop and its mirror are embedded in one batch and
averaged, which removes some pose/illumination asymmetry from the vector.

The embedder can also hand out one inner feature map, average-pooled, from the same
forward pass: the identity embedding is trained to forget what does not tell people
apart (gender among it), while the last feature map before it still carries that, so an
attribute head reads it at no extra inference cost.

An embedding head (``training.metric_head``) may follow the model: a small ONNX graph
trained on these frozen outputs. It is applied to the crop and to its mirror before they
are averaged, exactly as it saw single crops in training, and its version joins the
embedding version so vectors of different heads are never compared.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, shape_inference

from .attributes import EMBEDDING
from .models import (ACCELERATOR_BATCH, AcceleratorOptions, IncompatibleEmbedderError, InferenceModel,
                     make_batch_dynamic, resolve)

POOLED = "avgpool:"  # prefix of a feature name: "avgpool:<layer>" = that layer, average-pooled


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _normalises_inside(model: onnx.ModelProto) -> bool:
    """SFace and insightface models subtract/scale the input inside the graph (Sub/Mul first)."""
    return any(n.op_type in ("Sub", "Mul") for n in model.graph.node[:4])


FLIP = "+flip"  # the last part of a version whose vectors average each crop with its mirror


def vector_space(version: str) -> str:
    """The space a stored version's vectors live in: flip TTA averages two views of one
    model, so its vectors share that model's space (and its calibrated cut and centroid)."""
    return version.removesuffix(FLIP)


def embedder_version(name_or_path: str, flip_tta: bool, head: str | os.PathLike = "") -> str:
    """The version stored with embeddings of this embedder setup, without loading the model.

    The base model's version, then the embedding head's (a file's carries its sha256),
    then flip TTA: each of them changes the vectors.
    """
    head_version = f"+{resolve(str(head))[1]}" if head else ""
    return resolve(name_or_path)[1] + head_version + (FLIP if flip_tta else "")


def add_pooled_output(model: onnx.ModelProto, layer: str) -> tuple[onnx.ModelProto, str]:
    """Expose ``layer`` (N, C, H, W) average-pooled to (N, C) as an extra graph output.

    Returns the model and the new output's name. The channel count is written into the
    output's shape because OpenCV's importer refuses outputs without one.
    """
    inferred = shape_inference.infer_shapes(model)
    shapes = {v.name: v.type.tensor_type.shape.dim for v in inferred.graph.value_info}
    if layer not in shapes:
        raise ValueError(f"the embedder has no 4-d tensor named {layer!r} to pool")
    channels = shapes[layer][1].dim_value or "C"
    name = f"avgpool_{layer}"
    model.graph.node.extend([
        helper.make_node("GlobalAveragePool", [layer], [name + "_4d"], name=name + "_4d"),
        helper.make_node("Flatten", [name + "_4d"], [name], name=name),
    ])
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels]))
    return model, name


class EmbeddingHead(InferenceModel):
    """A head trained on one base model's outputs of single crops, mapping them to the final embedding.

    Its metadata pins the base model (``embedder_version``) and what it reads (``input``:
    ``embedding`` and/or one ``avgpool:<layer>``, comma-separated in graph-input order).
    On another model's vectors it would be meaningless, so such a head is refused.
    """

    def __init__(self, name_or_path: str | os.PathLike, base_version: str, *,
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 1,
                 accelerator: AcceleratorOptions | None = None):
        path, version = resolve(str(name_or_path))
        model = onnx.load(str(path))
        meta = {p.key: p.value for p in model.metadata_props}
        trained_on = meta.get("embedder_version", "")
        if trained_on != base_version:
            raise IncompatibleEmbedderError(
                f"embedding head {path} was trained on {trained_on!r} vectors and cannot follow the "
                f"{base_version!r} model; train one for that embedder (training.metric_head)")
        self.inputs = meta.get("input", EMBEDDING).split(",")
        layers = [i[len(POOLED):] for i in self.inputs if i.startswith(POOLED)]
        if len(layers) > 1 or any(i != EMBEDDING and not i.startswith(POOLED) for i in self.inputs):
            raise ValueError(f"embedding head {path} reads {self.inputs}; supported: {EMBEDDING!r} "
                             f"and at most one {POOLED}<layer>")
        self.pool_layer = layers[0] if layers else None
        self.dim = int(model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value)
        super().__init__(model, providers=providers, threads=threads, version=version, accelerator=accelerator)

    def apply(self, vectors: dict[str, np.ndarray]) -> np.ndarray:
        """Inputs by what they are (``self.inputs``) -> (n, dim) L2-normalised embeddings."""
        feeds = {name: np.ascontiguousarray(vectors[what], dtype=np.float32)
                 for name, what in zip(self.input_names, self.inputs)}
        return l2_normalize(self.run(feeds, self.output_names[:1])[0])


# Faces per embedder run. On a CPU small runs are as fast per face as large ones (SFace on
# OpenVINO, 2 threads: 7.4 ms/face at 8, 7.6 at 64) and hold an eighth of the activation
# memory (~5 MB a face); an accelerator wants whole batches: the faces of all photos of a
# pipeline batch go in large runs, ACCELERATOR_BATCH (256) by default, set by
# FACECLUSTER_ACCELERATOR_BATCH (Settings.accelerator_batch), which the TensorRT engine's
# shape profile is built for too.
CPU_BATCH = 8


class Embedder(InferenceModel):
    """Any ArcFace-style ONNX model: NCHW RGB 112x112 input, one embedding output.

    ``pool_layer`` names an inner 4-d tensor whose average-pooled value ``embed_with_features``
    also returns (from the crop itself, never its mirror). ``head`` (a path or registry name)
    is an ``EmbeddingHead`` for this model; the pooled layer it reads, if any, is the one
    handed out, as one forward pass gives one pooled output. ``base_version`` stays the
    model's own: attribute heads read its features, not the head's.
    """

    def __init__(self, name_or_path: str = "sface", *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int = 0, flip_tta: bool = True, backend: str = "onnxruntime",
                 pool_layer: str | None = None, head: str | os.PathLike | None = None, precision: str = "auto",
                 accelerator: AcceleratorOptions | None = None):
        path, self.base_version = resolve(name_or_path)
        model = make_batch_dynamic(onnx.load(str(path)))
        self.in_graph_norm = _normalises_inside(model)
        self.head = (EmbeddingHead(head, self.base_version, providers=providers, threads=1, accelerator=accelerator)
                     if head else None)
        if self.head and self.head.pool_layer and pool_layer not in (None, self.head.pool_layer):
            raise ValueError(f"the embedding head reads {POOLED}{self.head.pool_layer}, {POOLED}{pool_layer} was "
                             "asked for; the embedder hands out one pooled layer")
        self.dim = self.head.dim if self.head else int(model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value)
        self.pool_layer = pool_layer or (self.head.pool_layer if self.head else None)
        if self.pool_layer:
            model, _ = add_pooled_output(model, self.pool_layer)
        super().__init__(model, providers=providers, threads=threads,
                         version=embedder_version(name_or_path, flip_tta, head or ""), backend=backend,
                         precision=precision, accelerator=accelerator)
        self.flip_tta = flip_tta

    @property
    def feature_name(self) -> str | None:
        """What ``embed_with_features`` returns besides embeddings, as attribute heads name their input."""
        return POOLED + self.pool_layer if self.pool_layer else None

    def _prepare(self, crops: np.ndarray) -> np.ndarray:
        x = crops.astype(np.float32).transpose(0, 3, 1, 2)
        if not self.in_graph_norm:
            x = (x - 127.5) / 127.5
        return np.ascontiguousarray(x)

    @property
    def batch_size(self) -> int:
        if not self.on_accelerator:
            return CPU_BATCH
        return self.accelerator.max_batch if self.accelerator else ACCELERATOR_BATCH

    def embed(self, crops: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """(n, 112, 112, 3) uint8 RGB crops -> (n, dim) L2-normalised float32; ``batch_size``
        faces per model run (default: ``self.batch_size``)."""
        return self.embed_with_features(crops, batch_size)[0]

    def embed_with_features(self, crops: np.ndarray, batch_size: int | None = None
                            ) -> tuple[np.ndarray, np.ndarray | None]:
        """Embeddings as ``embed``, and the pooled ``pool_layer`` features (None without one)."""
        if len(crops) == 0:
            return np.zeros((0, self.dim), np.float32), (np.zeros((0, 0), np.float32) if self.pool_layer else None)
        out, pooled = [], []
        batch_size = batch_size or self.batch_size
        step = max(1, batch_size // 2 if self.flip_tta else batch_size)
        for i in range(0, len(crops), step):
            chunk = crops[i : i + step]
            n = len(chunk)
            if self.flip_tta:
                chunk = np.concatenate([chunk, chunk[:, :, ::-1]])
            res = self.predict(self._prepare(chunk))
            feats = l2_normalize(res[0].reshape(len(chunk), -1))
            if self.head:
                vectors = {EMBEDDING: feats}
                if self.pool_layer:
                    vectors[self.feature_name] = res[1]
                feats = self.head.apply(vectors)
            if self.flip_tta:
                feats = feats[:n] + feats[n:]
            out.append(l2_normalize(feats))
            if self.pool_layer:
                pooled.append(res[1][:n])
        emb = np.concatenate(out).astype(np.float32)
        return emb, (np.concatenate(pooled).astype(np.float32) if self.pool_layer else None)
