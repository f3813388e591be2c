"""Trash faces: detector false positives (flowers, wheels, fabric, emoji) that reach the embedder.

Their embeddings are not spread at random: the embedder maps things that are not faces
into one region of its space, so the mean embedding of known non-faces (the trash
centroid) and a sphere around it set them apart; the cloud-drive talk reports ROC AUC
97% for this. Trash faces are stored and flagged, and kept out of clustering and export.

The centroid ships with facecore, built and calibrated by ``benchmarks/calibrate_trash.py``
(card in ``assets/trash_centroid.json``: how it was made, the threshold, what it
catches), pinned by sha256 and tied to the embedder version it was computed with.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from .embed import vector_space
from .models import IncompatibleEmbedderError, resolve

log = logging.getLogger(__name__)

DEFAULT_TRASH = "trash-centroid"
# every shipped centroid, each for the embedder version its card names
CENTROIDS = (DEFAULT_TRASH, "trash-centroid-w600k-mbf")


def trash_scores(embeddings: np.ndarray, centroid: np.ndarray) -> np.ndarray:
    """Cosine of L2-normalised embeddings (n, d) to the unit trash centroid (d,): higher = more trash-like."""
    if len(embeddings) == 0:
        return np.zeros(0, np.float32)
    return (np.asarray(embeddings, np.float32) @ np.asarray(centroid, np.float32)).astype(np.float32)


class TrashModel:
    """The trash centroid of one embedder version and the cosine from which a face is trash."""

    def __init__(self, embedder_version: str, name_or_path: str | os.PathLike = DEFAULT_TRASH,
                 threshold: float = 0.0):
        path, self.version = resolve(str(name_or_path))
        card = json.loads(path.with_suffix(".json").read_text())
        # Flip-TTA vectors are the same model's: on LFW-dev their faces stay under the
        # threshold set on single crops (central faces' highest cosine 0.432 against 0.452).
        if card["embedder_version"] != vector_space(embedder_version):
            raise IncompatibleEmbedderError(
                f"trash centroid {self.version} was computed with {card['embedder_version']!r} and cannot be "
                f"used with {embedder_version!r}; rebuild it with benchmarks/calibrate_trash.py")
        centroid = np.load(path, allow_pickle=False).astype(np.float32).reshape(-1)
        self.centroid = centroid / np.linalg.norm(centroid)
        self.threshold = float(threshold or card["threshold"])

    @classmethod
    def for_embedder(cls, embedder_version: str, **kw) -> TrashModel | None:
        """The shipped centroid made for this embedder version, else None (faces then get no
        trash score)."""
        for name in CENTROIDS:
            try:
                return cls(embedder_version, name, **kw)
            except IncompatibleEmbedderError:
                continue
        log.info("no trash-face rejection: no shipped trash centroid was computed with %s; build one with "
                 "benchmarks/calibrate_trash.py", embedder_version)
        return None

    def classify(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, is_trash) for (n, d) embeddings."""
        s = trash_scores(embeddings, self.centroid)
        return s, s >= self.threshold
