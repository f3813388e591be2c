"""The `facecluster` command in-process on the bad-input corpus: index records every bad photo
as failed with its reason and exits 0, a re-run adds nothing, cluster/export/verify work on it."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from badinput import MAX_BYTES, SOURCES, lfw_dev, make_corpus
from facecore.verify import read_pairs
from services import indexing
from services.cli import build_parser, main
from services.store import repository as repo
from services.store.db import make_engine, session_factory
from services.store.models import Face, FacePerson, Photo

USER = "tester"
EXPORT_FIELDS = ["photo", "face", "x1", "y1", "x2", "y2", "score", "blur", "person", "gender", "face_id"]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The corpus folder indexed once; missing.jpg is listed, as if deleted after the listing.

    Yields (database URL, folder, expected outcome per file, stdout of the first index run).
    """
    tmp = tmp_path_factory.mktemp("cli")
    folder = tmp / "photos"
    expected = make_corpus(folder)
    listed = indexing.find_photos(folder)
    assert sorted(listed + ["missing.jpg"]) == sorted(expected)  # odd extensions and bad files are all listed
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FACECLUSTER_MAX_BYTES", str(MAX_BYTES))
        mp.setattr(indexing, "find_photos", lambda root: sorted(listed + ["missing.jpg"]))
        url = f"sqlite:///{tmp / 'x.db'}"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli("index", str(folder), "--db", url) == 0
        yield url, folder, expected, out.getvalue()  # the patches hold for the module's re-runs


def cli(*args: str) -> int:
    """Run the command like a user would, on two threads, as USER where the subcommand has users."""
    command, rest = args[0], list(args[1:])
    extra = ["--user", USER] if command in ("index", "cluster", "export", "run") else []
    threads = ["--threads", "2"] if command in ("index", "verify", "run") else []
    return main([command, *rest, *extra, *threads])


def rows(url: str) -> dict:
    """What the database holds for USER: photo ids, face ids, failures, person links."""
    engine = make_engine(url)
    try:
        with session_factory(engine)() as s:
            user_id = repo.find_user(s, USER).id
            return {
                "photos": set(s.scalars(sa.select(Photo.id).where(Photo.user_id == user_id))),
                "faces": set(s.scalars(sa.select(Face.id).where(Face.user_id == user_id))),
                "failed": dict(repo.failed_photos(s, user_id)),
                "face_uri": dict(s.execute(sa.select(Face.id, Photo.uri).join(Photo, Photo.id == Face.photo_id)
                                           .where(Face.user_id == user_id)).all()),
                "person": dict(s.execute(sa.select(FacePerson.face_id, FacePerson.person_id)).all()),
            }
    finally:
        engine.dispose()


def printed_failures(stdout: str) -> Counter:
    return Counter({m[2]: int(m[1]) for m in re.finditer(r"^\s*failed: (\d+) x (.+)$", stdout, re.M)})


def test_index_records_each_bad_photo_with_its_reason(library):
    url, _, expected, stdout = library
    db = rows(url)
    good = [n for n, want in expected.items() if want == "ok"]
    bad = {n: want for n, want in expected.items() if want != "ok"}
    assert len(db["photos"]) == len(expected)  # one row per listed file, the failed ones included
    assert db["failed"].keys() == bad.keys()
    for name, want in bad.items():
        assert want in db["failed"][name], f"{name}: stored reason {db['failed'][name]!r}, expected {want!r}"
    assert sorted(set(db["face_uri"].values())) == sorted(good)  # every good photo has its face
    assert len(db["faces"]) == len(good)
    assert f"indexed {len(good)} photos ({len(good)} faces" in stdout
    assert f"{len(bad)} failed" in stdout
    assert printed_failures(stdout) == Counter(db["failed"].values())


def test_second_index_run_adds_nothing(library, capsys):
    url, folder, expected, _ = library
    before = rows(url)
    assert cli("index", str(folder), "--db", url) == 0
    stdout = capsys.readouterr().out
    after = rows(url)
    n_good = sum(want == "ok" for want in expected.values())
    assert after["photos"] == before["photos"] and after["faces"] == before["faces"]
    assert after["failed"] == before["failed"]
    assert f"indexed 0 photos (0 faces, 0 blurry, 0 not faces), {n_good} already indexed" in stdout
    assert printed_failures(stdout) == Counter(after["failed"].values())  # failed ones are tried again


