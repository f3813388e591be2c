"""Person albums from `facecluster run`: a person is in a photo once, and albums stay whole
with an embedder of one's own and across a change of embedder."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from badinput import lfw_dev
from facecore.decode import DEFAULT_MAX_SIDE
from services.cli import main
from services.store.models import Face, FacePerson, Person, Photo


def test_one_person_is_in_a_photo_once(tmp_path):
    """A photo showing one face twice (a mirror, a poster behind its subject) never puts one person
    in it twice: the face that fits the person's other photos stays with them, the other is a
    cluster of its own, which as a lone face is in no person (min_cluster_size 2)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    person = sorted((lfw_dev() / "images" / "Colin_Powell").iterdir())[:4]
    for f in person[1:]:
        Image.open(f).save(folder / f.name)
    with Image.open(person[0]) as im:
        twice = Image.new("RGB", (2 * im.width, im.height))
        twice.paste(im, (0, 0))
        twice.paste(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (im.width, 0))  # the mirror
        twice.save(folder / "mirror.jpg", quality=95)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["run", str(folder), "--db", url, "--report", str(tmp_path / "report"), "--threads", "2"]) == 0
    engine = sa.create_engine(url)
    with engine.connect() as c:
        links = c.execute(sa.select(Photo.uri, FacePerson.person_id)
                          .join(Face, Face.photo_id == Photo.id)
                          .outerjoin(FacePerson, FacePerson.face_id == Face.id)).all()
    engine.dispose()
    in_mirror = [p for uri, p in links if uri == "mirror.jpg"]
    others = {p for uri, p in links if uri != "mirror.jpg"}
    assert len(others) == 1 and None not in others
    assert len(in_mirror) >= 2 and in_mirror.count(next(iter(others))) == 1  # filed with the others once
    assert in_mirror.count(None) == len(in_mirror) - 1  # the mirror image waits in no person


def two_people(tmp_path) -> tuple[list[Path], Path]:
    """A folder with four LFW-dev photos of each of two people: (their LFW folders, the folder)."""
    people = [d for d in sorted((lfw_dev() / "images").iterdir()) if len(list(d.iterdir())) >= 4][:2]
    folder = tmp_path / "photos"
    folder.mkdir()
    for d in people:
        for f in sorted(d.iterdir())[:4]:
            Image.open(f).save(folder / f.name)
    return people, folder


def test_the_opt_in_embedder_clusters_with_its_own_cut(tmp_path, monkeypatch, caplog):
    """w600k-mbf through the whole `run`: its vectors are stored under its version, its
    calibrated cut (not SFace's) groups them, and each person's photos form one album."""
    people, folder = two_people(tmp_path)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    monkeypatch.setenv("FACECLUSTER_EMBEDDER", "w600k-mbf")
    with caplog.at_level("INFO", logger="services.clustering"):
        assert main(["run", str(folder), "--db", url, "--report", str(tmp_path / "report"), "--threads", "2"]) == 0
    assert "(w600k-mbf, cut 0.66)" in caplog.text
    engine = sa.create_engine(url)
    with engine.connect() as c:
        assert {v for (v,) in c.execute(sa.select(Face.model_version).distinct())} == {"w600k-mbf"}
        links = c.execute(sa.select(Photo.uri, FacePerson.person_id, Face.x1, Face.x2)
                          .join(Face, Face.photo_id == Photo.id).join(FacePerson, FacePerson.face_id == Face.id)).all()
    engine.dispose()
    albums = {}
    for d in people:
        widest = {}  # the subject of an LFW photo is its largest face
        for uri, person, x1, x2 in links:
            if uri.startswith(d.name) and (uri not in widest or x2 - x1 > widest[uri][0]):
                widest[uri] = (x2 - x1, person)
        assert len(widest) == 4, (d.name, widest)
        albums[d.name] = {p for _, p in widest.values()}
    assert all(len(a) == 1 for a in albums.values()) and len(set.union(*albums.values())) == 2, albums


