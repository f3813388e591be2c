"""The cluster worker's in-memory copy of a user against changes made by other hands (each test runs
on SQLite and on the real PostgreSQL).

The vectors are chosen, not made by a model: what is under test is which faces the worker
compares a new face with. Two persons form first, P = {a1, a2} (cosine 0.6) and Q = {b1, b2};
then the user changes P, and a new face n arrives that is close to a2 (0.9) and far from a1
(0.2). Judged against a2 as well, n joins P (mean 0.55, above the 0.44 the cut allows); judged
against a1 alone it joins nobody. Those tests pin the worker to its incremental path (a user above
``recluster_max_faces``); a small user is re-clustered by the batch job's rule, tested last.
"""

from __future__ import annotations

import hashlib
import threading
import uuid

import numpy as np
import pytest
import sqlalchemy as sa

from facecore.types import FaceRecord, PhotoResult
from services import bus as busmod
from services.bus import Message
from services.cluster_worker.worker import ClusterWorker
from services.persons import service as person_service
from services.persons import repository as persons_repo
from services.store import repository as repo
from services.store.db import session_factory
from services.store.models import User

MODEL = "sface-2021dec"  # its calibrated cut, 0.56, is what the worker uses


def unit(**coords: float) -> np.ndarray:
    v = np.zeros(128, np.float32)
    for axis, value in coords.items():
        v[int(axis[1:])] = value
    return v / np.linalg.norm(v)


VECTORS = {
    "a1": unit(e0=1),
    "a2": unit(e0=0.6, e1=0.8),
    "b1": unit(e5=1),
    "b2": unit(e5=0.9, e6=np.sqrt(0.19)),
    "n": unit(e0=0.2, e1=0.975, e2=np.sqrt(1 - 0.2**2 - 0.975**2)),
    # P' = {p1, p2} and R = {r1, r2} (cosine 0.9 within, 0 across); m agrees with both, more with P'
    "p1": unit(e10=1),
    "p2": unit(e10=0.9, e11=np.sqrt(0.19)),
    "r1": unit(e12=1),
    "r2": unit(e12=0.9, e13=np.sqrt(0.19)),
    "m": unit(e10=0.75, e12=0.6),
    # p3 and p4 agree with P' too (cosine 0.62 to 0.95)
    "p3": unit(e10=0.9, e11=-np.sqrt(0.19)),
    "p4": unit(e10=0.95, e14=np.sqrt(1 - 0.95**2)),
    # a chain: h0 0.76 to h1, h1 0.75 to h2, h0 only 0.15 to h2 (average linkage joins all three)
    "h0": unit(e30=0.76, e31=np.sqrt(1 - 0.76**2)),
    "h1": unit(e30=1),
    "h2": unit(e30=0.75, e31=(0.15 - 0.75 * 0.76) / np.sqrt(1 - 0.76**2),
               e32=np.sqrt(1 - 0.75**2 - ((0.15 - 0.75 * 0.76) / np.sqrt(1 - 0.76**2)) ** 2)),
}


def record(vector: np.ndarray) -> FaceRecord:
    return FaceRecord(index=0, box=np.array([10, 10, 90, 110], np.float32), landmarks=np.zeros((5, 2), np.float32),
                      det_score=0.99, blur=0.5, blurry=False, trash_score=0.0, is_trash=False, embedding=vector,
                      model_version=MODEL)


@pytest.fixture
def ann(db_engine):
    """A user of this test's own (the PostgreSQL database is shared), deleted afterwards."""
    sessions = session_factory(db_engine)
    name = f"ann-{uuid.uuid4().hex[:8]}"
    with sessions() as s:
        repo.get_or_create_user(s, name)
        s.commit()
    yield sessions, name
    with sessions() as s:
        s.execute(sa.delete(User).where(User.name == name))
        s.commit()


def upload(sessions, name: str, photo: str, vector: np.ndarray | None = None) -> int:
    """Store one photo of one face (``VECTORS[photo]`` unless given), as the ingest worker
    does; its face id."""
    with sessions() as s:
        user = repo.find_user(s, name)
        saved = repo.save_photo_result(s, user.id, f"{photo}.jpg", PhotoResult(
            key=photo, sha256=hashlib.sha256(f"{name}/{photo}".encode()).hexdigest(), width=200, height=200,
            faces=[record(VECTORS[photo] if vector is None else vector)]))
        s.commit()
        return saved.face_ids[0]


def event(name: str, face_ids: list[int], offset: int) -> Message:
    value = {"user": name, "face_ids": face_ids}
    return Message(busmod.INDEXED, 0, offset, name, value, b"")


