"""The persons rules layer on a real database (SQLite and PostgreSQL): user decisions survive
clustering, every edit can be undone exactly, and face counts stay true."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from apilibrary import seed_library
from services.persons import repository as persons_repo
from services.persons import service as person_service
from services.store.models import FacePerson, FaceRejection, Person
from testdb import assert_counts_true


@pytest.fixture
def lib(session, tmp_path):
    """ann: 3 persons x 4 faces, clustered into their true persons."""
    return seed_library(session, "ann", tmp_path / "photos", persons=3, faces_per_person=4, seed=7)


def state(session, user_id: int) -> dict:
    """Everything an edit may change: person rows, links with their source, rejections."""
    session.expire_all()
    persons = {p.id: (p.name, p.hidden, p.favorite, p.user_confirmed, p.cover_face_id)
               for p in session.scalars(sa.select(Person).where(Person.user_id == user_id))}
    links = {f: (p, source) for f, p, source in session.execute(
        sa.select(FacePerson.face_id, FacePerson.person_id, FacePerson.source)
        .join(Person, Person.id == FacePerson.person_id).where(Person.user_id == user_id))}
    rejections = set(session.execute(sa.select(FaceRejection.face_id, FaceRejection.person_id)
                                     .where(FaceRejection.user_id == user_id)).all())
    return {"persons": persons, "links": links, "rejections": rejections}


def labels_as_now(session, lib) -> dict[int, int]:
    """The clustering a re-run would make: every face in its true person's cluster."""
    return {f: p for f, p in lib.truth.items()}


def test_not_this_person_is_obeyed_by_reclustering_and_by_the_worker(session, lib):
    person = lib.person_of[0]
    face = next(f for f, p in lib.truth.items() if p == 0)
    person_service.reject_face(session, lib.user_id, person, face)
    session.commit()
    assert face not in persons_repo.face_links(session, lib.user_id)

    person_service.apply_clustering(session, lib.user_id, labels_as_now(session, lib))
    session.commit()
    links = persons_repo.face_links(session, lib.user_id)
    assert face not in links  # the cluster still holds it, the person refuses it
    assert all(links[f] == lib.person_of[p] for f, p in lib.truth.items() if f != face)
    assert person_service.link_new_faces(session, lib.user_id, {face: person}) == {}
    assert_counts_true(session, lib.user_id)


def test_a_merge_carries_rejections_over_and_a_move_by_hand_lifts_them(session, lib):
    p0, p1 = lib.person_of[0], lib.person_of[1]
    face = next(f for f, p in lib.truth.items() if p == 1)
    person_service.reject_face(session, lib.user_id, p1, face)
    person_service.merge(session, lib.user_id, p0, [p1])
    session.commit()
    assert persons_repo.rejected_persons(session, lib.user_id, [face]) == {face: {p0}}
    assert person_service.link_new_faces(session, lib.user_id, {face: p0}) == {}

    person_service.move_faces(session, lib.user_id, [face], p0)
    session.commit()
    assert persons_repo.rejected_persons(session, lib.user_id, [face]) == {}
    assert persons_repo.face_links(session, lib.user_id)[face] == p0
    assert_counts_true(session, lib.user_id)


def test_a_merge_never_leaves_a_face_in_a_person_it_is_rejected_from(session, lib):
    """"Not p1", then moved into p0 by hand, then p1 merged into p0: the face is in p0, so the
    rejection of p1 is not carried over to p0 (found by the API concurrency test)."""
    p0, p1 = lib.person_of[0], lib.person_of[1]
    face = next(f for f, p in lib.truth.items() if p == 1)
    person_service.reject_face(session, lib.user_id, p1, face)
    person_service.move_faces(session, lib.user_id, [face], p0)
    person_service.merge(session, lib.user_id, p0, [p1])
    session.commit()
    assert persons_repo.face_links(session, lib.user_id)[face] == p0
    assert persons_repo.rejected_persons(session, lib.user_id, [face]) == {}
    assert_counts_true(session, lib.user_id)


