"""The repository functions the cloud workers write through, on SQLite and the real PostgreSQL.

The cluster worker replays events and may act on a stale cache, so linking faces and creating
persons must skip what is no longer free instead of failing or doubling up.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import sqlalchemy as sa

from facecore.types import FaceRecord, PhotoResult
from services.persons import service as person_service
from services.persons import repository as persons_repo
from services.store import repository as repo
from services.store.models import FacePerson, Person


def face(index: int, *, blurry=False, trash=False, embedded=True, model_version="m1") -> FaceRecord:
    rng = np.random.default_rng(index)
    embedding = rng.standard_normal(8).astype(np.float32)
    return FaceRecord(index=index, box=np.array([1, 2, 30, 40], np.float32), landmarks=np.zeros((5, 2), np.float32),
                      det_score=0.9 - index / 100, blur=0.5, blurry=blurry, trash_score=None, is_trash=trash,
                      embedding=embedding / np.linalg.norm(embedding) if embedded else None,
                      model_version=model_version)


def store(session, user_id: int, name: str, *faces: FaceRecord) -> list[int]:
    result = PhotoResult(key=name, sha256=hashlib.sha256(name.encode()).hexdigest(), width=64, height=64,
                         faces=list(faces))
    photo = repo.save_photo_result(session, user_id, name, result)
    session.commit()
    return repo.photo_face_ids(session, user_id, photo.id)


@pytest.fixture
def users(session):
    ann, bob = repo.get_or_create_user(session, "ann"), repo.get_or_create_user(session, "bob")
    session.commit()
    return ann.id, bob.id


def test_photo_face_ids_in_face_order_and_only_for_the_owner(session, users):
    ann, bob = users
    ids = store(session, ann, "a.jpg", *(face(i) for i in range(3)))
    assert len(ids) == 3 and ids == sorted(ids)
    photo_id = repo.find_photo(session, ann, hashlib.sha256(b"a.jpg").hexdigest()).id
    assert repo.photo_face_ids(session, bob, photo_id) == []


def test_face_embeddings_gives_the_clusterable_named_faces(session, users):
    ann, bob = users
    ids = store(session, ann, "a.jpg", face(0), face(1, blurry=True), face(2, trash=True), face(3, embedded=False),
                face(4, model_version="m2"))
    other = store(session, bob, "b.jpg", face(0))
    got, versions, x = repo.face_embeddings(session, ann, ids + other)
    assert got.tolist() == [ids[0], ids[4]] and versions == ["m1", "m2"]
    assert x.dtype == np.float32 and x.shape == (2, 8)
    np.testing.assert_allclose(x[0], face(0).embedding)
    empty, _, x = repo.face_embeddings(session, ann, [])
    assert len(empty) == 0 and x.shape == (0, 0)


def test_link_faces_skips_taken_faces_and_foreign_or_missing_persons(session, users):
    ann, bob = users
    a = store(session, ann, "a.jpg", *(face(i) for i in range(4)))
    b = store(session, bob, "b.jpg", face(0))
    person, members = person_service.new_person(session, ann, a[:1])
    bobs, _ = person_service.new_person(session, bob, b)
    session.commit()
    assert members == {a[0]}

    made = person_service.link_new_faces(session, ann, {a[0]: person, a[1]: person, a[2]: bobs, a[3]: 10**9, b[0]: person})
    session.commit()
    assert made == {a[1]: person}
    assert persons_repo.face_links(session, ann) == {a[0]: person, a[1]: person}
    assert person_service.link_new_faces(session, ann, {a[1]: person}) == {}  # a replay changes nothing
    sources = set(session.scalars(sa.select(FacePerson.source).where(FacePerson.person_id == person)))
    assert sources == {"auto"}
    assert session.get(Person, person).cover_face_id in (a[0], a[1])


def test_create_person_takes_only_free_faces_and_never_leaves_an_empty_one(session, users):
    ann, bob = users
    a = store(session, ann, "a.jpg", *(face(i) for i in range(3)))
    first, members = person_service.new_person(session, ann, a[:2])
    session.commit()
    assert members == set(a[:2]) and session.get(Person, first).cover_face_id == a[0]
    second, members = person_service.new_person(session, ann, a)  # a replay: only the third face is free
    assert members == {a[2]} and second not in (None, first)
    assert person_service.new_person(session, ann, a) == (None, set())
    assert person_service.new_person(session, bob, a) == (None, set())  # another user's faces
    session.commit()
    persons = session.scalar(sa.select(sa.func.count()).select_from(Person).where(Person.user_id == ann))
    assert persons == 2
