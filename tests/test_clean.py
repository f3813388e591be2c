"""The dataset cleaning run: the flagging rules on hand-made vectors, then a real tree end to end."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from badinput import lfw_dev
from facecore.settings import Settings
from training import clean as cl


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


# Three well-separated "people" in 8-d, and small per-photo jitter around each.
RNG = np.random.default_rng(0)
PEOPLE = {name: unit(RNG.normal(size=8)) for name in ("ann", "bob", "cy", "dee")}


def face(person: str, jitter: float = 0.15) -> np.ndarray:
    return unit(PEOPLE[person] + jitter * RNG.normal(size=8))


def photo(rel: str, *faces: np.ndarray, side: int = 250, dhash: int | None = None, sha: str | None = None):
    n = len(faces)
    return cl.Photo(rel=rel, identity=rel.split("/")[0], sha256=sha or rel, size=side * side, width=side, height=side,
                    dhash=hash(rel) & (2**64 - 1) if dhash is None else dhash,
                    boxes=np.tile(np.array([[10, 10, 60, 60]], np.float32), (n, 1)),
                    embeddings=np.stack(faces).astype(np.float32) if n else np.zeros((0, 8), np.float32))


def kinds(result) -> dict[str, str]:
    return {result.photos[i].rel: f.kind for i, f in result.flags.items()}


def test_a_moved_photo_is_claimed_by_its_identity_and_the_folder_keeps_the_rest():
    photos = [photo(f"ann/{i}", face("ann")) for i in range(4)] + \
             [photo(f"bob/{i}", face("bob")) for i in range(3)] + [photo("ann/moved", face("bob"))]
    r = cl.analyse(photos, cl.CleanConfig())
    assert kinds(r) == {"ann/moved": cl.OTHER_IDENTITY}
    (flag,) = r.flags.values()
    assert flag.other == "bob" and flag.similarity > 0.8


def test_a_stranger_nobody_claims_is_an_outlier():
    photos = [photo(f"ann/{i}", face("ann")) for i in range(4)] + [photo("ann/x", face("cy"))]
    assert kinds(cl.analyse(photos, cl.CleanConfig())) == {"ann/x": cl.OUTLIER}


def test_two_strangers_in_one_folder_are_mixed_unless_one_is_claimed():
    alone = [photo("ann/0", face("ann")), photo("ann/1", face("cy"))]
    assert kinds(cl.analyse(alone, cl.CleanConfig())) == {"ann/0": cl.MIXED, "ann/1": cl.MIXED}
    # cy has a folder of her own elsewhere: her photo is claimed, ann's photo stays
    claimed = alone + [photo(f"cy/{i}", face("cy")) for i in range(2)]
    r = cl.analyse(claimed, cl.CleanConfig())
    assert kinds(r) == {"ann/1": cl.OTHER_IDENTITY}
    assert r.flags[1].other == "cy"


def test_the_identity_face_of_a_group_photo_is_the_one_that_matches_the_folder():
    photos = [photo(f"ann/{i}", face("ann")) for i in range(3)] + [photo("ann/group", face("dee"), face("ann"))]
    r = cl.analyse(photos, cl.CleanConfig())
    assert not r.flags
    assert r.face_of[3] == 1


def test_a_photo_is_judged_against_the_others_not_itself():
    # two photos of ann and one of dee: dee's photo would pull the centroid of all three towards itself
    photos = [photo("ann/0", face("ann", 0.05)), photo("ann/1", face("ann", 0.05)), photo("ann/2", face("dee"))]
    assert kinds(cl.analyse(photos, cl.CleanConfig(member_similarity=0.3))) == {"ann/2": cl.OUTLIER}


def test_duplicates_keep_the_largest_copy_and_need_a_similar_photo_too():
    a, b = face("ann", 0.01), face("ann", 0.01)
    photos = [photo("ann/orig", a, dhash=0b1011), photo("ann/copy", b, side=180, dhash=0b1001),
              photo("ann/orig-again", a, dhash=0b1011, sha="ann/orig"),
              # the same face, but another shot: the whole photos differ in most hash bits
              photo("ann/other-shot", face("ann", 0.01), dhash=(2**64 - 1) ^ 0b1011), photo("ann/3", face("ann"))]
    r = cl.analyse(photos, cl.CleanConfig())
    assert kinds(r) == {"ann/copy": cl.DUPLICATE, "ann/orig-again": cl.DUPLICATE}  # ties: first name kept
    assert {r.flags[1].other, r.flags[2].other} == {"ann/orig"}


def test_photos_without_a_face_are_flagged():
    photos = [photo(f"ann/{i}", face("ann")) for i in range(2)] + [photo("ann/empty")]
    photos[2].error = None
    assert kinds(cl.analyse(photos, cl.CleanConfig())) == {"ann/empty": cl.NO_FACE}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, dict]:
    """Four LFW-dev people with five photos each, one photo moved, one resized copy, one broken file."""
    root = tmp_path_factory.mktemp("tree")
    images = lfw_dev() / "images"
    people = ["Colin_Powell", "Tony_Blair", "Ana_Guevara", "Ben_Affleck"]
    for p in people:
        (root / p).mkdir()
        for f in sorted((images / p).iterdir())[:5]:
            shutil.copy(f, root / p / f.name)
    moved = sorted((root / "Tony_Blair").iterdir())[0]
    moved.rename(root / "Ana_Guevara" / moved.name)
    src = sorted((root / "Colin_Powell").iterdir())[1]
    with Image.open(src) as im:
        im.resize((170, 170)).save(root / "Colin_Powell" / "copy.jpg", quality=80)
    (root / "Ben_Affleck" / "broken.jpg").write_bytes(b"this is not a photo")
    truth = {f"Ana_Guevara/{moved.name}": cl.OTHER_IDENTITY, "Colin_Powell/copy.jpg": cl.DUPLICATE,
             "Ben_Affleck/broken.jpg": cl.NO_FACE}
    return root, truth


def test_cleaning_run_on_real_photos(tree, tmp_path):
    root, truth = tree
    cl.main([str(root), "--out", str(tmp_path), "--threads", "2"])
    with open(tmp_path / "flags.csv", newline="") as f:
        flags = {r["photo"]: r for r in csv.DictReader(f)}
    assert {p: r["flag"] for p, r in flags.items()} == truth
    moved = next(p for p, k in truth.items() if k == cl.OTHER_IDENTITY)
    assert flags[moved]["other"] == "Tony_Blair"
    assert flags["Colin_Powell/copy.jpg"]["other"] == "Colin_Powell/" + sorted(
        f.name for f in (root / "Colin_Powell").iterdir() if f.name != "copy.jpg")[1]
    assert flags["Ben_Affleck/broken.jpg"]["detail"]  # the decoder's reason
    with open(tmp_path / "manifest.csv", newline="") as f:
        kept = list(csv.DictReader(f))
    assert len(kept) == 20 + 2 - len(truth)  # 20 photos, a copy and a broken file, minus the flagged
    assert all(r["identity"] == r["photo"].split("/")[0] for r in kept)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kept"] == len(kept) and summary[cl.OTHER_IDENTITY] == 1
    page = (tmp_path / "report.html").read_text()
    assert page.count("<figure>") == len(truth) - 1  # a broken file has no thumbnail
    # next to the moved photo a kept photo of the person it belongs to; next to the copy, the original
    evidence = re.findall(r'class=evidence src="[^"]+" title="([^"]+)"', page)
    assert len(evidence) == 2
    assert evidence[0].startswith("Colin_Powell/") and evidence[0] != "Colin_Powell/copy.jpg"
    assert evidence[1].startswith("Tony_Blair/")
    assert len(list((tmp_path / "thumbs").iterdir())) == len(truth) - 1 + len(evidence)

    # a second run embeds nothing again and flags the same
    cache_time = (tmp_path / "faces-cache.npz").stat().st_mtime
    cl.main([str(root), "--out", str(tmp_path)])
    assert (tmp_path / "faces-cache.npz").stat().st_mtime == cache_time
    with open(tmp_path / "flags.csv", newline="") as f:
        assert {r["photo"]: r["flag"] for r in csv.DictReader(f)} == truth

    # another embedder setup never reads those vectors: the cache is rebuilt for it
    assert str(np.load(tmp_path / "faces-cache.npz")["model_version"]) == "sface-2021dec"
    cl.clean(root, tmp_path, settings=Settings(blur_threshold=1e-9, flip_tta=True, threads=2))
    assert str(np.load(tmp_path / "faces-cache.npz")["model_version"]) == "sface-2021dec+flip"
