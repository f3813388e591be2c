"""A corpus of bad and awkward photos, written on the fly, with the outcome each must have.

Real libraries hold truncated uploads, files that only claim to be JPEGs, CMYK scans, 16-bit
PNGs, phone photos stored sideways with an EXIF orientation tag, and the odd decompression
bomb. Indexing must record each bad one as failed with a reason and go on with the rest.
Nothing binary is committed: every file is made here from LFW-dev photos.
"""

from __future__ import annotations

import io
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

# The small max_bytes the corpus is indexed with; huge.jpg is just over it, every other file far below.
MAX_BYTES = 1_000_000
# Declared size of bomb.png: 9e8 pixels, ten times PIL's bomb limit; about 110 kB on disk.
BOMB_SIZE = (30_000, 30_000)
# rotated-6.jpg / rotated-8.jpg decode to this upright scene: a gray canvas with the face photo
# pasted at EXIF_FACE_AT, so the upright face centre is far from where the stored pixels have it.
EXIF_CANVAS = (450, 250)
EXIF_FACE_AT = (200, 0)
EXIF_SOURCE = "Colin_Powell/Colin_Powell_0044.jpg"
# One frontal face each (MTCNN finds exactly one); a different photo per file keeps every file's
# bytes distinct, so each file is its own photo row.
SOURCES = {
    "good.jpg": "Al_Cardenas/Al_Cardenas_0001.jpg",
    "unreadable.jpg": "Amelia_Vega/Amelia_Vega_0003.jpg",
    "alpha.png": "Andy_Roddick/Andy_Roddick_0003.jpg",
    "gray.jpg": "Bill_Kollar/Bill_Kollar_0001.jpg",
    "cmyk.jpg": "Brandon_Robinson/Brandon_Robinson_0001.jpg",
    "gray16.png": "Charla_Moye/Charla_Moye_0001.jpg",
    "anim.gif": "Cindy_Crawford/Cindy_Crawford_0001.jpg",
    "photo.webp": "Guy_Ritchie/Guy_Ritchie_0001.jpg",
    "huge.jpg": "Hugo_Chavez/Hugo_Chavez_0043.jpg",
    "corrupt-scan.jpg": "James_Hill/James_Hill_0001.jpg",
    "truncated.jpg": "Larry_Flynt/Larry_Flynt_0001.jpg",
}


def lfw_dev() -> Path:
    """LFW-dev root: ``<repo>/../shared/data/lfw-dev``, or $FACECLUSTER_LFW_DEV. Missing data fails the run."""
    default = Path(__file__).resolve().parents[1].parent / "shared/data/lfw-dev"
    root = Path(os.environ.get("FACECLUSTER_LFW_DEV") or default)
    if not (root / "images").is_dir():
        pytest.fail(f"LFW-dev photos not found at {root}; set FACECLUSTER_LFW_DEV")
    return root


def lfw_image(rel: str) -> Path:
    path = lfw_dev() / "images" / rel
    assert path.is_file(), f"LFW-dev photo {rel} is missing"
    return path


def _rgb(rel: str) -> Image.Image:
    with Image.open(lfw_image(rel)) as im:
        return im.convert("RGB")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_upright() -> Image.Image:
    """The upright scene that the EXIF-rotated files show once their orientation is applied."""
    canvas = Image.new("RGB", EXIF_CANVAS, (128, 128, 128))
    canvas.paste(_rgb(EXIF_SOURCE), EXIF_FACE_AT)
    return canvas


