"""Face attributes (gender) from a small ONNX head on what the embedder computes anyway.

The head is a few kilobytes trained by ``training.attribute_head`` on frozen vectors, so
it adds next to nothing to indexing. It reads either the embeddings or one pooled inner
feature map of the embedder (its metadata says which, as ``input``), and it only means
something on vectors of the embedder version it was trained on. Both are in the head
file's metadata, pinned with the file by sha256; any other source is refused rather
than silently given meaningless attributes.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import numpy as np
import onnx

from .models import IncompatibleEmbedderError, InferenceModel, resolve

log = logging.getLogger(__name__)

DEFAULT_HEAD = "gender-head"
# every shipped head, each for the embedder version its metadata names
HEADS = (DEFAULT_HEAD, "gender-head-w600k-mbf")
EMBEDDING = "embedding"  # the input name of heads that read the embeddings themselves


def head_source(name_or_path: str | os.PathLike = DEFAULT_HEAD) -> tuple[str, str]:
    """(what the head reads, the embedder version it was trained on): ``"embedding"`` or a
    feature such as ``"avgpool:conv_14_relu"``, and e.g. ``"sface-2021dec"``."""
    meta = {p.key: p.value for p in onnx.load(str(resolve(str(name_or_path))[0])).metadata_props}
    return meta.get("input", EMBEDDING), meta.get("embedder_version", "")


def head_for(embedder_base_version: str) -> str | None:
    """The shipped head trained on this model's vectors, or None."""
    return next((h for h in HEADS if head_source(h)[1] == embedder_base_version), None)


def vector_version(embedder_version: str, head_input: str) -> str:
    """The version of a head's input vectors: embeddings carry the embedder's full version
    (flip TTA changes them); a pooled feature is read from the unmirrored crop, so it
    depends on the model alone."""
    return embedder_version if head_input == EMBEDDING else f"{embedder_version}|{head_input}"


class AttributeHead(InferenceModel):
    """Vectors in, one dict of attributes per face out.

    ``vectors`` is the version of what will be fed (see ``vector_version``); a head
    trained on anything else is refused.
    """

    def __init__(self, vectors: str, name_or_path: str | os.PathLike = DEFAULT_HEAD, *,
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 1):
        path, version = resolve(str(name_or_path))
        model = onnx.load(str(path))
        meta = {p.key: p.value for p in model.metadata_props}
        self.embedder_version = meta.get("embedder_version", "")
        self.input = meta.get("input", EMBEDDING)
        wanted = vector_version(self.embedder_version, self.input)
        if wanted != vectors:
            raise IncompatibleEmbedderError(
                f"attribute head {version} was trained on vectors {wanted!r} "
                f"and cannot be used with {vectors!r}; train one for that embedder")
        # attribute -> (label when p < 0.5, label when p >= 0.5), in output column order
        self.labels: dict[str, list[str]] = json.loads(meta["attributes"])
        super().__init__(model, providers=providers, threads=threads, version=version)

    @classmethod
    def for_vectors(cls, vectors: str, **kw) -> AttributeHead | None:
        """The default head if it reads these vectors, else None (attributes are optional)."""
        try:
            return cls(vectors, **kw)
        except IncompatibleEmbedderError as e:
            log.info("no face attributes: %s", e)
            return None

    def predict_attributes(self, vectors: np.ndarray) -> list[dict]:
        """(n, dim) input vectors -> per face e.g. {"gender": "F", "gender_p": 0.97}.

        ``<name>_p`` is the head's probability of the label it returns (>= 0.5), under
        equal class priors.
        """
        if len(vectors) == 0:
            return []
        p = self.predict(np.ascontiguousarray(vectors, dtype=np.float32))[0]
        out = []
        for row in p:
            d: dict = {}
            for (name, (low, high)), q in zip(self.labels.items(), row.tolist()):
                d[name] = high if q >= 0.5 else low
                d[f"{name}_p"] = max(q, 1.0 - q)
            out.append(d)
        return out