def test_switching_embedder_reembeds_in_place_and_keeps_named_persons(tmp_path, monkeypatch, capsys):
    """A library indexed with SFace, one person named, then run again with w600k-mbf: every
    photo is re-embedded (not skipped, not duplicated), the faces keep their ids, and the
    named person is still there, holding the same photos."""
    from services.persons import service as person_service
    from services.store import repository as repo
    from services.store.db import make_engine, session_factory

    people, folder = two_people(tmp_path)
    with Image.open(sorted(people[1].iterdir())[4 % len(list(people[1].iterdir()))]) as im:  # decoded downscaled
        side = int(DEFAULT_MAX_SIDE * 1.5)
        im.resize((side, side), Image.BICUBIC).save(folder / "large.jpg", quality=90)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    run = ["run", str(folder), "--db", url, "--report", str(tmp_path / "report"), "--threads", "2"]
    assert main(run) == 0
    sessions = session_factory(make_engine(url))

    def state():
        with sessions() as s:
            faces = {f.id: (f.photo_id, f.model_version) for f in s.scalars(sa.select(Face))}
            named = s.scalar(sa.select(Person).where(Person.name == "Ann"))
            album = None if named is None else {uri for (uri,) in s.execute(
                sa.select(Photo.uri).join(Face, Face.photo_id == Photo.id)
                .join(FacePerson, FacePerson.face_id == Face.id).where(FacePerson.person_id == named.id))}
            return faces, album

    with sessions() as s:
        user = repo.find_user(s, "local")
        first = s.execute(sa.select(FacePerson.person_id).join(Face, Face.id == FacePerson.face_id)
                          .join(Photo, Photo.id == Face.photo_id).where(Photo.uri.startswith(people[0].name))).first()
        person_service.update_person(s, user.id, first.person_id, name="Ann")
        s.commit()
    before, album = state()
    assert {v for _, v in before.values()} == {"sface-2021dec"} and album
    capsys.readouterr()

    monkeypatch.setenv("FACECLUSTER_EMBEDDER", "w600k-mbf")
    assert main(run) == 0
    out = capsys.readouterr().out
    assert "indexed 0 photos" in out and "0 already indexed, 9 re-embedded with w600k-mbf" in out, out
    after, album_after = state()
    assert after.keys() == before.keys()  # the same faces, none added or dropped
    assert {v for _, v in after.values()} == {"w600k-mbf"}
    assert album_after == album  # the named person survives the change of embedder
    assert main(run) == 0  # and a third run has nothing left to do
    assert state()[0] == after

    # the re-embedded vectors are the ones a fresh index with w600k-mbf stores
    fresh_url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert main(["index", str(folder), "--db", fresh_url, "--threads", "2"]) == 0

    def vectors(db_url):
        engine = sa.create_engine(db_url)
        with engine.connect() as c:
            rows = c.execute(sa.select(Photo.uri, Face.face_index, Face.embedding)
                             .join(Face, Face.photo_id == Photo.id).where(Face.embedding.is_not(None))).all()
        engine.dispose()
        return {(uri, i): np.frombuffer(e, "<f4") for uri, i, e in rows}

    got, want = vectors(url), vectors(fresh_url)
    assert got.keys() == want.keys() and len(got) >= 9 and ("large.jpg", 0) in got
    assert min(float(got[k] @ want[k]) for k in got) > 0.999


