"""Pair verification (LFW View-2 style): one similarity per pair, always a number."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .types import PhotoResult


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """LFW pairs file -> list of (relative image path, relative image path)."""
    def img(name: str, i: str) -> str:
        return f"{name}/{name}_{int(i):04d}.jpg"

    out = []
    with open(path) as f:
        lines = [ln.split() for ln in f if ln.strip()]
    for parts in lines[1:]:
        if len(parts) == 3:
            out.append((img(parts[0], parts[1]), img(parts[0], parts[2])))
        elif len(parts) == 4:
            out.append((img(parts[0], parts[1]), img(parts[2], parts[3])))
        else:
            raise ValueError(f"{path}: cannot read pair line {' '.join(parts)!r}")
    return out


def central_face(result: PhotoResult):
    """The embedded face whose box centre is nearest the photo centre (LFW centres its subject)."""
    best, best_d = None, np.inf
    for f in result.faces:
        if f.embedding is None:
            continue
        cx, cy = (f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2
        d = (cx - result.width / 2) ** 2 + (cy - result.height / 2) ** 2
        if d < best_d:
            best, best_d = f, d
    return best


def pair_scores(emb: dict[str, np.ndarray | None], pairs: list[tuple[str, str]]) -> np.ndarray:
    """Cosine similarity per pair; a pair with a missing embedding gets -1 (surely 'different')."""
    out = np.empty(len(pairs), np.float64)
    for i, (a, b) in enumerate(pairs):
        ea, eb = emb.get(a), emb.get(b)
        out[i] = float(ea @ eb) if ea is not None and eb is not None else -1.0
    return out
