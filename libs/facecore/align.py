"""Five-point alignment: a similarity transform onto the ArcFace 112x112 template.

The embedder was trained on crops made this way, so any other crop geometry costs
accuracy. Landmark order: left eye, right eye, nose, left mouth, right mouth.
"""

from __future__ import annotations

import cv2
import numpy as np

# Where the five landmarks sit in a 112x112 ArcFace-family training crop.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
CROP_SIZE = 112


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation taking src points to dst (Umeyama).

    Returns a 2x3 matrix M with dst ~ M @ [x, y, 1]. Reflections are excluded, so a
    mirrored face is never "aligned" by flipping it.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    var_s = (s**2).sum() / len(src)
    scale = (sig * sign).sum() / var_s if var_s > 0 else 1.0
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - m[:, :2] @ mu_s
    return m


def align_faces(image: np.ndarray, landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Crop every face of one image to (n, size, size, 3) uint8 by its five landmarks."""
    template = ARCFACE_TEMPLATE_112 * (size / CROP_SIZE)
    out = np.empty((len(landmarks), size, size, 3), np.uint8)
    for i, pts in enumerate(landmarks):
        m = similarity_transform(pts, template)
        out[i] = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out
