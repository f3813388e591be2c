"""The repository on a real database (each test runs on SQLite and on PostgreSQL)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import sqlalchemy as sa

from facecore.types import FaceRecord, PhotoResult
from services.persons import service as person_service
from services.persons import repository as persons_repo
from services.store import repository as repo
from services.store.models import ApiToken, Face, FacePerson, Job, Person, Photo, User

MODEL = "sface-2021dec"
DIM = 128


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def face(index: int, *, seed: int | None = None, blurry=False, trash=False, embedded=True,
         model_version=MODEL, det_score=0.9, attributes=None) -> FaceRecord:
    rng = np.random.default_rng(index if seed is None else seed)
    embedding = rng.standard_normal(DIM).astype(np.float32)
    return FaceRecord(
        index=index,
        box=np.array([10 + index, 20, 110.5, 140.25], np.float32),
        landmarks=rng.uniform(0, 100, (5, 2)).astype(np.float32),
        det_score=det_score,
        blur=0.05 if blurry else 0.8,
        blurry=blurry,
        trash_score=0.9 if trash else 0.1,
        is_trash=trash,
        embedding=embedding / np.linalg.norm(embedding) if embedded else None,
        model_version=model_version,
        attributes={"gender": "F", "gender_p": 0.91} if attributes is None else attributes,
    )


def photo(name: str, *faces: FaceRecord) -> PhotoResult:
    return PhotoResult(key=name, sha256=sha(name), width=640, height=480, faces=list(faces))


def faces_of(session, photo_id) -> list[Face]:
    return session.scalars(sa.select(Face).where(Face.photo_id == photo_id).order_by(Face.face_index)).all()


def count(session, model, *where) -> int:
    return session.scalar(sa.select(sa.func.count()).select_from(model).where(*where))


def links(session, user_id) -> dict[int, tuple[int, str]]:
    rows = session.execute(
        sa.select(FacePerson.face_id, FacePerson.person_id, FacePerson.source)
        .join(Person, Person.id == FacePerson.person_id).where(Person.user_id == user_id))
    return {face_id: (person_id, source) for face_id, person_id, source in rows}


@pytest.fixture
def user(session) -> User:
    user = repo.get_or_create_user(session, "ann")
    session.commit()
    return user


@pytest.fixture
def ten_faces(session, user) -> list[int]:
    """Ids of faces 0..9 in two photos of ``user``."""
    a = repo.save_photo_result(session, user.id, "a.jpg", photo("a", *(face(i) for i in range(5))))
    b = repo.save_photo_result(session, user.id, "b.jpg", photo("b", *(face(i, seed=5 + i) for i in range(5))))
    session.commit()
    return [f.id for f in faces_of(session, a.id)] + [f.id for f in faces_of(session, b.id)]


# ------------------------------------------------------------------------------ users


def test_get_or_create_user_returns_the_same_user(session):
    first = repo.get_or_create_user(session, "ann")
    session.commit()
    assert repo.get_or_create_user(session, "ann").id == first.id
    assert repo.get_or_create_user(session, "bob").id != first.id


def test_repository_never_commits(session, user):
    repo.save_photo_result(session, user.id, "a.jpg", photo("a", face(0)))
    session.rollback()
    assert count(session, Photo) == 0 and count(session, Face) == 0


# ------------------------------------------------------------------------------ photos and faces


def test_saved_faces_read_back_exactly(session, user):
    records = [face(0, attributes={"gender": "M", "gender_p": np.float32(0.97)}), face(1, trash=True)]
    saved = repo.save_photo_result(session, user.id, "dir/a.jpg", photo("a", *records))
    session.commit()
    session.expire_all()

    stored = repo.find_photo(session, user.id, sha("a"))
    assert (stored.id, stored.uri, stored.status, stored.error) == (saved.id, "dir/a.jpg", "indexed", None)
    assert (stored.width, stored.height) == (640, 480) and stored.indexed_at is not None
    rows = faces_of(session, stored.id)
    assert [r.face_index for r in rows] == [0, 1]
    assert saved.face_ids == [r.id for r in rows] == repo.photo_face_ids(session, user.id, saved.id)
    for row, record in zip(rows, records):
        assert [row.x1, row.y1, row.x2, row.y2] == record.box.tolist()
        assert row.landmarks == record.landmarks.reshape(-1).tolist()
        assert bytes(row.embedding) == record.embedding.astype("<f4").tobytes()
        assert row.embedding_dim == DIM and row.model_version == MODEL
        assert (row.blurry, row.trash) == (record.blurry, record.is_trash)
        assert row.trash_score == pytest.approx(record.trash_score)
    assert rows[0].attributes == {"gender": "M", "gender_p": pytest.approx(0.97)}


def test_saving_an_indexed_photo_again_changes_nothing(session, user):
    first = repo.save_photo_result(session, user.id, "a.jpg", photo("a", face(0), face(1)))
    session.commit()
    again = repo.save_photo_result(session, user.id, "copy/of/a.jpg", photo("a", face(0)))
    session.commit()
    assert again.id == first.id and again.uri == "a.jpg"
    assert count(session, Photo) == 1 and len(faces_of(session, first.id)) == 2


def test_same_bytes_are_indexed_once_per_user(session, user):
    bob = repo.get_or_create_user(session, "bob")
    repo.save_photo_result(session, user.id, "a.jpg", photo("a", face(0)))
    repo.save_photo_result(session, bob.id, "a.jpg", photo("a", face(0)))
    session.commit()
    assert count(session, Photo) == 2 and count(session, Face) == 2


def test_unreadable_file_is_stored_as_failed_keyed_by_uri(session, user):
    broken = PhotoResult(key="x.jpg", error="cannot decode: truncated JPEG")
    first = repo.save_photo_result(session, user.id, "x.jpg", broken)
    again = repo.save_photo_result(session, user.id, "x.jpg", broken)
    session.commit()
    assert again.id == first.id and count(session, Photo) == 1
    assert first.sha256 == repo.missing_photo_sha256("x.jpg")
    assert (first.status, first.error, first.face_ids) == ("failed", "cannot decode: truncated JPEG", [])
    stored = session.get(Photo, first.id)
    assert (stored.status, stored.error, stored.indexed_at) == ("failed", "cannot decode: truncated JPEG", None)


def test_unreadable_file_row_goes_once_the_file_is_indexed(session, user):
    repo.save_photo_result(session, user.id, "x.jpg", PhotoResult(key="x.jpg", error="permission denied"))
    session.commit()
    repo.save_photo_result(session, user.id, "x.jpg", photo("x", face(0)))
    session.commit()
    assert session.execute(sa.select(Photo.uri, Photo.status)).all() == [("x.jpg", "indexed")]


def test_concurrent_insert_of_the_same_key_returns_the_winner(session, user):
    # Another worker inserted the same user between our lookup and our insert.
    session.execute(sa.insert(User).values(name="bob"))
    winner_id = session.scalar(sa.select(User.id).where(User.name == "bob"))
    got = repo._insert_once(session, User(name="bob"), lambda: repo.find_user(session, "bob"))
    assert got.id == winner_id
    session.commit()  # the transaction survived the unique violation
    assert count(session, User) == 2


def test_failed_photo_is_replaced_by_a_later_success(session, user):
    failed = repo.save_photo_result(session, user.id, "a.jpg",
                                    PhotoResult(key="a.jpg", sha256=sha("a"), error="model crashed"))
    session.commit()
    ok = repo.save_photo_result(session, user.id, "a.jpg", photo("a", face(0), face(1)))
    session.commit()
    assert ok.id == failed.id
    assert (ok.status, ok.error) == ("indexed", None)
    assert len(faces_of(session, ok.id)) == 2


def test_pending_photo_gets_its_faces_replaced(session, user):
    pending = Photo(user_id=user.id, uri="a.jpg", sha256=sha("a"), status="pending")
    session.add(pending)
    session.flush()
    session.execute(sa.insert(Face), [repo._face_row(pending.id, user.id, face(0)), repo._face_row(pending.id, user.id, face(7))])
    session.commit()
    repo.save_photo_result(session, user.id, "a.jpg", photo("a", face(0), face(1), face(2)))
    session.commit()
    assert [f.face_index for f in faces_of(session, pending.id)] == [0, 1, 2]


def test_user_embeddings_round_trip_exactly(session, user):
    records = [face(0), face(1, blurry=True), face(2, trash=True), face(3, embedded=False), face(4)]
    saved = repo.save_photo_result(session, user.id, "a.jpg", photo("a", *records))
    session.commit()
    ids_by_index = {f.face_index: f.id for f in faces_of(session, saved.id)}

    ids, matrix = repo.user_embeddings(session, user.id)
    assert ids.dtype == np.int64 and matrix.dtype == np.float32
    assert ids.tolist() == [ids_by_index[0], ids_by_index[4]]
    assert np.array_equal(matrix, np.stack([records[0].embedding, records[4].embedding]))

    ids, matrix = repo.user_embeddings(session, user.id, include_blurry=True)
    assert ids.tolist() == [ids_by_index[0], ids_by_index[1], ids_by_index[4]]
    assert np.array_equal(matrix[1], records[1].embedding)


def test_user_embeddings_keep_models_apart(session, user):
    repo.save_photo_result(session, user.id, "a.jpg", photo("a", face(0), face(1, model_version="arcface-r100")))
    session.commit()
    with pytest.raises(ValueError, match="several models"):
        repo.user_embeddings(session, user.id)
    ids, matrix = repo.user_embeddings(session, user.id, model_version="arcface-r100")
    assert len(ids) == 1 and matrix.shape == (1, DIM)
    ids, matrix = repo.user_embeddings(session, user.id, model_version="unknown")
    assert ids.shape == (0,) and matrix.shape == (0, 0)


def test_stale_faces_are_found_by_user_and_photo_and_rewritten_in_place(session, user, ten_faces):
    """What the re-embedding job walks: users and photos with a face of another model, then the
    faces of those photos rewritten under the new version, ids and links untouched."""
    bob = repo.get_or_create_user(session, "bob")
    mixed = repo.save_photo_result(session, user.id, "c.jpg", photo("c", face(0, model_version="w600k-mbf"), face(1)))
    new = repo.save_photo_result(session, user.id, "d.jpg", photo("d", face(0, model_version="w600k-mbf")))
    repo.save_photo_result(session, bob.id, "e.jpg", photo("e", face(0, model_version="w600k-mbf")))
    repo.save_photo_result(session, bob.id, "a.jpg", photo("a", face(0)))  # same bytes as ann's a.jpg
    person, _ = person_service.new_person(session, user.id, ten_faces[:3])
    session.commit()
    a, b = (repo.find_photo(session, user.id, sha(n)).id for n in "ab")

    assert repo.users_with_other_models(session, "w600k-mbf") == ["ann", "bob"]
    assert repo.users_with_other_models(session, MODEL) == ["ann", "bob"]
    stale = repo.photos_of_other_models(session, user.id, "w600k-mbf")
    assert stale == [(a, "a.jpg", sha("a")), (b, "b.jpg", sha("b")), (mixed.id, "c.jpg", sha("c"))]
    assert repo.photos_of_other_models(session, user.id, "w600k-mbf", after_id=a, limit=1) == [stale[1]]
    assert repo.photos_of_other_models(session, user.id, MODEL) == [(mixed.id, "c.jpg", sha("c")),
                                                                    (new.id, "d.jpg", sha("d"))]
    faces = repo.faces_of_other_models(session, user.id, [a, mixed.id, new.id], "w600k-mbf")
    assert sorted(faces) == [a, mixed.id]  # d.jpg has nothing stale
    assert [f for f, _ in faces[a]] == ten_faces[:5] and faces[a][0][1].shape == (5, 2)
    assert [f for f, _ in faces[mixed.id]] == mixed.face_ids  # the whole photo, in face order

    records = [face(i, seed=50 + i, model_version="w600k-mbf", attributes={}) for i in range(5)]
    assert repo.update_face_vectors(session, user.id, ten_faces[:5], records) == 5
    session.commit()
    rows = faces_of(session, a)
    assert [f.id for f in rows] == ten_faces[:5] and {f.model_version for f in rows} == {"w600k-mbf"}
    assert all(np.array_equal(np.frombuffer(f.embedding, "<f4"), r.embedding) for f, r in zip(rows, records))
    assert all(f.attributes == {} for f in rows)
    assert [f for f, (p, _) in links(session, user.id).items() if p == person] == ten_faces[:3]
    assert [p for p, _, _ in repo.photos_of_other_models(session, user.id, "w600k-mbf")] == [b, mixed.id]
    # another user's faces are never rewritten through this user
    bobs = repo.photos_of_other_models(session, bob.id, "w600k-mbf")[0][0]
    bob_face = faces_of(session, bobs)[0]
    assert repo.update_face_vectors(session, user.id, [bob_face.id], records[:1]) == 0
    session.commit()
    session.refresh(bob_face)
    assert bob_face.model_version == MODEL


# ------------------------------------------------------------------------------ deletion


def test_deleting_a_photo_deletes_its_faces_and_links(session, user, ten_faces):
    persons = person_service.apply_clustering(session, user.id, {f: 0 if i < 5 else 1 for i, f in enumerate(ten_faces)})
    person_service.update_person(session, user.id, persons[0], name="Ann")
    session.commit()
    photo_a = session.scalar(sa.select(Face.photo_id).where(Face.id == ten_faces[0]))

    person_service.delete_photo(session, user.id, photo_a)
    session.commit()
    assert count(session, Face, Face.id.in_(ten_faces[:5])) == 0
    assert count(session, FacePerson, FacePerson.face_id.in_(ten_faces[:5])) == 0
    # the named person stays, empty and without a cover; the other one is untouched
    ann = session.get(Person, persons[0])
    session.refresh(ann)
    assert ann.name == "Ann" and ann.cover_face_id is None
    assert count(session, FacePerson, FacePerson.person_id == persons[1]) == 5


def test_deleting_a_photo_drops_an_unnamed_person_left_empty(session, user, ten_faces):
    persons = person_service.apply_clustering(session, user.id, {f: 0 if i < 5 else 1 for i, f in enumerate(ten_faces)})
    session.commit()
    person_service.delete_photo(session, user.id, session.scalar(sa.select(Face.photo_id).where(Face.id == ten_faces[0])))
    session.commit()
    assert session.scalars(sa.select(Person.id)).all() == [persons[1]]


def test_the_database_itself_cascades_deletes(session, user, ten_faces):
    # Plain SQL, no repository and no ORM: the schema alone must remove the biometric data.
    person_service.apply_clustering(session, user.id, dict.fromkeys(ten_faces, 0))
    session.commit()
    session.execute(sa.text("DELETE FROM photos WHERE uri = 'a.jpg'"))
    assert count(session, Face) == 5 and count(session, FacePerson) == 5
    session.execute(sa.text("DELETE FROM users"))
    assert count(session, Face) == 0 and count(session, FacePerson) == 0 and count(session, Person) == 0


def test_deleting_a_user_deletes_everything_of_theirs(session, user, ten_faces):
    bob = repo.get_or_create_user(session, "bob")
    repo.save_photo_result(session, bob.id, "b.jpg", photo("b", face(0)))
    person_service.apply_clustering(session, user.id, dict.fromkeys(ten_faces, 0))
    session.add_all([ApiToken(user_id=user.id, token_sha256=sha("token")),
                     Job(user_id=user.id, kind="index", status="done")])
    session.commit()

    repo.delete_user(session, user.id)
    session.commit()
    for model in (Photo, Face, Person, ApiToken, Job):
        assert count(session, model, model.user_id == user.id) == 0, model.__name__
    assert count(session, FacePerson) == 0
    assert count(session, Face, Face.user_id == bob.id) == 1
    with pytest.raises(repo.NotFound):
        repo.delete_user(session, user.id)


# ------------------------------------------------------------------------------ clustering


def test_new_clusters_become_new_persons(session, user, ten_faces):
    labels = {f: (0 if i < 4 else 1 if i < 9 else -1) for i, f in enumerate(ten_faces)}
    persons = person_service.apply_clustering(session, user.id, labels)
    session.commit()
    assert sorted(persons) == [0, 1] and persons[0] != persons[1]
    assert links(session, user.id) == {
        f: (persons[labels[f]], "auto") for f in ten_faces if labels[f] >= 0}
    for person_id in persons.values():  # every person gets a member as its cover
        cover = session.get(Person, person_id).cover_face_id
        assert links(session, user.id)[cover][0] == person_id


def test_reclustering_keeps_person_ids_names_and_user_links(session, user, ten_faces):
    first = person_service.apply_clustering(session, user.id, {f: 0 if i < 5 else 1 for i, f in enumerate(ten_faces)})
    person_service.update_person(session, user.id, first[0], name="Ann")
    person_service.update_person(session, user.id, first[1], hidden=True)
    # the user says face 0 is the second person
    person_service.move_faces(session, user.id, [ten_faces[0]], first[1])
    session.commit()

    # different label numbers; face 4 now clusters with the second group; face 0 with the first
    labels = {f: 7 if i < 4 else 3 for i, f in enumerate(ten_faces)}
    second = person_service.apply_clustering(session, user.id, labels)
    session.commit()

    assert second == {7: first[0], 3: first[1]}
    ann, other = session.get(Person, first[0]), session.get(Person, first[1])
    assert ann.name == "Ann" and other.hidden
    current = links(session, user.id)
    assert current[ten_faces[0]] == (first[1], "user")  # user link untouched
    assert [current[f][0] for f in ten_faces[1:4]] == [first[0]] * 3
    assert [current[f][0] for f in ten_faces[4:]] == [first[1]] * 6


def test_largest_overlap_keeps_the_person_when_a_cluster_splits(session, user, ten_faces):
    first = person_service.apply_clustering(session, user.id, dict.fromkeys(ten_faces, 0))
    session.commit()
    second = person_service.apply_clustering(session, user.id, {f: 0 if i < 3 else 1 for i, f in enumerate(ten_faces)})
    session.commit()
    assert second[1] == first[0] and second[0] != first[0]


def test_noise_and_unclustered_faces_lose_auto_links_and_empty_auto_persons_go(session, user, ten_faces):
    """...except the automatic faces of a person the user named: those stay in it."""
    first = person_service.apply_clustering(session, user.id, {f: i // 4 for i, f in enumerate(ten_faces)})
    person_service.update_person(session, user.id, first[0], name="Ann")
    person_service.merge(session, user.id, first[1], [first[2]])[0]  # confirmed by the user
    session.commit()

    second = person_service.apply_clustering(session, user.id, {f: -1 for f in ten_faces[:5]})
    session.commit()
    assert second == {}
    remaining = links(session, user.id)
    anns = set(ten_faces[:4])
    assert {f: remaining[f] for f in anns} == {f: (first[0], "auto") for f in anns}
    assert all(source == "user" for f, (_, source) in remaining.items() if f not in anns)
    assert set(session.scalars(sa.select(Person.id))) == {first[0], first[1]}  # named, confirmed


def test_reclustering_only_accepts_the_users_faces(session, user, ten_faces):
    bob = repo.get_or_create_user(session, "bob")
    with pytest.raises(repo.NotFound):
        person_service.apply_clustering(session, bob.id, {ten_faces[0]: 0})


# ------------------------------------------------------------------------------ person edits


@pytest.fixture
def two_persons(session, user, ten_faces) -> dict[int, int]:
    persons = person_service.apply_clustering(session, user.id, {f: 0 if i < 5 else 1 for i, f in enumerate(ten_faces)})
    session.commit()
    return persons


def test_rename_and_hide(session, user, two_persons):
    assert person_service.update_person(session, user.id, two_persons[0], name="  Ann ").name == "Ann"
    assert person_service.update_person(session, user.id, two_persons[0], name=" ").name is None
    assert person_service.update_person(session, user.id, two_persons[0], hidden=True).hidden
    assert not person_service.update_person(session, user.id, two_persons[0], hidden=False).hidden


def test_merge_moves_faces_as_user_links(session, user, ten_faces, two_persons):
    person_service.update_person(session, user.id, two_persons[1], name="Bob")
    merged = person_service.merge(session, user.id, two_persons[0], [two_persons[1]])[0]
    session.commit()
    assert merged.id == two_persons[0] and merged.name == "Bob" and merged.user_confirmed
    assert session.get(Person, two_persons[1]) is None
    current = links(session, user.id)
    assert {current[f] for f in ten_faces} == {(two_persons[0], "user")}  # the target's own faces too
    with pytest.raises(ValueError):
        person_service.merge(session, user.id, two_persons[0], [two_persons[0]])[0]


def test_moving_the_cover_face_picks_a_new_cover(session, user, ten_faces, two_persons):
    person = session.get(Person, two_persons[0])
    cover = person.cover_face_id
    person_service.move_faces(session, user.id, [cover], two_persons[1])
    session.commit()
    session.refresh(person)
    assert person.cover_face_id not in (None, cover)
    assert links(session, user.id)[cover] == (two_persons[1], "user")


def test_split_faces_form_a_confirmed_person_that_reclustering_keeps(session, user, ten_faces, two_persons):
    person = person_service.split_faces(session, user.id, [ten_faces[1], ten_faces[6], ten_faces[1]])
    session.commit()
    assert person.user_confirmed and person.name is None
    assert {f: links(session, user.id)[f] for f in (ten_faces[1], ten_faces[6])} == {
        ten_faces[1]: (person.id, "user"), ten_faces[6]: (person.id, "user")}
    person_service.apply_clustering(session, user.id, dict.fromkeys(ten_faces, 0))  # one cluster of everything
    session.commit()
    assert [f for f, (p, _) in links(session, user.id).items() if p == person.id] == [ten_faces[1], ten_faces[6]]
    with pytest.raises(ValueError):
        person_service.split_faces(session, user.id, [])


def test_persons_overview_counts_faces_and_photos(session, user, ten_faces, two_persons):
    person_service.move_faces(session, user.id, [ten_faces[5]], two_persons[0])  # photo b joins person 0
    person_service.update_person(session, user.id, two_persons[0], name="Ann")
    person_service.update_person(session, user.id, two_persons[1], hidden=True)
    session.commit()
    overview = persons_repo.persons_overview(session, user.id)
    assert overview == [
        {"id": two_persons[0], "name": "Ann", "hidden": False, "confirmed": False, "faces": 6, "photos": 2},
        {"id": two_persons[1], "name": None, "hidden": True, "confirmed": False, "faces": 4, "photos": 1}]
    assert persons_repo.persons_overview(session, user.id, hidden=False) == overview[:1]


def test_moving_the_last_face_away_drops_an_auto_person(session, user, ten_faces):
    persons = person_service.apply_clustering(session, user.id, {ten_faces[0]: 0, ten_faces[1]: 1})
    person_service.move_faces(session, user.id, [ten_faces[0]], persons[1])
    session.commit()
    assert session.get(Person, persons[0]) is None


def test_clustering_revision_moves_with_every_change_but_the_cluster_workers_own(session, user, ten_faces):
    """The incremental cluster worker keeps a copy of a user's faces and links and reads it again
    when this counter moves: every other writer of faces, vectors or links must move it."""
    repo.get_or_create_user(session, "bob")
    session.commit()

    def revisions() -> tuple[int, int]:
        current = repo.clustering_revisions(session, ["ann", "bob", "nobody"])
        assert current.keys() == {"ann", "bob"}
        return current["ann"], current["bob"]

    def moved(change) -> bool:
        before = revisions()
        change()
        session.commit()
        after = revisions()
        assert after[1] == before[1]  # another user's copy stays good
        return after[0] != before[0]

    photo_c = []
    # the worker's own writes, and what it learns from events anyway: new photos
    assert not moved(lambda: photo_c.append(repo.save_photo_result(session, user.id, "c.jpg", photo("c", face(3)))))
    persons = {}
    assert not moved(lambda: persons.update(p=person_service.new_person(session, user.id, ten_faces[:2])[0]))
    assert not moved(lambda: person_service.link_new_faces(session, user.id, {ten_faces[2]: persons["p"]}))
    assert not moved(lambda: person_service.update_person(session, user.id, persons["p"], name="Ann"))
    assert not moved(lambda: person_service.update_person(session, user.id, persons["p"], hidden=True))
    # everyone else's
    assert moved(lambda: person_service.move_faces(session, user.id, [ten_faces[3]], persons["p"]))
    assert moved(lambda: persons.update(two=person_service.apply_clustering(
        session, user.id, {f: 0 if i < 5 else 1 for i, f in enumerate(ten_faces)})))
    assert moved(lambda: person_service.merge(session, user.id, persons["two"][0], [persons["two"][1]])[0])
    assert moved(lambda: repo.update_face_vectors(session, user.id, ten_faces[:1], [face(0, seed=99)]))
    assert not moved(lambda: repo.update_face_vectors(session, user.id, [photo_c[0].face_ids[0] + 1000], [face(0)]))
    assert moved(lambda: person_service.delete_photo(session, user.id, photo_c[0].id))
    pending = Photo(user_id=user.id, uri="d.jpg", sha256=sha("d"), status="pending")
    session.add(pending)
    session.flush()
    session.execute(sa.insert(Face), [repo._face_row(pending.id, user.id, face(0))])
    session.commit()
    assert moved(lambda: repo.save_photo_result(session, user.id, "d.jpg", photo("d", face(1))))


# ------------------------------------------------------------------------------ per-user scoping


def test_another_users_objects_behave_as_missing(session, user, ten_faces, two_persons):
    bob = repo.get_or_create_user(session, "bob")
    repo.save_photo_result(session, bob.id, "b.jpg", photo("bob", face(0)))
    bob_face = session.scalar(sa.select(Face.id).where(Face.user_id == bob.id))
    bob_person = person_service.apply_clustering(session, bob.id, {bob_face: 0})[0]
    session.commit()
    ann_person, ann_photo = two_persons[0], session.scalar(sa.select(Face.photo_id).where(Face.id == ten_faces[0]))

    for attempt in (
        lambda: person_service.update_person(session, bob.id, ann_person, name="mine"),
        lambda: person_service.update_person(session, bob.id, ann_person, hidden=True),
        lambda: person_service.merge(session, bob.id, bob_person, [ann_person])[0],
        lambda: person_service.merge(session, bob.id, ann_person, [bob_person])[0],
        lambda: person_service.move_faces(session, bob.id, [ten_faces[0]], bob_person),
        lambda: person_service.move_faces(session, bob.id, [bob_face], ann_person),
        lambda: person_service.split_faces(session, bob.id, [bob_face, ten_faces[0]]),
        lambda: person_service.delete_photo(session, bob.id, ann_photo),
        lambda: repo.move_photo(session, bob.id, ann_photo, "mine.jpg"),
        lambda: person_service.apply_clustering(session, bob.id, {ten_faces[0]: 0}),
    ):
        with pytest.raises(repo.NotFound):
            attempt()
        session.rollback()

    assert repo.find_photo(session, bob.id, sha("a")) is None
    assert [uri for _, uri, _ in repo.photo_keys(session, bob.id)] == ["b.jpg"]
    assert repo.user_embeddings(session, bob.id)[0].tolist() == [bob_face]
    assert [row["photo"] for row in repo.export_rows(session, bob.id)] == ["b.jpg"]
    assert session.get(Person, ann_person).name is None
    assert count(session, Face, Face.user_id == user.id) == 10
    assert links(session, user.id)[ten_faces[0]] == (ann_person, "auto")


# ------------------------------------------------------------------------------ reporting


def test_export_rows(session, user):
    saved = repo.save_photo_result(
        session, user.id, "b.jpg", photo("b", face(1, attributes={}), face(0), face(2, trash=True)))
    repo.save_photo_result(session, user.id, "a.jpg", photo("a", face(0, det_score=0.5)))
    ids = {f.face_index: f.id for f in faces_of(session, saved.id)}
    person = person_service.apply_clustering(session, user.id, {ids[0]: 0})[0]
    session.commit()

    rows = list(repo.export_rows(session, user.id))
    assert [(r["photo"], r["face"], r["person"], r["gender"]) for r in rows] == [
        ("a.jpg", 0, None, "F"), ("b.jpg", 0, person, "F"), ("b.jpg", 1, None, None)]
    assert rows[0] == {"photo": "a.jpg", "face": 0, "x1": 10.0, "y1": 20.0, "x2": 110.5, "y2": 140.25,
                       "score": 0.5, "blur": 0.8, "person": None, "gender": "F",
                       "face_id": rows[0]["face_id"], "blurry": False, "person_name": None, "person_hidden": False}
    person_service.update_person(session, user.id, person, name="Ann")
    person_service.update_person(session, user.id, person, hidden=True)
    row = next(r for r in repo.export_rows(session, user.id) if r["person"] == person)
    assert (row["person_name"], row["person_hidden"]) == ("Ann", True)
    # the non-face is only listed when asked for, and then alone (the report's "Not faces")
    assert [(r["photo"], r["face"]) for r in repo.export_rows(session, user.id, trash=True)] == [("b.jpg", 2)]


def test_face_photo_ids_only_for_the_owner(session, user):
    bob = repo.get_or_create_user(session, "bob")
    a = repo.save_photo_result(session, user.id, "a.jpg", photo("a", face(0), face(1)))
    b = repo.save_photo_result(session, bob.id, "b.jpg", photo("b", face(0)))
    session.commit()
    assert repo.face_photo_ids(session, user.id, [*a.face_ids, *b.face_ids]) == {f: a.id for f in a.face_ids}


def test_user_summary(session, user, two_persons):
    repo.save_photo_result(session, user.id, "c.jpg", photo("c", face(0, blurry=True), face(1, trash=True)))
    repo.save_photo_result(session, user.id, "x.jpg", PhotoResult(key="x.jpg", error="unreadable"))
    person_service.update_person(session, user.id, two_persons[1], hidden=True)
    person_service.update_person(session, user.id, two_persons[0], name="Ann")
    session.commit()
    assert repo.user_summary(session, user.id) == {
        "photos": {"pending": 0, "indexed": 3, "failed": 1},
        "faces": 12, "embedded": 12, "blurry": 1, "trash": 1,
        "persons": 2, "named_persons": 1, "hidden_persons": 1, "assigned_faces": 10,
    }