def test_a_user_corrects_the_albums_from_the_command_line_and_cluster_keeps_it(tmp_path, capsys):
    """`facecluster person`: name one person, split a face off, merge it back into another
    person, hide a person, say a face is not that person, undo; a later `cluster` keeps every
    decision, the report leaves the hidden person out, and ids of nobody's (or another user's)
    persons and faces are refused clearly."""
    people, folder = two_people(tmp_path)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    db = ["--db", url]
    assert main(["run", str(folder), *db, "--report", str(tmp_path / "report"), "--threads", "2"]) == 0
    bobs = tmp_path / "bob"
    bobs.mkdir()
    for k in range(2):  # two photos of one face: a person (a lone face would wait in none)
        Image.open(sorted(people[1].iterdir())[k]).save(bobs / f"mine{k}.jpg")
    assert main(["index", str(bobs), *db, "--user", "bob", "--threads", "2"]) == 0
    assert main(["cluster", *db, "--user", "bob"]) == 0

    def albums(user: str = "local") -> dict[int, tuple[str | None, bool, set[str]]]:
        """person id -> (name, hidden, the LFW people whose photos it holds)."""
        out = tmp_path / f"{user}.csv"
        assert main(["export", "--out", str(out), *db, "--user", user]) == 0
        engine = sa.create_engine(url)
        with engine.connect() as c:
            persons = {p.id: (p.name, p.hidden) for p in c.execute(sa.select(Person.id, Person.name, Person.hidden))}
        engine.dispose()
        held: dict[int, set[str]] = {}
        with open(out, newline="") as f:
            for r in csv.DictReader(f):
                if r["person"]:
                    held.setdefault(int(r["person"]), set()).add(r["photo"].rsplit("_", 1)[0])
        return {p: (*persons[p], names) for p, names in held.items()}

    def face_ids(user: str = "local") -> dict[int, str]:
        out = tmp_path / "ids.csv"
        assert main(["export", "--out", str(out), *db, "--user", user]) == 0
        with open(out, newline="") as f:
            return {int(r["face_id"]): r["photo"] for r in csv.DictReader(f)}

    start = albums()
    assert sorted(names for _, _, names in start.values()) == [{people[0].name}, {people[1].name}]
    ann = next(p for p, (_, _, names) in start.items() if names == {people[0].name})
    ben = next(p for p in start if p != ann)
    capsys.readouterr()
    assert main(["person", "list", *db]) == 0
    listed = capsys.readouterr().out
    assert re.search(rf"^\s*{ann}\s+4\s+4\s+-$", listed, re.M), listed

    assert main(["person", "name", str(ann), "Ann", "Lee", *db]) == 0
    one_of_anns = next(f for f, photo in face_ids().items() if photo.startswith(people[0].name))
    assert main(["person", "move", str(one_of_anns), "--new", *db]) == 0
    split = re.search(r"to new person (\d+)", capsys.readouterr().out)
    assert split
    split_off = int(split[1])
    assert main(["person", "merge", str(ben), str(split_off), *db]) == 0  # a wrong merge, on purpose
    assert main(["person", "hide", str(ben), *db]) == 0
    corrected = albums()
    assert corrected[ann] == ("Ann Lee", False, {people[0].name})
    assert corrected[ben] == (None, True, {people[0].name, people[1].name})
    assert split_off not in corrected

    assert main(["cluster", *db]) == 0
    assert albums() == corrected  # the user's decisions outlive re-clustering
    assert main(["run", str(folder), *db, "--report", str(tmp_path / "report"), "--threads", "2"]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Ann Lee" in page and f"person {ben}</small>" not in page and "1 more hidden" in page

    bobs_person = next(iter(albums("bob")))
    capsys.readouterr()
    for args, message in ((["name", "999999", "X"], "no person 999999 for user 'local'"),
                          (["name", str(bobs_person), "Mine"], f"no person {bobs_person} for user 'local'"),
                          (["move", str(next(iter(face_ids("bob")))), "--to", str(ann)], "no face"),
                          (["merge", str(ann), str(ann)], "cannot merge a person into itself")):
        with pytest.raises(SystemExit) as refused:
            main(["person", *args, *db])
        assert message in str(refused.value)
    assert albums() == corrected and albums("bob")[bobs_person][0] is None
    assert main(["person", "show", str(ben), *db]) == 0
    assert albums()[ben][1] is False

    # "not this person" on the wrongly merged face: it leaves, and re-clustering keeps it out
    assert main(["person", "reject", str(ben), str(one_of_anns), *db]) == 0
    rejected = albums()
    assert rejected[ben][2] == {people[1].name}
    assert main(["cluster", *db]) == 0
    assert albums()[ben] == rejected[ben]
    capsys.readouterr()
    assert main(["person", "undo", *db]) == 0  # the rejection is undone: the face is back in ben
    assert "undone: face" in capsys.readouterr().out
    assert albums()[ben][2] == {people[0].name, people[1].name}


def test_prune_makes_the_library_follow_its_folder(tmp_path, capsys):
    """`index --prune`: photos whose files were deleted go, with their faces, embeddings and
    links; a renamed or moved file keeps its faces under its new path; another user's copy of a
    deleted photo stays; without --prune nothing is deleted."""
    people, folder = two_people(tmp_path)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    index = ["index", str(folder), "--db", url, "--threads", "2"]
    assert main([*index]) == 0 and main(["cluster", "--db", url]) == 0
    files = sorted(p.name for p in folder.iterdir())
    gone, renamed, moved = files[:2], files[2], files[3]
    bobs = tmp_path / "bob"
    bobs.mkdir()
    (bobs / "copy.jpg").write_bytes((folder / gone[0]).read_bytes())
    assert main(["index", str(bobs), "--db", url, "--user", "bob", "--threads", "2"]) == 0
    engine = sa.create_engine(url)

    def library(user: str = "local") -> dict[str, tuple[list[int], list[int | None]]]:
        """uri -> (its face ids, their person ids)."""
        with engine.connect() as c:
            rows = c.execute(sa.text(
                "SELECT p.uri, f.id, fp.person_id FROM photos p JOIN users u ON u.id = p.user_id "
                "LEFT JOIN faces f ON f.photo_id = p.id LEFT JOIN face_person fp ON fp.face_id = f.id "
                "WHERE u.name = :user ORDER BY f.id"), {"user": user}).all()
        out: dict[str, tuple[list, list]] = {}
        for uri, face, person in rows:
            out.setdefault(uri, ([], []))
            if face is not None:
                out[uri][0].append(face)
                out[uri][1].append(person)
        return out

    before, bob_before = library(), library("bob")
    for name in gone:
        (folder / name).unlink()
    (folder / renamed).rename(folder / "renamed.jpg")
    (folder / "sub").mkdir()
    (folder / moved).rename(folder / "sub" / "moved.jpg")
    capsys.readouterr()
    assert main([*index]) == 0
    assert library() == before  # without --prune the library only grows
    assert main([*index, "--prune"]) == 0
    assert "pruned 2 photos whose files are gone" in capsys.readouterr().out
    after = library()
    assert after.keys() == (before.keys() - {*gone, renamed, moved}) | {"renamed.jpg", "sub/moved.jpg"}
    assert after["renamed.jpg"] == before[renamed] and after["sub/moved.jpg"] == before[moved]
    deleted_faces = [f for name in gone for f in before[name][0]]
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(Face).where(Face.id.in_(deleted_faces))).scalar() == 0
        assert c.execute(sa.select(sa.func.count()).select_from(FacePerson)
                         .where(FacePerson.face_id.in_(deleted_faces))).scalar() == 0
    assert library("bob") == bob_before
    assert main([*index, "--prune"]) == 0
    assert "pruned 0 photos whose files are gone (their faces and embeddings deleted), 0 moved" in capsys.readouterr().out
    engine.dispose()