def persons(sessions, name: str) -> dict[int, set[int]]:
    with sessions() as s:
        out: dict[int, set[int]] = {}
        for face, person in persons_repo.face_links(s, repo.find_user(s, name).id).items():
            out.setdefault(person, set()).add(face)
        return out


@pytest.mark.parametrize("change", ["delete a2's photo", "move a2 to Q"])
def test_a_new_face_is_judged_against_the_users_faces_as_they_are_now(ann, change):
    sessions, name = ann
    bus = busmod.connect(f"memory://cache-{uuid.uuid4().hex}")
    bus.ensure_topics()
    worker = ClusterWorker(bus, sessions, threading.Event(), recluster_max_faces=0)
    faces = {p: upload(sessions, name, p) for p in ("a1", "a2", "b1", "b2")}
    worker.handle([event(name, list(faces.values()), 0)])
    before = persons(sessions, name)
    assert sorted(map(sorted, before.values())) == sorted([[faces["a1"], faces["a2"]], [faces["b1"], faces["b2"]]])
    p = next(person for person, members in before.items() if faces["a1"] in members)
    q = next(person for person, members in before.items() if faces["b1"] in members)

    with sessions() as s:
        user = repo.find_user(s, name)
        if change.startswith("delete"):
            person_service.delete_photo(s, user.id, repo.face_photo_ids(s, user.id, [faces["a2"]])[faces["a2"]])
        else:
            person_service.move_faces(s, user.id, [faces["a2"]], q)
        s.commit()

    faces["n"] = upload(sessions, name, "n")
    worker.handle([event(name, [faces["n"]], 1)])
    after = persons(sessions, name)
    assert faces["n"] not in after[p]
    assert all(faces["n"] not in members for members in after.values())
    state = worker.users[name]
    if change.startswith("delete"):  # the deleted face's embedding is gone from the worker's memory too
        assert faces["a2"] not in state.assigned_ids
    else:
        assert state.person_of[state.assigned_ids == faces["a2"]].tolist() == [q]
    bus.close()


def test_the_sweep_forgets_deleted_users_and_changed_copies_without_an_event(ann, db_engine):
    """No event need come: the worker's periodic sweep (also run while idle) drops the copy of a
    user whose photo was deleted and of a user who was deleted, and keeps the others."""
    sessions, name = ann
    bus = busmod.connect(f"memory://cache-{uuid.uuid4().hex}")
    bus.ensure_topics()
    worker = ClusterWorker(bus, sessions, threading.Event())
    others = [f"{name}-{k}" for k in range(2)]
    for user in others:
        with sessions() as s:
            repo.get_or_create_user(s, user)
            s.commit()
    faces = {(user, p): upload(sessions, user, p) for user in [name, *others] for p in ("a1", "a2")}
    worker.handle([event(user, [faces[user, "a1"], faces[user, "a2"]], k) for k, user in enumerate([name, *others])])
    assert worker.users.keys() == {name, *others}

    worker.sweep(now=True)
    assert worker.users.keys() == {name, *others}  # nothing changed: every copy stays
    with sessions() as s:
        user = repo.find_user(s, name)
        person_service.delete_photo(s, user.id, repo.face_photo_ids(s, user.id, [faces[name, "a2"]])[faces[name, "a2"]])
        repo.delete_user(s, repo.find_user(s, others[0]).id)
        s.commit()
    worker.sweep()  # too soon after the last one: nothing read
    assert worker.users.keys() == {name, *others}
    worker.sweep(now=True)
    assert worker.users.keys() == {others[1]}

    stop = threading.Event()
    consumer = bus.consumer(busmod.INDEXED, "cluster", max_records=10)
    swept = []

    def idle() -> None:
        swept.append(True)
        stop.set()

    busmod.consume(consumer, worker.handle, stop, poll_s=0.01, idle=idle)  # an empty topic: straight to idle
    assert swept == [True]
    with sessions() as s:
        s.execute(sa.delete(User).where(User.name == others[1]))
        s.commit()
    consumer.close()
    bus.close()