def test_a_merge_outlives_reclustering_even_where_the_embedder_sees_two_clusters(session, lib):
    """The merged-in faces become the user's links; the target's own faces stay automatic and
    form a cluster of their own, which must stay with the confirmed person, not leave for a new one."""
    p0, p1 = lib.person_of[0], lib.person_of[1]
    extra = [f for f, p in lib.truth.items() if p == 2][:3]
    person_service.move_faces(session, lib.user_id, extra, p1)  # the merged person is the bigger one
    person_service.merge(session, lib.user_id, p0, [p1])
    session.commit()
    merged = {f for f, p in persons_repo.face_links(session, lib.user_id).items() if p == p0}
    labels = {**labels_as_now(session, lib), **dict.fromkeys(extra, 1)}  # the embedder agrees with the moves
    person_service.apply_clustering(session, lib.user_id, labels)
    session.commit()
    assert {f for f, p in persons_repo.face_links(session, lib.user_id).items() if p == p0} == merged
    assert_counts_true(session, lib.user_id)


def test_a_merge_of_one_face_persons_outlives_a_reclustering_that_leaves_both_faces_alone(session, lib):
    """Two automatic one-face persons (a library clustered with a minimum size of 1) merged; under
    a minimum of 2 the re-clustering leaves both faces unclustered, and the merge must keep both
    (the target's own face is the user's link after a merge, like the merged-in one)."""
    a = [f for f, p in lib.truth.items() if p == 0][0]
    b = [f for f, p in lib.truth.items() if p == 1][0]
    made = person_service.apply_clustering(session, lib.user_id, {**lib.truth, a: 100, b: 101})  # min size 1
    pa, pb = made[100], made[101]
    person_service.merge(session, lib.user_id, pa, [pb])
    session.commit()
    labels = {f: p for f, p in lib.truth.items() if f not in (a, b)}  # a and b: noise to the clustering
    person_service.apply_clustering(session, lib.user_id, labels)
    session.commit()
    links = persons_repo.face_links(session, lib.user_id)
    assert links[a] == links[b] == pa
    assert_counts_true(session, lib.user_id)


def test_a_named_persons_face_left_in_no_person_by_a_reclustering_stays_in_it(session, lib):
    """Faces pushed out of every cluster stay in a person the user named; in an unnamed one they
    leave, and a face the clustering puts into another person moves whatever the name."""
    p0, p1 = lib.person_of[0], lib.person_of[1]
    person_service.update_person(session, lib.user_id, p0, name="Ann")
    session.commit()
    f0 = [f for f, p in lib.truth.items() if p == 0]
    f1 = [f for f, p in lib.truth.items() if p == 1]
    labels = {**lib.truth, f0[0]: -1, f0[1]: 1, f1[0]: -1}
    person_service.apply_clustering(session, lib.user_id, labels)
    session.commit()
    links = persons_repo.face_links(session, lib.user_id)
    assert links[f0[0]] == p0      # named, left in no person: stays
    assert links[f0[1]] == p1      # named, clustered elsewhere: moves
    assert f1[0] not in links      # unnamed, left in no person: leaves
    before = state(session, lib.user_id)
    person_service.apply_clustering(session, lib.user_id, labels)  # the same clustering again
    session.commit()
    assert state(session, lib.user_id) == before
    assert_counts_true(session, lib.user_id)


EDITS = {
    "rename": lambda s, lib: person_service.update_person(s, lib.user_id, lib.person_of[0], name="Ann"),
    "hide+favourite": lambda s, lib: person_service.update_person(s, lib.user_id, lib.person_of[1], hidden=True,
                                                                  favorite=True),
    "cover": lambda s, lib: person_service.update_person(
        s, lib.user_id, lib.person_of[2], cover_face_id=max(f for f, p in lib.truth.items() if p == 2)),
    "merge": lambda s, lib: person_service.merge(s, lib.user_id, lib.person_of[0], [lib.person_of[1], lib.person_of[2]]),
    "move": lambda s, lib: person_service.move_faces(
        s, lib.user_id, [f for f, p in lib.truth.items() if p == 1], lib.person_of[2]),
    "split": lambda s, lib: person_service.split_faces(s, lib.user_id, [f for f, p in lib.truth.items() if p == 0][:2]),
    "reject": lambda s, lib: person_service.reject_face(
        s, lib.user_id, lib.person_of[2], next(f for f, p in lib.truth.items() if p == 2)),
}


