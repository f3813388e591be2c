"""`facecluster reembed`: a library indexed with one embedder, then the deployment switched to
another; the job embeds the stored faces again from the object store, in place. Each test runs on
the embedded default (SQLite, in-process bus) and on the real PostgreSQL and Kafka."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from badinput import lfw_dev
from services import bus as busmod
from services.cli import main
from services.publish import object_key, publish_photos
from services.persons import service as person_service
from services.persons import repository as persons_repo
from services.store import repository as repo
from services.store.db import make_engine, session_factory
from services.store.models import Face, FacePerson, Person, Photo, User
from testbus import drop_topics

MAX_BYTES = 50 * 1024 * 1024


@pytest.fixture
def bus_url(empty_db_url, request) -> Iterator[str]:
    """The bus that goes with the database: in-process with SQLite, the real Kafka with PostgreSQL
    (a topic namespace of the test's own, deleted afterwards)."""
    if empty_db_url.startswith("sqlite"):
        yield f"memory://reembed-{uuid.uuid4().hex}"
        return
    url = f"kafka://{request.getfixturevalue('kafka_bootstrap')}/t{uuid.uuid4().hex[:10]}"
    yield url
    bus = busmod.connect(url)
    try:
        drop_topics(bus)
    finally:
        bus.close()


def library(tmp_path: Path, bus_url: str) -> tuple[Path, Path, list[str]]:
    """Three photos each of three LFW-dev people with five or more, uploaded for ann, and one of
    them for bob: (ann's folder, the object store, the people)."""
    people = [d for d in sorted((lfw_dev() / "images").iterdir()) if len(list(d.iterdir())) >= 5][:3]
    folder, store = tmp_path / "ann", tmp_path / "objects"
    folder.mkdir()
    for d in people:
        for f in sorted(d.iterdir())[:3]:
            Image.open(f).save(folder / f.name)
    bus = busmod.connect(bus_url)
    bus.ensure_topics()
    files = sorted(folder.iterdir())
    assert publish_photos(bus, store, "ann", [(f.name, f) for f in files], max_bytes=MAX_BYTES).published == 9
    (tmp_path / "bob").mkdir()
    (tmp_path / "bob" / files[0].name).write_bytes(files[0].read_bytes())
    bus.close()
    return folder, store, [d.name for d in people]


def test_reembed_job_rewrites_stale_faces_keeps_names_and_survives_lost_objects(tmp_path, empty_db_url, bus_url,
                                                                               monkeypatch, capsys):
    folder, store, people = library(tmp_path, bus_url)
    url = empty_db_url
    assert main(["index", str(folder), "--db", url, "--user", "ann", "--threads", "2"]) == 0
    assert main(["index", str(tmp_path / "bob"), "--db", url, "--user", "bob", "--threads", "2"]) == 0
    assert main(["cluster", "--db", url, "--user", "ann"]) == 0
    engine = make_engine(url)
    sessions = session_factory(engine)

    def faces(user: str) -> dict[int, tuple[str, str, bytes | None]]:
        with sessions() as s:
            return {f.id: (uri, f.model_version, f.embedding) for f, uri in s.execute(
                sa.select(Face, Photo.uri).join(Photo, Photo.id == Face.photo_id)
                .join(User, User.id == Face.user_id).where(User.name == user))}

    def album(name: str) -> set[str]:
        with sessions() as s:
            return set(s.scalars(sa.select(Photo.uri).join(Face, Face.photo_id == Photo.id)
                                 .join(FacePerson, FacePerson.face_id == Face.id)
                                 .join(Person, Person.id == FacePerson.person_id).where(Person.name == name)))

    with sessions() as s:
        ann = repo.find_user(s, "ann")
        first = s.execute(sa.select(FacePerson.person_id).join(Face, Face.id == FacePerson.face_id)
                          .join(Photo, Photo.id == Face.photo_id).where(Photo.uri.startswith(people[0]))).first()
        person_service.update_person(s, ann.id, first.person_id, name="Zoe")
        s.commit()
    before, bob_before, named = faces("ann"), faces("bob"), album("Zoe")
    assert {v for _, v, _ in before.values()} == {"sface-2021dec"} and len(named) == 3

    # one object lost, one overwritten by other bytes: those photos must keep what they have
    uris = sorted({uri for uri, _, _ in before.values()})
    with sessions() as s:
        sha = dict(s.execute(sa.select(Photo.uri, Photo.sha256).where(Photo.user_id == ann.id)).all())
    lost, swapped = uris[-1], uris[-2]
    (store / object_key(sha[lost])).unlink()
    (store / object_key(sha[swapped])).write_bytes((folder / uris[0]).read_bytes())

    monkeypatch.setenv("FACECLUSTER_EMBEDDER", "w600k-mbf")
    monkeypatch.setenv("FACECLUSTER_BUS_URL", bus_url)
    monkeypatch.setenv("FACECLUSTER_OBJECT_STORE", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="no object store at .*nowhere"):
        main(["reembed", "--db", url])
    monkeypatch.setenv("FACECLUSTER_OBJECT_STORE", str(store))
    with pytest.raises(SystemExit, match="no user 'carl'"):
        main(["reembed", "--db", url, "--user", "carl"])
    capsys.readouterr()
    assert main(["reembed", "--db", url, "--user", "ann", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "re-embedded 7 photos" in out and "with w600k-mbf" in out and "2 kept their old vectors" in out, out
    assert "not re-embedded: 1 x file not found" in out and "1 x bytes do not match their sha256" in out, out

    after = faces("ann")
    assert after.keys() == before.keys()  # the same faces: none added, none dropped
    for face_id, (uri, version, vector) in after.items():
        if uri in (lost, swapped):
            assert (version, vector) == before[face_id][1:]  # untouched
        else:
            assert version == "w600k-mbf" and vector != before[face_id][2]
    assert faces("bob") == bob_before  # another user's library is not this run's
    assert album("Zoe") == named  # re-clustered in the new space, the named person holds the same photos
    with sessions() as s:
        assert repo.users_with_other_models(s, "w600k-mbf") == ["ann", "bob"]

    # the re-embedded vectors are those a fresh index with w600k-mbf stores
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert main(["index", str(folder), "--db", fresh, "--user", "ann", "--threads", "2"]) == 0
    fresh_engine = sa.create_engine(fresh)
    with fresh_engine.connect() as c:
        want = {(uri, i): np.frombuffer(e, "<f4") for uri, i, e in c.execute(
            sa.select(Photo.uri, Face.face_index, Face.embedding).join(Face, Face.photo_id == Photo.id)
            .where(Face.embedding.is_not(None)))}
    fresh_engine.dispose()
    with sessions() as s:
        got = {(uri, i): np.frombuffer(e, "<f4") for uri, i, e in s.execute(
            sa.select(Photo.uri, Face.face_index, Face.embedding).join(Face, Face.photo_id == Photo.id)
            .where(Face.user_id == ann.id, Face.model_version == "w600k-mbf", Face.embedding.is_not(None)))}
    assert len(got) >= 7 and got.keys() <= want.keys()
    assert min(float(got[k] @ want[k]) for k in got) > 0.999

    # a second run visits only what is still stale: the two photos whose bytes are gone
    (store / object_key(sha[lost])).write_bytes((folder / lost).read_bytes())  # restored from a backup
    assert main(["reembed", "--db", url, "--user", "ann", "--no-cluster", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "re-embedded 1 photos" in out and "1 kept their old vectors" in out, out
    assert {v for uri, v, _ in faces("ann").values() if uri != swapped} == {"w600k-mbf"}
    engine.dispose()


def test_cluster_worker_files_later_uploads_under_the_persons_the_job_kept(tmp_path, empty_db_url, bus_url,
                                                                          monkeypatch):
    """A cluster worker that cached a user's new-model faces before the job ran must not file
    later uploads against that cache: the job's rewrites and re-clustering move the user's
    clustering revision, the worker reads the user again, and the next photo of the named
    person joins her instead of starting a new person."""
    from services.cluster_worker.worker import ClusterWorker

    folder, store, people = library(tmp_path, bus_url)
    url = empty_db_url
    assert main(["index", str(folder), "--db", url, "--user", "ann", "--threads", "2"]) == 0
    assert main(["cluster", "--db", url, "--user", "ann"]) == 0
    engine = make_engine(url)
    sessions = session_factory(engine)
    with sessions() as s:
        ann = repo.find_user(s, "ann")
        zoe = s.execute(sa.select(FacePerson.person_id).join(Face, Face.id == FacePerson.face_id)
                        .join(Photo, Photo.id == Face.photo_id).where(Photo.uri.startswith(people[0]))).first()[0]
        person_service.update_person(s, ann.id, zoe, name="Zoe")
        s.commit()

    monkeypatch.setenv("FACECLUSTER_EMBEDDER", "w600k-mbf")
    monkeypatch.setenv("FACECLUSTER_OBJECT_STORE", str(store))
    monkeypatch.setenv("FACECLUSTER_BUS_URL", bus_url)
    bus = busmod.connect(bus_url)
    worker = ClusterWorker(bus, sessions, threading.Event())
    consumer = bus.consumer(busmod.INDEXED, "cluster", max_records=100)

    def upload(n: int) -> None:
        """Index Zoe's n-th photo with the new embedder and announce it, as the ingest worker does."""
        photo = sorted((lfw_dev() / "images" / people[0]).iterdir())[n]
        one = tmp_path / f"upload{n}"
        one.mkdir()
        (one / photo.name).write_bytes(photo.read_bytes())
        assert main(["index", str(one), "--db", url, "--user", "ann", "--threads", "2"]) == 0
        with sessions() as s:
            row = s.scalar(sa.select(Photo).where(Photo.user_id == ann.id, Photo.uri == photo.name))
            bus.publish(busmod.INDEXED, [("ann", {"user": "ann", "photo_id": row.id, "sha256": row.sha256,
                                                  "face_ids": repo.photo_face_ids(s, ann.id, row.id)})])

    def consume(want: int) -> int:
        """Hand the worker batches until ``want`` events are through; how many there were."""
        seen, deadline = 0, time.monotonic() + 60
        while seen < want and time.monotonic() < deadline:
            batch = consumer.poll(1.0)
            worker.handle(batch)
            assert consumer.commit(batch)
            seen += len(batch)
        assert bus.pending(busmod.INDEXED, "cluster") == 0
        return seen

    def persons() -> dict[int, set[str]]:
        with sessions() as s:
            out: dict[int, set[str]] = {}
            for person, uri in s.execute(sa.select(FacePerson.person_id, Photo.uri)
                                         .join(Face, Face.id == FacePerson.face_id)
                                         .join(Photo, Photo.id == Face.photo_id).where(Face.user_id == ann.id)):
                out.setdefault(person, set()).add(uri)
            return out

    upload(3)
    assert consume(1) == 1  # the worker now caches ann's w600k-mbf faces: that one photo's
    assert main(["reembed", "--db", url, "--user", "ann", "--threads", "2"]) == 0
    after_job = persons()
    assert sum(p.startswith(people[0]) for p in after_job[zoe]) == 4  # re-clustered: the upload joined Zoe
    assert consume(9) == 9  # the job's announcements, one per re-embedded photo
    with sessions() as s:
        zoes_faces = {f for f, p in persons_repo.face_links(s, ann.id).items() if p == zoe}
    assert set(worker.users["ann"].assigned_ids.tolist()) >= zoes_faces  # read again, not dropped

    upload(4)
    assert consume(1) == 1
    final = persons()
    assert final.keys() == after_job.keys()  # no new person
    assert sum(p.startswith(people[0]) for p in final[zoe]) == 5
    consumer.close()
    bus.close()
    engine.dispose()



def test_a_user_deleted_while_being_reembedded_stays_deleted(tmp_path, empty_db_url, bus_url):
    """The user is deleted after the job's first page: the job stops re-embedding them, neither
    re-clusters nor announces anything for them, and does not bring the user back."""
    from facecore.pipeline import FacePipeline
    from facecore.settings import load_settings
    from services.reembed import reembed_library

    folder, store, _ = library(tmp_path, bus_url)
    assert main(["index", str(folder), "--db", empty_db_url, "--user", "ann", "--threads", "2"]) == 0
    engine = make_engine(empty_db_url)
    sessions = session_factory(engine)
    pipeline = FacePipeline(load_settings(database_url=empty_db_url, threads=2, embedder="w600k-mbf"))
    pages = []

    def reembed_then_delete(items):
        pages.append(len(items))
        done = FacePipeline.reembed(pipeline, items)
        with sessions() as s:
            repo.delete_user(s, repo.find_user(s, "ann").id)
            s.commit()
        return done

    pipeline.reembed = reembed_then_delete
    bus = busmod.connect(bus_url)
    consumer = bus.consumer(busmod.INDEXED, "check", max_records=100)
    try:
        summary = reembed_library(sessions, pipeline, store, bus, ["ann"], batch_size=4, max_bytes=MAX_BYTES)
        assert pages == [4] and summary.photos == 0 and not summary.clustered
        with sessions() as s:
            assert repo.find_user(s, "ann") is None
            assert s.scalar(sa.select(sa.func.count()).select_from(Face)) == 0
        assert bus.pending(busmod.INDEXED, "check") == 0
    finally:
        consumer.close()
        bus.close()
        pipeline.close()
        engine.dispose()