def test_a_face_rejected_from_its_closest_person_joins_the_next_one_that_agrees(ann):
    """Incremental path: m joins P' (the closest); the user says "not this person"; m announced
    again joins R, which agrees with it too, and never P'. The re-clustering path (a small user)
    keeps it out of P' as well."""
    sessions, name = ann
    bus = busmod.connect(f"memory://cache-{uuid.uuid4().hex}")
    bus.ensure_topics()
    worker = ClusterWorker(bus, sessions, threading.Event(), recluster_max_faces=0)
    faces = {p: upload(sessions, name, p) for p in ("p1", "p2", "r1", "r2")}
    worker.handle([event(name, list(faces.values()), 0)])
    person_of = {f: p for p, members in persons(sessions, name).items() for f in members}
    p, r = person_of[faces["p1"]], person_of[faces["r1"]]
    assert p != r and person_of[faces["p2"]] == p and person_of[faces["r2"]] == r

    faces["m"] = upload(sessions, name, "m")
    worker.handle([event(name, [faces["m"]], 1)])
    assert faces["m"] in persons(sessions, name)[p]
    with sessions() as s:
        person_service.reject_face(s, repo.find_user(s, name).id, p, faces["m"])
        s.commit()
    worker.handle([event(name, [faces["m"]], 2)])
    after = persons(sessions, name)
    assert faces["m"] not in after[p] and faces["m"] in after[r]

    with sessions() as s:  # back to no person, and re-clustered from scratch
        person_service.reject_face(s, repo.find_user(s, name).id, r, faces["m"])
        s.commit()
    ClusterWorker(bus, sessions, threading.Event()).handle([event(name, [faces["m"]], 3)])
    after = persons(sessions, name)
    assert faces["m"] not in after[p] and faces["m"] not in after[r]
    bus.close()


def test_a_small_user_is_reclustered_by_the_batch_jobs_rule(ann):
    """While a user is small the worker re-clusters them from scratch as `facecluster cluster`
    does: a lone face waits in no person until a second agrees, a new face can pull a face out
    of a person (n goes with a2 and a1 is left alone: average linkage, not the incremental kNN
    vote, which would put n into {a1, a2}), person ids stay, and the batch job run afterwards
    changes nothing."""
    from services.clustering import cluster_user

    sessions, name = ann
    bus = busmod.connect(f"memory://cache-{uuid.uuid4().hex}")
    bus.ensure_topics()
    worker = ClusterWorker(bus, sessions, threading.Event())
    faces = {"a1": upload(sessions, name, "a1")}
    worker.handle([event(name, [faces["a1"]], 0)])
    assert persons(sessions, name) == {}
    faces["a2"] = upload(sessions, name, "a2")
    worker.handle([event(name, [faces["a2"]], 1)])
    (p, members), = persons(sessions, name).items()
    assert members == {faces["a1"], faces["a2"]}

    for offset, photo in enumerate(("b1", "b2", "n"), start=2):
        faces[photo] = upload(sessions, name, photo)
        worker.handle([event(name, [faces[photo]], offset)])
    after = persons(sessions, name)
    assert after[p] == {faces["a2"], faces["n"]}
    assert sorted(map(sorted, after.values())) == sorted([[faces["a2"], faces["n"]], [faces["b1"], faces["b2"]]])
    assert worker.users[name].faces == 5  # its copy is the re-clustered user

    cluster_user(sessions, name, MODEL)
    assert persons(sessions, name) == after
    bus.close()


def test_a_pool_face_with_no_new_face_near_it_forms_no_person_until_one_arrives(ann):
    """The unassigned pool is clustered around the new faces only. p1, p2, p3 agree but wait
    in the pool (a worker that wants 4 faces for a person). A worker that wants 3 then gets a
    far face b1: p1-p3 form no person (clustering the whole pool would have made one); a face
    near them, p4, makes them a person, with p4."""
    sessions, name = ann
    bus = busmod.connect(f"memory://cache-{uuid.uuid4().hex}")
    bus.ensure_topics()
    faces = {p: upload(sessions, name, p) for p in ("p1", "p2", "p3")}
    ClusterWorker(bus, sessions, threading.Event(), recluster_max_faces=0, min_faces=4).handle(
        [event(name, list(faces.values()), 0)])
    assert persons(sessions, name) == {}

    worker = ClusterWorker(bus, sessions, threading.Event(), recluster_max_faces=0, min_faces=3)
    faces["b1"] = upload(sessions, name, "b1")
    worker.handle([event(name, [faces["b1"]], 1)])
    assert persons(sessions, name) == {}
    assert sorted(worker.users[name].pool_ids.tolist()) == sorted(faces.values())
    faces["p4"] = upload(sessions, name, "p4")
    worker.handle([event(name, [faces["p4"]], 2)])
    assert sorted(persons(sessions, name).values()) == [{faces[p] for p in ("p1", "p2", "p3", "p4")}]
    assert worker.users[name].pool_ids.tolist() == [faces["b1"]]
    bus.close()


