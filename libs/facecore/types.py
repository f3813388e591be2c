"""Plain records that flow between pipeline stages and out to storage."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Detections:
    """Faces found in one image; coordinates in the pixels of the (EXIF-upright) image.

    landmarks are (n, 5, 2): left eye, right eye, nose, left mouth corner, right mouth
    corner, "left" meaning smaller x in the image.
    """

    boxes: np.ndarray  # (n, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (n,) float32
    landmarks: np.ndarray  # (n, 5, 2) float32

    def __len__(self) -> int:
        return len(self.scores)

    @staticmethod
    def empty() -> "Detections":
        return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))


@dataclass
class FaceRecord:
    """One face ready to store: geometry, quality flags, embedding and attributes."""

    index: int  # position of the face within its photo, stable for the same photo and model
    box: np.ndarray
    landmarks: np.ndarray
    det_score: float
    blur: float  # normalised variance of the Laplacian of the aligned crop
    blurry: bool
    trash_score: float | None  # cosine similarity to the non-face centroid; None until a trash model is set
    is_trash: bool
    embedding: np.ndarray | None  # L2-normalised float32
    model_version: str
    attributes: dict = field(default_factory=dict)


@dataclass
class PhotoResult:
    """What the pipeline made of one photo: faces, or a failure with a reason."""

    key: str  # caller's identifier (path relative to the indexed folder, or photo id)
    sha256: str | None = None
    width: int = 0
    height: int = 0
    faces: list[FaceRecord] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