def test_cluster_then_export_one_row_per_face(library, tmp_path, capsys):
    url, _, expected, _ = library
    assert cli("cluster", "--db", url) == 0
    assert "clustered" in capsys.readouterr().out
    db = rows(url)
    person_of = {db["face_uri"][f]: p for f, p in db["person"].items()}
    # the two EXIF files are one picture: one person; every other good file is a different LFW
    # person, a lone face that waits in no person (min_cluster_size 2)
    assert person_of.keys() == {"rotated-6.jpg", "rotated-8.jpg"}
    assert person_of["rotated-6.jpg"] == person_of["rotated-8.jpg"]
    assert sum(want == "ok" and n in SOURCES for n, want in expected.items()) >= 3

    out = tmp_path / "faces.csv"
    assert cli("export", "--out", str(out), "--db", url) == 0
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        exported = list(reader)
    assert reader.fieldnames == EXPORT_FIELDS
    assert sorted(r["photo"] for r in exported) == sorted(db["face_uri"].values())
    assert {int(r["face_id"]): r["photo"] for r in exported} == db["face_uri"]
    for r in exported:
        assert (int(r["person"]) if r["person"] else None) == person_of.get(r["photo"])
        x1, y1, x2, y2 = (float(r[k]) for k in ("x1", "y1", "x2", "y2"))
        assert 0 <= x1 < x2 and 0 <= y1 < y2 and float(r["score"]) > 0.9
    rotated = next(r for r in exported if r["photo"] == "rotated-6.jpg")
    assert float(rotated["x1"]) > 200  # upright coordinates: the face is in the right part of the canvas


def test_every_subcommand_has_help(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"run", "index", "cluster", "export", "verify"} <= set(sub.choices)
    for name in sub.choices:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: facecluster {name}")
    actions = next(a for a in sub.choices["person"]._actions if a.dest == "action")
    for name in actions.choices:
        with pytest.raises(SystemExit) as exit_:
            main(["person", name, "--help"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: facecluster person {name}")


def test_verify_scores_same_person_pairs_higher(tmp_path, capsys):
    root = lfw_dev()
    lines = [ln.rstrip("\n") for ln in open(root / "pairs.txt")][1:]
    same = [ln for ln in lines if len(ln.split("\t")) == 3][:2]
    diff = [ln for ln in lines if len(ln.split("\t")) == 4][:2]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1\t2\n" + "\n".join(same + diff) + "\n")
    assert len(read_pairs(pairs)) == 4
    out = tmp_path / "scores.tsv"
    assert cli("verify", "--root", str(root / "images"), "--pairs", str(pairs), "--out", str(out)) == 0
    assert "wrote 4 pair scores" in (printed := capsys.readouterr().out) and "flip TTA on" in printed
    header, *values = out.read_text().splitlines()
    assert header == "score" and len(values) == 4
    scores = [float(v) for v in values]
    assert all(math.isfinite(s) and -1 <= s <= 1 for s in scores)
    assert min(scores[:2]) > max(scores[2:]), scores

    # --no-flip-tta embeds the crops alone: other numbers, same verdicts
    plain = tmp_path / "plain.tsv"
    assert cli("verify", "--root", str(root / "images"), "--pairs", str(pairs), "--out", str(plain),
               "--no-flip-tta") == 0
    assert "flip TTA off" in capsys.readouterr().out
    plain_scores = [float(v) for v in plain.read_text().splitlines()[1:]]
    assert plain_scores != scores and min(plain_scores[:2]) > max(plain_scores[2:])


def stored(url: str) -> dict:
    """Per photo uri, in id order: status, error, and each face's index, box and embedding."""
    engine = make_engine(url)
    try:
        with session_factory(engine)() as s:
            user_id = repo.find_user(s, USER).id
            photos = s.execute(sa.select(Photo.id, Photo.uri, Photo.status, Photo.error)
                               .where(Photo.user_id == user_id).order_by(Photo.id)).all()
            faces = s.scalars(sa.select(Face).where(Face.user_id == user_id).order_by(Face.id)).all()
            by_photo: dict[int, list] = {}
            for f in faces:
                by_photo.setdefault(f.photo_id, []).append((f.face_index, round(f.x1, 3), round(f.y1, 3),
                                                            f.embedding))
            return {uri: (status, error, by_photo.get(pid, [])) for pid, uri, status, error in photos}
    finally:
        engine.dispose()


def test_batches_in_flight_store_the_same_rows_in_the_same_order(library, tmp_path, monkeypatch):
    """Overlapping batches in the models changes only the timing: same rows, same ids, same order."""
    _, folder, expected, _ = library
    monkeypatch.setenv("FACECLUSTER_BATCH_SIZE", "3")
    results = {}
    for in_flight in (1, 3):
        monkeypatch.setenv("FACECLUSTER_BATCHES_IN_FLIGHT", str(in_flight))
        url = f"sqlite:///{tmp_path / f'{in_flight}.db'}"
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli("index", str(folder), "--db", url) == 0
        results[in_flight] = stored(url)
    assert list(results[1]) == list(results[3])
    assert set(results[1]) == set(expected)
    for uri in results[1]:
        (s1, e1, f1), (s3, e3, f3) = results[1][uri], results[3][uri]
        assert (s1, e1) == (s3, e3)
        assert [f[:3] for f in f1] == [f[:3] for f in f3]
        for a, b in zip(f1, f3):
            assert (a[3] is None) == (b[3] is None)
            if a[3] is not None:
                assert bytes(a[3]) == bytes(b[3])


def test_output_into_a_closed_pipe_ends_quietly(library):
    """`facecluster person list | head -1`: once the reader is gone the command stops without a
    traceback, with the shell's exit status for SIGPIPE."""
    url = library[0]
    assert cli("cluster", "--db", url) == 0
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "services.cli", "person", "list", "--db", url, "--user", USER],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parents[1])
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (141, "")
