"""Blur score: variance of the Laplacian of the aligned face crop.

Measured on the fixed-size aligned crop, so the score does not depend on how large
the face was in the photo, and divided by the crop's own intensity variance, so a
dim or low-contrast but sharp face is not mistaken for a blurry one.
"""

from __future__ import annotations

import cv2
import numpy as np

# Calibrated on LFW-dev with synthetic Gaussian blur (benchmarks/calibrate_blur.py,
# docs/BENCHMARKS.md): below this a face is flagged blurry and kept out of clustering.
# It sits under the sharp central faces' 0.1% quantile and above the median of crops
# blurred with sigma 3 px, where the embedding has lost ~30% of its cosine to the sharp one.
DEFAULT_BLUR_THRESHOLD = 0.1


def blur_scores(crops: np.ndarray) -> np.ndarray:
    """(n, h, w, 3) uint8 aligned crops -> (n,) normalised Laplacian variance; higher = sharper."""
    out = np.empty(len(crops), np.float32)
    for i, crop in enumerate(crops):
        gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
        # the central region: the template puts the eyes, nose and mouth there, and the
        # replicated border of faces near the photo edge would read as "flat"
        h, w = gray.shape
        core = gray[h // 8 : h - h // 8, w // 8 : w - w // 8]
        lap = cv2.Laplacian(core, cv2.CV_32F, ksize=3)
        out[i] = float(lap.var()) / (float(core.var()) + 1e-4)
    return out