def test_a_new_face_forms_a_person_with_pool_faces_that_only_its_neighbour_is_close_to(ann):
    """h1 and h2 wait in the pool; the new face h0 is close to h1 but not to h2 (0.15, below
    the loose similarity): h2 is clustered with them because h1, close to h0, is close to it,
    and average linkage makes the three one person, as clustering the whole pool would."""
    sessions, name = ann
    bus = busmod.connect(f"memory://cache-{uuid.uuid4().hex}")
    bus.ensure_topics()
    faces = {p: upload(sessions, name, p) for p in ("h1", "h2")}
    ClusterWorker(bus, sessions, threading.Event(), recluster_max_faces=0, min_faces=4).handle(
        [event(name, list(faces.values()), 0)])
    assert persons(sessions, name) == {}
    faces["h0"] = upload(sessions, name, "h0")
    ClusterWorker(bus, sessions, threading.Event(), recluster_max_faces=0, min_faces=3).handle(
        [event(name, [faces["h0"]], 1)])
    assert sorted(persons(sessions, name).values()) == [set(faces.values())]
    bus.close()


def library(seed: int, rounds: int, per_round: int) -> list[list[tuple[str, np.ndarray]]]:
    """A user's uploads in rounds: (photo key, vector), faces of 4 persons (cosine about 0.7
    within, about 0 across) and a few faces of nobody else."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4, 128))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = []
    for r in range(rounds):
        batch = []
        for j in range(per_round):
            base = centres[j % 4] if j % 5 else rng.standard_normal(128)
            v = base / np.linalg.norm(base) + rng.standard_normal(128) * 0.6 / np.sqrt(128)
            batch.append((f"s{seed}-r{r}-f{j}", (v / np.linalg.norm(v)).astype(np.float32)))
        out.append(batch)
    return out


def albums(sessions, name: str) -> set[frozenset[str]]:
    """The user's persons as sets of photo keys (face ids differ between users)."""
    with sessions() as s:
        user = repo.find_user(s, name)
        key = dict(s.execute(sa.text("select f.id, p.uri from faces f join photos p on p.id = f.photo_id "
                                     "where p.user_id = :u"), {"u": user.id}).all())
    return {frozenset(key[f] for f in members) for members in persons(sessions, name).values()}


def test_the_cache_stays_within_its_bytes_and_evicted_users_give_the_same_albums(ann):
    """Six users' uploads in four rounds go to a worker whose cache holds about three users and
    the same uploads of six other users to an unbounded one: the bounded cache never holds more
    than its bound, users are dropped and read again, and every user ends with the albums
    the unbounded worker gave their twin."""
    sessions, name = ann
    bus = busmod.connect(f"memory://cache-{uuid.uuid4().hex}")
    bus.ensure_topics()
    rounds, per_round, users = 4, 6, 6
    per_user = rounds * per_round * (128 * 4 + 16)  # vector, face id and person id (or pool id)
    bounded = ClusterWorker(bus, sessions, threading.Event(), recluster_max_faces=0,
                            cache_mb=3 * per_user / 2**20)
    unbounded = ClusterWorker(bus, sessions, threading.Event(), recluster_max_faces=0)
    twins = [(f"{name}-b{k}", f"{name}-u{k}") for k in range(users)]
    try:
        with sessions() as s:
            for pair in twins:
                for user in pair:
                    repo.get_or_create_user(s, user)
            s.commit()
        uploads = [library(k, rounds, per_round) for k in range(users)]
        offset = 0
        for r in range(rounds):
            for k, pair in enumerate(twins):
                for worker, user in zip((bounded, unbounded), pair):
                    ids = [upload(sessions, user, key, v) for key, v in uploads[k][r]]
                    worker.handle([event(user, ids, offset)])
                    offset += 1
                assert bounded.cache_bytes <= bounded.cache_limit
        assert bounded.evictions > 0 and len(bounded.users) < users == len(unbounded.users)
        for b, u in twins:
            assert albums(sessions, b) == albums(sessions, u)
            assert len(albums(sessions, b)) >= 4
    finally:
        with sessions() as s:
            s.execute(sa.delete(User).where(User.name.in_([n for pair in twins for n in pair])))
            s.commit()
        bus.close()


def test_a_user_larger_than_the_cache_is_served_and_not_kept(ann):
    sessions, name = ann
    bus = busmod.connect(f"memory://cache-{uuid.uuid4().hex}")
    bus.ensure_topics()
    worker = ClusterWorker(bus, sessions, threading.Event(), recluster_max_faces=0, cache_mb=1000 / 2**20)
    faces = {p: upload(sessions, name, p) for p in ("a1", "a2")}
    worker.handle([event(name, list(faces.values()), 0)])
    assert sorted(persons(sessions, name).values()) == [set(faces.values())]
    assert worker.users == {} and worker.evictions == 1
    faces["n"] = upload(sessions, name, "n")
    worker.handle([event(name, [faces["n"]], 1)])  # read again, and filed against a1 and a2
    assert sorted(persons(sessions, name).values()) == [set(faces.values())]
    bus.close()