def _exif_rotated(orientation: int) -> bytes:
    """A JPEG whose stored pixels are turned sideways and whose tag says how to turn them back.

    exif_transpose rotates orientation 6 by 90 degrees clockwise and 8 counter-clockwise, so the
    stored pixels are the upright scene turned the other way.
    """
    stored = exif_upright().transpose({6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png() -> bytes:
    """A real 1-bit PNG of BOMB_SIZE all-black pixels: small on disk, ~900 MB once decoded by PIL."""
    w, h = BOMB_SIZE
    row = bytes(1 + (w + 7) // 8)  # filter byte 0, then zeros
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * 1000) for _ in range(h // 1000)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _alpha_png(face: Image.Image) -> bytes:
    """The face inside an opaque ellipse; outside it fully transparent black pixels."""
    mask = Image.new("L", face.size, 0)
    ImageDraw.Draw(mask).ellipse((40, 30, 210, 230), fill=255)
    rgba = Image.new("RGBA", face.size, (0, 0, 0, 0))
    rgba.paste(face, (0, 0), mask)
    return _encode(rgba, "PNG")


def _gray16_png(face: Image.Image) -> bytes:
    a = np.asarray(face.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    return _encode(img, "PNG")


def _gif(face: Image.Image) -> bytes:
    """Two frames: the face first (what a decoder shows), then a blank frame."""
    blank = Image.new("RGB", face.size, (200, 200, 200))
    return _encode(face, "GIF", save_all=True, append_images=[blank], duration=500, loop=0)


def _corrupt_scan(jpeg: bytes) -> bytes:
    """Valid JPEG headers, then random entropy-coded data where the picture should be."""
    sos = jpeg.index(b"\xff\xda")
    header_end = sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")
    noise = random.Random(1).randbytes(len(jpeg) - header_end - 2)
    return jpeg[:header_end] + noise + b"\xff\xd9"


def make_corpus(dir: Path) -> dict[str, str]:
    """Write the corpus into dir; returns file name -> "ok" or a substring of the failure reason.

    Every "ok" file shows one LFW face. missing.jpg is listed but not on disk (deleted between
    listing and reading). unreadable.jpg is chmod 000; root reads it anyway (permission bits do
    not bind root), so its outcome is "ok" when this process can still read it (os.access).
    """
    dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    expected: dict[str, str] = {}

    def add(name: str, data: bytes, outcome: str) -> None:
        files[name], expected[name] = data, outcome

    jpeg = {name: lfw_image(rel).read_bytes() for name, rel in SOURCES.items()}
    face = {name: _rgb(rel) for name, rel in SOURCES.items()}

    add("good.jpg", jpeg["good.jpg"], "ok")
    add("soi-then-noise.jpg", b"\xff\xd8\xff" + random.Random(2).randbytes(4000), "not an image")
    add("corrupt-scan.jpg", _corrupt_scan(jpeg["corrupt-scan.jpg"]), "corrupt image")
    add("truncated.jpg", jpeg["truncated.jpg"][: int(len(jpeg["truncated.jpg"]) * 0.4)], "truncated")
    add("empty.jpg", b"", "empty file")
    add("text.jpg", b"Not a photo: a note someone saved with the wrong extension.\n", "not an image")
    add("alpha.png", _alpha_png(face["alpha.png"]), "ok")
    add("gray.jpg", _encode(face["gray.jpg"].convert("L"), "JPEG", quality=95), "ok")
    add("cmyk.jpg", _encode(face["cmyk.jpg"].convert("CMYK"), "JPEG", quality=95), "ok")
    add("gray16.png", _gray16_png(face["gray16.png"]), "ok")
    add("rotated-6.jpg", _exif_rotated(6), "ok")
    add("rotated-8.jpg", _exif_rotated(8), "ok")
    add("bomb.png", _bomb_png(), "decompression bomb")
    add("unreadable.jpg", jpeg["unreadable.jpg"], "permission denied")
    add("anim.gif", _gif(face["anim.gif"]), "ok")
    add("photo.webp", _encode(face["photo.webp"], "WEBP", quality=90), "ok")
    add("huge.jpg", jpeg["huge.jpg"] + bytes(MAX_BYTES + 1 - len(jpeg["huge.jpg"])), "file too large")
    add("missing.jpg", b"", "file not found")

    for name, data in files.items():
        (dir / name).write_bytes(data)
    (dir / "missing.jpg").unlink()
    unreadable = dir / "unreadable.jpg"
    unreadable.chmod(0)
    if os.access(unreadable, os.R_OK):
        expected["unreadable.jpg"] = "ok"
    return expected