def test_forget_deletes_one_user_and_everything_of_theirs(tmp_path, capsys):
    """`facecluster forget --user U --yes`: U's photos, faces, embeddings and persons go; another
    user of the same database keeps everything; without --yes nothing happens."""
    people, folder = two_people(tmp_path)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    for user in ("ann", "bob"):
        assert main(["run", str(folder), "--db", url, "--user", user, "--report", str(tmp_path / user),
                     "--threads", "2"]) == 0
    engine = sa.create_engine(url)

    def counts() -> dict[str, tuple[int, int, int]]:
        with engine.connect() as c:
            return {name: (photos, faces, persons) for name, photos, faces, persons in c.execute(sa.text(
                "SELECT u.name, (SELECT count(*) FROM photos p WHERE p.user_id = u.id), "
                "(SELECT count(*) FROM faces f WHERE f.user_id = u.id), "
                "(SELECT count(*) FROM persons p WHERE p.user_id = u.id) FROM users u"))}

    before = counts()
    assert before["ann"] == before["bob"] and before["ann"][1] >= 8
    with engine.connect() as c:
        anns_links = c.execute(sa.text("SELECT count(*) FROM face_person fp JOIN faces f ON f.id = fp.face_id "
                                       "JOIN users u ON u.id = f.user_id WHERE u.name = 'ann'")).scalar()
    with pytest.raises(SystemExit, match="add --yes"):
        main(["forget", "--db", url, "--user", "bob"])
    assert counts() == before
    capsys.readouterr()
    assert main(["forget", "--db", url, "--user", "bob", "--yes"]) == 0
    assert f"deleted user 'bob': 8 photos, {before['bob'][1]} faces" in capsys.readouterr().out
    assert counts() == {"ann": before["ann"]}
    with engine.connect() as c:  # nothing of bob's is left in any table
        assert c.execute(sa.select(sa.func.count()).select_from(Face)).scalar() == before["ann"][1]
        assert c.execute(sa.select(sa.func.count()).select_from(FacePerson)).scalar() == anns_links
    with pytest.raises(SystemExit, match="no user 'bob'"):
        main(["forget", "--db", url, "--user", "bob", "--yes"])
    engine.dispose()
