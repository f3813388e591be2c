"""Decoding the bad-input corpus: every bad file is refused with its reason, every odd but valid
one comes out as an upright 8-bit RGB picture of what a viewer would show."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from badinput import EXIF_CANVAS, EXIF_FACE_AT, MAX_BYTES, SOURCES, exif_upright, lfw_image, make_corpus
from facecore.decode import PhotoError, decode, load
from facecore.detect import MTCNN
from facecore.settings import Settings

MAX_PIXELS = Settings().max_pixels


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("badinput")
    return root, make_corpus(root)


def outcome(path: Path) -> str:
    try:
        load(path, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    except PhotoError as e:
        return e.reason
    return "ok"


def source_rgb(name: str) -> np.ndarray:
    return np.asarray(Image.open(lfw_image(SOURCES[name])).convert("RGB"), dtype=np.int16)


def loaded(root: Path, name: str):
    return load(root / name, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)


def test_every_corpus_file_has_its_outcome(corpus):
    root, expected = corpus
    assert "ok" in expected.values() and len(set(expected.values())) > 5
    got = {name: outcome(root / name) for name in expected}
    wrong = {name: (want, got[name]) for name, want in expected.items()
             if not (got[name] == "ok" if want == "ok" else want in got[name])}
    assert not wrong, f"(expected, got) per file: {wrong}"


def test_good_files_decode_to_upright_rgb8(corpus):
    root, expected = corpus
    for name in (n for n, want in expected.items() if want == "ok"):
        d = loaded(root, name)
        data = (root / name).read_bytes()
        assert d.rgb.dtype == np.uint8 and d.rgb.ndim == 3 and d.rgb.shape[2] == 3, name
        assert (d.width, d.height) == (d.rgb.shape[1], d.rgb.shape[0]), name  # small: not downscaled
        assert d.scale == 1.0, name
        assert d.sha256 == hashlib.sha256(data).hexdigest(), name
        from_bytes = decode(data, max_pixels=MAX_PIXELS)
        np.testing.assert_array_equal(from_bytes.rgb, d.rgb, err_msg=name)


def test_pixels_survive_odd_encodings(corpus):
    """Each odd encoding shows the photo it was made from, not inverted, darkened or garbled."""
    root, _ = corpus
    for name, tolerance in [("good.jpg", 0), ("cmyk.jpg", 3), ("photo.webp", 6), ("anim.gif", 8)]:
        diff = np.abs(loaded(root, name).rgb.astype(np.int16) - source_rgb(name)).mean()
        assert diff <= tolerance, f"{name}: mean abs difference {diff:.2f} > {tolerance}"
    gray = loaded(root, "gray.jpg").rgb
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # 16-bit samples v * 257 keep their top byte: exactly the 8-bit gray the file was made from
    expected16 = np.asarray(Image.open(lfw_image(SOURCES["gray16.png"])).convert("L"))
    np.testing.assert_array_equal(loaded(root, "gray16.png").rgb, np.repeat(expected16[..., None], 3, axis=2))


def test_16_bit_samples_that_use_only_12_bits_are_stretched():
    """Camera and scanner data often fill 12 of 16 bits; a plain top-byte cut would leave it near black."""
    gray = np.asarray(Image.open(lfw_image(SOURCES["gray16.png"])).convert("L"))
    buf = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16) * 16).save(buf, "PNG")
    rgb = decode(buf.getvalue(), max_pixels=MAX_PIXELS).rgb
    np.testing.assert_array_equal(rgb[..., 0], gray)


def test_transparent_pixels_become_white(corpus):
    """The transparent pixels of alpha.png are black underneath; a viewer shows them on white."""
    rgb = loaded(corpus[0], "alpha.png").rgb
    assert (rgb[:10, :10] == 255).all() and (rgb[-10:, -10:] == 255).all()
    centre = rgb[100:150, 100:150].astype(np.int16)
    assert np.abs(centre - source_rgb("alpha.png")[100:150, 100:150]).max() == 0


@pytest.mark.parametrize("name", ["rotated-6.jpg", "rotated-8.jpg"])
def test_exif_rotation_gives_the_upright_picture(corpus, name):
    root, _ = corpus
    with Image.open(root / name) as raw:
        assert raw.size == EXIF_CANVAS[::-1]  # stored sideways
    d = loaded(root, name)
    assert (d.width, d.height) == EXIF_CANVAS
    assert d.rgb.shape[:2] == EXIF_CANVAS[::-1]
    diff = np.abs(d.rgb.astype(np.int16) - np.asarray(exif_upright(), dtype=np.int16)).mean()
    assert diff < 3, f"mean abs difference to the upright scene {diff:.2f}"


def test_exif_rotated_face_centre_is_in_upright_coordinates(corpus):
    """The face pasted at EXIF_FACE_AT is found there, not where the stored pixels have it."""
    root, _ = corpus
    detector = MTCNN(threads=2)
    upright = detector.detect([np.asarray(exif_upright())])[0]
    assert len(upright) == 1
    want = (upright.boxes[0, :2] + upright.boxes[0, 2:]) / 2
    assert np.abs(want - (np.array(EXIF_FACE_AT) + 125)).max() < 25  # LFW centres its subject
    for name in ("rotated-6.jpg", "rotated-8.jpg"):
        det = detector.detect([loaded(root, name).rgb])[0]
        assert len(det) == 1, name
        centre = (det.boxes[0, :2] + det.boxes[0, 2:]) / 2
        assert np.abs(centre - want).max() < 3, f"{name}: face centre {centre}, upright {want}"


def test_large_rotated_jpeg_is_shrunk_with_a_scale_back_to_full_size():
    """Draft decoding plus EXIF rotation: rgb is at most max_side, scale maps it to upright full size."""
    face = Image.open(lfw_image(SOURCES["good.jpg"])).convert("RGB").resize((2000, 2000))
    upright = Image.new("RGB", (3000, 2000), (128, 128, 128))
    upright.paste(face, (1000, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    d = decode(buf.getvalue(), max_pixels=MAX_PIXELS, max_side=1024)
    assert (d.width, d.height) == (3000, 2000)
    assert d.rgb.shape == (683, 1024, 3)
    assert d.scale == pytest.approx(3000 / 1024)
    want = np.asarray(upright.resize((1024, 683), Image.BILINEAR), dtype=np.int16)
    assert np.abs(d.rgb.astype(np.int16) - want).mean() < 2


def test_pixel_limit_setting_refuses_before_decoding(corpus):
    root, _ = corpus
    with pytest.raises(PhotoError, match="image too large"):
        load(root / "good.jpg", max_bytes=MAX_BYTES, max_pixels=250 * 250 - 1)
    # PIL's own bomb guard holds whatever the setting says
    with pytest.raises(PhotoError, match="decompression bomb"):
        load(root / "bomb.png", max_bytes=MAX_BYTES, max_pixels=10**12)


def test_byte_limit_is_inclusive(corpus):
    root, _ = corpus
    size = (root / "huge.jpg").stat().st_size
    assert size == MAX_BYTES + 1
    assert loaded(root, "good.jpg").width == 250
    assert load(root / "huge.jpg", max_bytes=size, max_pixels=MAX_PIXELS).width == 250  # only its size was wrong