@pytest.mark.parametrize("kind", EDITS)
def test_undo_puts_back_exactly_what_an_edit_changed(session, lib, kind):
    person_service.update_person(session, lib.user_id, lib.person_of[1], name="Bob")  # an earlier edit stays
    session.commit()
    before = state(session, lib.user_id)
    EDITS[kind](session, lib)
    session.commit()
    assert_counts_true(session, lib.user_id)
    assert state(session, lib.user_id) != before

    person_service.undo(session, lib.user_id)
    session.commit()
    assert state(session, lib.user_id) == before
    assert_counts_true(session, lib.user_id)
    assert [e.undone_at is not None for e in person_service.edits(session, lib.user_id)] == [True, False]


def test_undo_walks_back_edit_by_edit_and_then_says_nothing_is_left(session, lib):
    states = [state(session, lib.user_id)]
    for kind in ("rename", "reject", "merge"):
        EDITS[kind](session, lib)
        session.commit()
        states.append(state(session, lib.user_id))
    for expected in reversed(states[:-1]):
        person_service.undo(session, lib.user_id)
        session.commit()
        assert state(session, lib.user_id) == expected
    with pytest.raises(person_service.NothingToUndo):
        person_service.undo(session, lib.user_id)


def test_merge_refuses_itself_and_another_users_person(session, lib, tmp_path):
    bob = seed_library(session, "bob", tmp_path / "bob", persons=1, faces_per_person=2, seed=8)
    with pytest.raises(ValueError):
        person_service.merge(session, lib.user_id, lib.person_of[0], [lib.person_of[0]])
    before = state(session, lib.user_id)
    with pytest.raises(person_service.NotFound):
        person_service.merge(session, lib.user_id, lib.person_of[0], [lib.person_of[1], bob.person_of[0]])
    session.rollback()
    assert state(session, lib.user_id) == before


def test_reclustering_keeps_the_most_faces_in_their_person_where_largest_overlap_first_would_not(session, tmp_path):
    """Al has 9 faces, Bob 4. The embedder now sees 5 of Al's with Bob's 4 (cluster X) and Al's
    other 4 apart (Y). Largest overlap first would give X to Al, make Y a new person and leave Bob
    empty: 8 faces change person. The best assignment (Hungarian) gives X to Bob and Y to Al:
    4 + 4 faces stay where they were, only 5 move, and no person is made or left empty."""
    lib = seed_library(session, "dan", tmp_path / "photos", persons=2, faces_per_person=9, seed=9)
    al_faces, bob_pool = [f for f, p in lib.truth.items() if p == 0], [f for f, p in lib.truth.items() if p == 1]
    bob_faces = bob_pool[:4]
    old = person_service.apply_clustering(session, lib.user_id, {**dict.fromkeys(al_faces, 0),
                                                                 **dict.fromkeys(bob_faces, 1),
                                                                 **dict.fromkeys(bob_pool[4:], -1)})
    al, bob = old[0], old[1]
    person_service.update_person(session, lib.user_id, al, name="Al")
    person_service.update_person(session, lib.user_id, bob, name="Bob")
    session.commit()
    x, y = al_faces[:5] + bob_faces, al_faces[5:]
    made = person_service.apply_clustering(session, lib.user_id, {**dict.fromkeys(x, 7), **dict.fromkeys(y, 8)})
    session.commit()
    assert made == {7: bob, 8: al}
    links = persons_repo.face_links(session, lib.user_id)
    assert {f for f, p in links.items() if p == bob} == set(x)
    assert {f for f, p in links.items() if p == al} == set(y)
    assert set(links.values()) == {al, bob}
    assert_counts_true(session, lib.user_id)


def test_equal_overlaps_go_to_the_older_person(session, lib):
    """A cluster holding two persons' faces in equal numbers keeps the older one's id."""
    p0, p1 = lib.person_of[0], lib.person_of[1]
    both = [f for f, p in lib.truth.items() if p in (0, 1)]
    made = person_service.apply_clustering(session, lib.user_id, {f: 0 for f in both})
    assert made[0] == min(p0, p1)
    assert_counts_true(session, lib.user_id)
