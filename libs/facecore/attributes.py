"""Face attributes (gender) from a small ONNX head on the embedder's output.

The head is a few kilobytes trained by ``training.attribute_head`` on frozen embeddings,
so it adds next to nothing to indexing. It only means something on vectors of the
embedder version it was trained on; that version is in the head file's metadata (pinned
with the file by sha256) and any other embedder is refused rather than silently given
meaningless attributes.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import numpy as np
import onnx

from .models import InferenceModel, resolve

log = logging.getLogger(__name__)

DEFAULT_HEAD = "gender-head"


class IncompatibleEmbedderError(ValueError):
    """The head was trained on another embedder's vectors."""


class AttributeHead(InferenceModel):
    """Embeddings in, one dict of attributes per face out."""

    def __init__(self, embedder_version: str, name_or_path: str | os.PathLike = DEFAULT_HEAD, *,
                 providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 1):
        path, version = resolve(str(name_or_path))
        model = onnx.load(str(path))
        meta = {p.key: p.value for p in model.metadata_props}
        self.embedder_version = meta.get("embedder_version")
        if self.embedder_version != embedder_version:
            raise IncompatibleEmbedderError(
                f"attribute head {version} was trained on embeddings of {self.embedder_version!r} "
                f"and cannot be used with {embedder_version!r}; train one for that embedder")
        # attribute -> (label when p < 0.5, label when p >= 0.5), in output column order
        self.labels: dict[str, list[str]] = json.loads(meta["attributes"])
        super().__init__(model, providers=providers, threads=threads, version=version)

    @classmethod
    def for_embedder(cls, embedder_version: str, **kw) -> AttributeHead | None:
        """The default head if it fits this embedder, else None (attributes are optional)."""
        try:
            return cls(embedder_version, **kw)
        except IncompatibleEmbedderError as e:
            log.info("no face attributes: %s", e)
            return None

    def predict_attributes(self, embeddings: np.ndarray) -> list[dict]:
        """(n, dim) embeddings -> per face e.g. {"gender": "F", "gender_p": 0.97}.

        ``<name>_p`` is the head's probability of the label it returns (>= 0.5), under
        equal class priors.
        """
        if len(embeddings) == 0:
            return []
        p = self.predict(np.ascontiguousarray(embeddings, dtype=np.float32))[0]
        out = []
        for row in p:
            d: dict = {}
            for (name, (low, high)), q in zip(self.labels.items(), row.tolist()):
                d[name] = high if q >= 0.5 else low
                d[f"{name}_p"] = max(q, 1.0 - q)
            out.append(d)
        return out
