"""The real models (MTCNN + SFace) over bad input and LFW-dev: bad photos fail alone with a reason,
good ones get faces and embeddings, and the embeddings tell people apart."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from badinput import EXIF_CANVAS, EXIF_FACE_AT, MAX_BYTES, SOURCES, lfw_dev, lfw_image, make_corpus
from facecore.pipeline import FacePipeline
from facecore.settings import Settings
from facecore.types import PhotoResult
from facecore.verify import central_face, read_pairs

PAIRS_PER_KIND = 8


@pytest.fixture(scope="module")
def pipeline():
    p = FacePipeline(Settings(max_bytes=MAX_BYTES, threads=2, flip_tta=True))
    yield p
    p.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("badinput")
    return root, make_corpus(root)


@pytest.fixture(scope="module")
def corpus_results(pipeline, corpus) -> dict[str, PhotoResult]:
    """The whole corpus in one process() call: one batch, bad and good photos mixed."""
    root, expected = corpus
    items = [(name, root / name) for name in expected]
    results = pipeline.process(items)
    assert [r.key for r in results] == [k for k, _ in items]
    return {r.key: r for r in results}


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def centre(box: np.ndarray) -> np.ndarray:
    return (np.asarray(box[:2]) + np.asarray(box[2:4])) / 2


def test_failures_carry_their_reason(corpus, corpus_results):
    _, expected = corpus
    for name, want in expected.items():
        r = corpus_results[name]
        if want == "ok":
            assert r.ok, f"{name} failed: {r.error}"
        else:
            assert not r.ok and want in r.error, f"{name}: expected {want!r}, got {r.error!r}"
            assert r.faces == [], name


def test_good_photos_have_one_embedded_face(pipeline, corpus, corpus_results):
    _, expected = corpus
    good = [name for name, want in expected.items() if want == "ok"]
    assert len(good) >= 10
    for name in good:
        r = corpus_results[name]
        assert r.sha256 and (r.width, r.height) in [(250, 250), EXIF_CANVAS], name
        assert len(r.faces) == 1, f"{name}: {len(r.faces)} faces"
        face = r.faces[0]
        assert face.det_score > 0.9, name
        x1, y1, x2, y2 = face.box
        assert 0 <= x1 < x2 <= r.width and 0 <= y1 < y2 <= r.height, f"{name}: box {face.box}"
        assert face.embedding is not None and face.embedding.shape == (pipeline.embedder.dim,), name
        assert np.isfinite(face.embedding).all() and np.linalg.norm(face.embedding) == pytest.approx(1, abs=1e-4)
        assert face.model_version == pipeline.model_version


def test_exif_rotated_faces_are_found_in_upright_coordinates(corpus_results):
    want = np.array(EXIF_FACE_AT) + 125  # LFW centres its subject in the 250 x 250 photo
    a, b = (corpus_results[n].faces[0] for n in ("rotated-6.jpg", "rotated-8.jpg"))
    for face in (a, b):
        assert np.abs(centre(face.box) - want).max() < 25, face.box
    assert float(a.embedding @ b.embedding) > 0.95  # the same upright picture both times


def test_odd_encodings_embed_like_the_original_jpeg(pipeline, corpus_results):
    """A CMYK, WEBP or GIF copy of a photo is still that photo to the embedder."""
    names = ["cmyk.jpg", "photo.webp", "anim.gif", "alpha.png"]
    originals = pipeline.process([(n, lfw_image(SOURCES[n])) for n in names])
    for name, orig in zip(names, originals):
        sim = float(central_face(orig).embedding @ corpus_results[name].faces[0].embedding)
        assert sim > 0.8, f"{name}: cosine {sim:.3f} to the original JPEG"


def test_a_batch_of_only_bad_photos_returns_every_failure(pipeline, corpus):
    root, expected = corpus
    bad = [name for name, want in expected.items() if want != "ok"]
    results = pipeline.process([(name, root / name) for name in bad] + [("bytes", b"\x00" * 10)])
    assert [r.key for r in results] == bad + ["bytes"]
    assert all(not r.ok and r.error for r in results)


def test_bytes_and_path_give_identical_embeddings(pipeline):
    path = lfw_image(SOURCES["good.jpg"])
    (from_path,) = pipeline.process([("path", path)])
    (from_bytes,) = pipeline.process([("bytes", path.read_bytes())])
    assert from_path.sha256 == from_bytes.sha256
    assert len(from_path.faces) == len(from_bytes.faces) == 1
    np.testing.assert_array_equal(from_path.faces[0].box, from_bytes.faces[0].box)
    np.testing.assert_array_equal(from_path.faces[0].embedding, from_bytes.faces[0].embedding)


def test_mirrored_photo_embeds_like_the_original_with_flip_tta(pipeline):
    assert pipeline.embedder.flip_tta
    img = Image.open(lfw_image(SOURCES["good.jpg"])).convert("RGB")
    mirror = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    orig, mirrored = pipeline.process([("orig", png(img)), ("mirrored", png(mirror))])
    a, b = central_face(orig), central_face(mirrored)
    # found where the mirror puts it, give or take MTCNN not being exactly mirror-symmetric
    assert np.abs(centre(b.box) - [250 - centre(a.box)[0], centre(a.box)[1]]).max() < 10
    sim = float(a.embedding @ b.embedding)
    assert sim > 0.9, f"cosine {sim:.3f} between a photo and its mirror image"


@pytest.fixture(scope="module")
def mbf_pipeline():
    p = FacePipeline(Settings(embedder="w600k-mbf", threads=2, flip_tta=True))
    yield p
    p.close()


@pytest.mark.parametrize("which", ["pipeline", "mbf_pipeline"])
def test_same_person_scores_above_different_people(which, request):
    """The first LFW-dev pairs of each kind: a clear mean margin, not one lucky pair; for the
    shipped SFace and for the opt-in w600k-mbf."""
    pipeline = request.getfixturevalue(which)
    root = lfw_dev()
    pairs = read_pairs(root / "pairs.txt")
    same = [p for p in pairs if Path(p[0]).parent == Path(p[1]).parent][:PAIRS_PER_KIND]
    diff = [p for p in pairs if Path(p[0]).parent != Path(p[1]).parent][:PAIRS_PER_KIND]
    assert len(same) == len(diff) == PAIRS_PER_KIND
    photos = sorted({photo for pair in same + diff for photo in pair})
    emb = {}
    for r in pipeline.process([(p, root / "images" / p) for p in photos]):
        face = central_face(r)
        assert face is not None, f"no embedded face in {r.key}"
        emb[r.key] = face.embedding
    s_same = np.array([emb[a] @ emb[b] for a, b in same])
    s_diff = np.array([emb[a] @ emb[b] for a, b in diff])
    assert s_same.mean() - s_diff.mean() > 0.3, (s_same.round(3), s_diff.round(3))
    assert (s_same > s_diff.max()).mean() >= 0.75, (s_same.round(3), s_diff.round(3))


def arcface_shaped_model(path: Path) -> Path:
    """An ONNX file with an ArcFace model's interface (N x 3 x 112 x 112 in, N x 64 out) and
    none of SFace's inner layers; its fixed weights only make the shapes real."""
    from onnx import TensorProto, helper, numpy_helper, save

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w"], ["embedding"], transB=1)]
    graph = helper.make_graph(nodes, "arcface_shaped",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 64])], [w])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_any_arcface_style_model_loads_by_path(tmp_path):
    """The attribute head and the trash centroid belong to SFace: another model indexes
    without them instead of failing on SFace's layer names."""
    model = arcface_shaped_model(tmp_path / "other_model.onnx")
    p = FacePipeline(Settings(embedder=str(model), threads=1))
    try:
        assert p.model_version.startswith("other_model-")
        assert p.attributes is None and p.trash is None
        (r,) = p.process([("x", lfw_image(SOURCES["good.jpg"]))])
        assert r.ok and r.faces
        for f in r.faces:
            assert f.embedding.shape == (64,) and not f.attributes and f.trash_score is None
            np.testing.assert_allclose(np.linalg.norm(f.embedding), 1.0, rtol=1e-5)
    finally:
        p.close()


def test_max_side_decodes_big_photos_smaller_and_reports_full_size_boxes(pipeline, tmp_path):
    """FACECLUSTER_MAX_SIDE: a 1,500 px photo decoded at 600 px still gives its face, in
    full-size coordinates, with a vector close to (not equal to) the one at full resolution."""
    big = tmp_path / "big.jpg"
    with Image.open(lfw_image(SOURCES["good.jpg"])) as im:
        im.convert("RGB").resize((1500, 1500), Image.BICUBIC).save(big, quality=95)
    small = FacePipeline(Settings(max_bytes=MAX_BYTES, threads=2, flip_tta=True, max_side=600))
    try:
        (reduced,) = small.process([("big", big)])
    finally:
        small.close()
    (full,) = pipeline.process([("big", big)])
    assert (reduced.width, reduced.height) == (full.width, full.height) == (1500, 1500)
    a, b = central_face(full), central_face(reduced)
    assert np.abs(centre(a.box) - centre(b.box)).max() < 0.05 * (a.box[2] - a.box[0])
    assert 0.95 < float(a.embedding @ b.embedding) < 0.9999
