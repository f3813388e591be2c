"""Photo decoding that refuses bad input with a reason instead of crashing the worker.

EXIF orientation is applied before detection, so boxes are in upright-image pixels.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decoding a very large JPEG at full size only to shrink it for detection wastes
# time and memory; PIL's draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 instead.
DEFAULT_MAX_SIDE = 2048


class PhotoError(Exception):
    """A photo that cannot be indexed; ``reason`` is short and stored with the photo."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class DecodedPhoto:
    rgb: np.ndarray  # HxWx3 uint8, upright, possibly downscaled
    scale: float  # multiply coordinates in ``rgb`` by this to get upright full-size pixels
    width: int  # upright full-size width
    height: int
    sha256: str


def read_bytes(path: str | os.PathLike, max_bytes: int) -> bytes:
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise PhotoError("empty file (0 bytes)")
        if size > max_bytes:
            raise PhotoError(f"file too large ({size} bytes > limit {max_bytes})")
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise PhotoError("file not found") from None
    except PermissionError:
        raise PhotoError("permission denied") from None
    except IsADirectoryError:
        raise PhotoError("is a directory") from None
    except OSError as e:
        raise PhotoError(f"cannot read file: {e.strerror or e}") from None


def _to_rgb8(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.uint32)
        top = max(int(a.max()), 1)
        shift = max(0, top.bit_length() - 8)
        img = Image.fromarray((a >> shift).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        img = Image.fromarray(((a - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() copies even when nothing changes


def decode(data: bytes, *, max_pixels: int, max_side: int = DEFAULT_MAX_SIDE) -> DecodedPhoto:
    if not data:
        raise PhotoError("empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w0, h0 = img.size
            if w0 * h0 > max_pixels:
                raise PhotoError(f"image too large ({w0}x{h0} = {w0 * h0} pixels > limit {max_pixels})")
            if w0 == 0 or h0 == 0:
                raise PhotoError("image has zero width or height")
            if img.format == "JPEG" and max(w0, h0) > max_side:
                img.draft("RGB", (max(1, w0 * max_side // max(w0, h0)), max(1, h0 * max_side // max(w0, h0))))
            img.load()
            orientation = img.getexif().get(0x0112, 1)
            if orientation != 1:  # exif_transpose copies the photo even when it is upright
                img = ImageOps.exif_transpose(img)
            img = _to_rgb8(img)
    except PhotoError:
        raise
    except UnidentifiedImageError:
        raise PhotoError("not an image, or an unsupported format") from None
    except Image.DecompressionBombError as e:
        raise PhotoError(f"decompression bomb refused: {e}") from None
    except Image.DecompressionBombWarning as e:
        raise PhotoError(f"decompression bomb refused: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg:
            raise PhotoError("truncated image") from None
        raise PhotoError(f"corrupt image: {msg}") from None
    rotated = orientation in (5, 6, 7, 8)
    full_w, full_h = (h0, w0) if rotated else (w0, h0)
    if max(img.size) > max_side:
        f = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.BILINEAR)
    rgb = np.asarray(img, dtype=np.uint8)
    return DecodedPhoto(rgb=rgb, scale=full_w / rgb.shape[1], width=full_w, height=full_h, sha256=digest)


def load(path: str | os.PathLike, *, max_bytes: int, max_pixels: int, max_side: int = DEFAULT_MAX_SIDE) -> DecodedPhoto:
    return decode(read_bytes(path, max_bytes), max_pixels=max_pixels, max_side=max_side)
