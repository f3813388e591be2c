"""The batch recluster job (services/recluster.py, `facecluster recluster`, the recluster worker)
on SQLite and PostgreSQL: a second run changes nothing, a dry run plans exactly what the real run
does and writes nothing, and every decision of the user survives.

The faces are synthetic clusters, not model output: each true person is a random direction in
128 dimensions and each of its faces that direction plus noise (as in apilibrary.py), so the
right clustering is known. These tests check the bookkeeping around the clustering, not its
accuracy (benchmarks/ and docs/BENCHMARKS.md measure that on real faces).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import threading
import uuid
from dataclasses import dataclass

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from facecore.types import FaceRecord, PhotoResult
from services import bus as busmod
from services.cli import main as cli_main
from services.persons import repository as persons_repo
from services.persons import service as person_service
from services.recluster import Plan, recluster_user, recluster_users
from services.store import repository as repo
from services.store.db import make_engine, migrate, session_factory
from services.store.models import Base, FaceRejection, Person
from testdb import scratch_pg_database
from testdb import assert_counts_true

MODEL = "sface-2021dec"
DIM = 128
BOX = np.array((100.0, 60.0, 220.0, 180.0), np.float32)


# ------------------------------------------------------------------------------ synthetic libraries


@dataclass
class Seeded:
    name: str
    user_id: int
    truth: dict[int, int]  # face id -> true person index

    def faces_of(self, person: int) -> list[int]:
        return sorted(f for f, p in self.truth.items() if p == person)


def seed_user(session: Session, name: str, sizes: list[int], *, seed: int, noise: float = 0.35) -> Seeded:
    """A user with one one-face photo per face: ``sizes[i]`` faces of synthetic person ``i``, in
    no person yet (indexed, not clustered). Flushes; the caller commits."""
    rng = np.random.default_rng(seed)
    bases = rng.standard_normal((len(sizes), DIM)).astype(np.float32)
    user = repo.get_or_create_user(session, name)
    truth = {}
    for p, n in enumerate(sizes):
        for k in range(n):
            v = bases[p] + noise * rng.standard_normal(DIM).astype(np.float32)
            face = FaceRecord(index=0, box=BOX, landmarks=np.zeros((5, 2), np.float32), det_score=0.99 - 0.01 * k,
                              blur=0.8, blurry=False, trash_score=0.1, is_trash=False,
                              embedding=v / np.linalg.norm(v), model_version=MODEL, attributes={})
            key = f"{name}/p{p}_{k}.jpg"
            result = PhotoResult(key=key, sha256=hashlib.sha256(key.encode()).hexdigest(), width=320, height=240,
                                 faces=[face])
            truth[repo.save_photo_result(session, user.id, key, result).face_ids[0]] = p
    session.flush()
    return Seeded(name, user.id, truth)


def dump(engine: sa.Engine) -> dict[str, list[tuple]]:
    """Every row of every table, in primary-key order: the whole database, to compare."""
    with engine.connect() as connection:
        return {table.name: [tuple(r) for r in connection.execute(
                    sa.select(table).order_by(*table.primary_key.columns))]
                for table in Base.metadata.sorted_tables}


def decisions(session: Session, user_id: int) -> dict:
    """What the user decided: person fields they set, their own links, their rejections."""
    session.expire_all()
    persons = {p.id: (p.name, p.hidden, p.favorite, p.user_confirmed)
               for p in session.scalars(sa.select(Person).where(Person.user_id == user_id))
               if p.name or p.hidden or p.favorite or p.user_confirmed}
    user_links = {f: p for f, (p, source) in persons_repo.user_links(session, user_id).items() if source == "user"}
    rejections = set(session.execute(sa.select(FaceRejection.face_id, FaceRejection.person_id)
                                     .where(FaceRejection.user_id == user_id)).all())
    return {"persons": persons, "user_links": user_links, "rejections": rejections}


def partition(session: Session, user_id: int) -> dict[int, frozenset]:
    """person id -> its faces."""
    session.expire_all()
    out: dict[int, set] = {}
    for f, p in persons_repo.face_links(session, user_id).items():
        out.setdefault(p, set()).add(f)
    return {p: frozenset(fs) for p, fs in out.items()}


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pg_engine(request):
    """A migrated scratch PostgreSQL database of this module's own (its tests commit)."""
    with scratch_pg_database(request.getfixturevalue("pg_url")) as url:
        engine = make_engine(url)
        migrate(engine)
        yield engine
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.cloud)])
def engine(request, tmp_path):
    if request.param == "postgres":
        yield request.getfixturevalue("pg_engine")
        return
    path = tmp_path / "facecluster.db"
    shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
    engine = make_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine):
    return session_factory(engine)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------ one user


def test_a_new_user_is_clustered_and_a_second_run_changes_nothing(engine, sessions):
    name = unique("ann")
    with sessions() as session:
        ann = seed_user(session, name, [4, 3, 3, 1], seed=1)
        session.commit()
    plan = recluster_user(sessions, name)
    assert plan.faces == 11 and plan.model_version == MODEL
    assert len(plan.created) == 3 and not plan.deleted and not plan.merged and not plan.split
    assert len(plan.moved) == 10 and all(m["from"] is None for m in plan.moved)  # the lone face stays alone
    with sessions() as session:
        got = set(partition(session, ann.user_id).values())
        assert got == {frozenset(ann.faces_of(p)) for p in range(3)}
        assert_counts_true(session, ann.user_id)

    before = dump(engine)
    again = recluster_user(sessions, name)
    assert again.empty, again
    assert dump(engine) == before  # not even the clustering revision moved


def test_a_dry_run_plans_what_the_run_does_and_writes_nothing(engine, sessions):
    """A stale clustering (true persons 0 and 1 in one named person, person 2 cut in two, person 3
    never clustered) is split, merged and extended; the dry run says so and changes no row."""
    name = unique("bob")
    with sessions() as session:
        bob = seed_user(session, name, [4, 4, 4, 3], seed=2)
        p2 = bob.faces_of(2)
        stale = {**{f: 0 for f in bob.faces_of(0) + bob.faces_of(1)}, **{f: 1 for f in p2[:2]},
                 **{f: 2 for f in p2[2:]}}
        old = person_service.apply_clustering(session, bob.user_id, stale)
        person_service.update_person(session, bob.user_id, old[0], name="Mum and Dad")
        session.commit()

    before = dump(engine)
    dry = recluster_user(sessions, name, dry_run=True)
    assert dump(engine) == before
    assert not dry.empty
    assert [s["person"] for s in dry.split] == [old[0]]
    assert dry.merged == [{"into": dry.merged[0]["into"], "from": sorted([old[1], old[2]])}]
    assert {c["person"] for c in dry.created} == {"new-1", "new-2"}  # the second half of the split, person 3

    real = recluster_user(sessions, name)
    assert dump(engine) != before

    # The same plan, but with the ids the created persons really got.
    ids = {f"new-{i}": c["person"] for i, c in enumerate(real.created, 1)}

    def resolved(plan: Plan) -> dict:
        text = json.dumps({k: v for k, v in plan.as_dict().items() if k != "seconds"}, sort_keys=True)
        for provisional, real_id in ids.items():
            text = text.replace(f'"{provisional}"', str(real_id))
        return json.loads(text)

    assert resolved(dry) == resolved(real)
    with sessions() as session:
        persons = partition(session, bob.user_id)
        assert set(persons.values()) == {frozenset(bob.faces_of(p)) for p in range(4)}
        named = session.get(Person, old[0])
        assert named.name == "Mum and Dad" and persons[old[0]] in {frozenset(bob.faces_of(0)),
                                                                     frozenset(bob.faces_of(1))}
        assert_counts_true(session, bob.user_id)
    assert recluster_user(sessions, name).empty


def test_every_decision_of_the_user_survives_reclustering(engine, sessions):
    """Names, hidden and favourite flags, a chosen cover, a merge, a split, faces moved by hand
    and "not this person" all hold, 100%, after a re-clustering, and a second one changes nothing."""
    name = unique("cy")
    with sessions() as session:
        cy = seed_user(session, name, [5, 5, 5, 5, 4, 3], seed=3)
        session.commit()
    recluster_user(sessions, name)
    with sessions() as session:
        links = persons_repo.face_links(session, cy.user_id)
        person = {p: links[cy.faces_of(p)[0]] for p in range(6)}
        uid = cy.user_id
        person_service.update_person(session, uid, person[0], name="Ann", favorite=True)
        person_service.update_person(session, uid, person[1], hidden=True, name="Bo")
        cover = cy.faces_of(2)[-1]
        person_service.update_person(session, uid, person[2], cover_face_id=cover)
        person_service.merge(session, uid, person[3], [person[4]])  # the embedder sees two people
        split = person_service.split_faces(session, uid, cy.faces_of(0)[:2])  # the embedder sees one
        person_service.move_faces(session, uid, cy.faces_of(5)[:1], person[1])  # one face moved by hand
        rejected = cy.faces_of(2)[0]
        person_service.reject_face(session, uid, person[2], rejected)
        session.commit()
        before = decisions(session, uid)
        assert len(before["persons"]) == 4 and before["rejections"] and before["user_links"]

    plan = recluster_user(sessions, name)
    with sessions() as session:
        after = decisions(session, uid)
        assert after == before
        assert session.get(Person, person[2]).cover_face_id == cover
        links = persons_repo.face_links(session, uid)
        assert links.get(rejected) != person[2]
        assert {f for f, p in links.items() if p == split.id} == set(cy.faces_of(0)[:2])
        assert {f for f, p in links.items() if p == person[3]} == set(cy.faces_of(3) + cy.faces_of(4))
        assert_counts_true(session, uid)
    assert not plan.deleted  # no person the user touched went away
    before_dump = dump(engine)
    assert recluster_user(sessions, name).empty
    assert dump(engine) == before_dump


def test_an_unknown_user_is_not_found_and_many_users_are_summed_up(sessions):
    names = [unique("many") for _ in range(3)]
    with sessions() as session:
        for i, name in enumerate(names):
            seed_user(session, name, [3, 2], seed=10 + i)
        session.commit()
    with pytest.raises(repo.NotFound):
        recluster_user(sessions, unique("nobody"))
    summary, plans = recluster_users(sessions, [*names, unique("gone")])
    assert (summary.users, summary.changed_users, summary.faces, summary.created, summary.moved) == (3, 3, 15, 6, 15)
    assert len(summary.missing_users) == 1 and [p.user for p in plans] == names
    summary, _ = recluster_users(sessions, names)
    assert (summary.users, summary.changed_users, summary.moved) == (3, 0, 0)


# ------------------------------------------------------------------------------ the command


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(list(args))
    return code, out.getvalue()


def test_the_command_dry_run_writes_the_plan_and_nothing_else(tmp_path, sqlite_template):
    path = tmp_path / "facecluster.db"
    shutil.copyfile(sqlite_template, path)
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    sessions = session_factory(engine)
    with sessions() as session:
        seed_user(session, "dee", [3, 3], seed=20)
        seed_user(session, "eve", [4], seed=21)
        session.commit()
    before = dump(engine)

    code, out = run_cli("recluster", "--user", "dee", "--dry-run", "--out", str(tmp_path / "dee.json"), "--db", url)
    assert code == 0 and "dry run, nothing written: 1 users re-clustered (6 faces)" in out
    assert "would change 1 users; persons 2 created" in out
    written = json.loads((tmp_path / "dee.json").read_text())
    assert written["dry_run"] and [u["user"] for u in written["users"]] == ["dee"]
    assert len(written["users"][0]["moved"]) == 6
    assert dump(engine) == before

    code, out = run_cli("recluster", "--all", "--dry-run", "--db", url)
    assert code == 0 and "would change 2 users; persons 3 created" in out and dump(engine) == before

    code, out = run_cli("recluster", "--all", "--out", str(tmp_path / "all.json"), "--db", url)
    assert code == 0 and "2 users re-clustered (10 faces)" in out and "changed 2 users; persons 3 created" in out
    assert json.loads((tmp_path / "all.json").read_text())["summary"]["moved"] == 10
    code, out = run_cli("recluster", "--all", "--db", url)
    assert code == 0 and ("changed 0 users; persons 0 created, 0 merged, 0 split, 0 deleted, 0 changed; "
                          "0 faces moved") in out

    with pytest.raises(SystemExit, match="no user 'nobody'"):
        run_cli("recluster", "--user", "nobody", "--db", url)
    with pytest.raises(SystemExit, match="shared bus"):
        run_cli("recluster", "--all", "--enqueue", "--bus", "memory://x", "--db", url)
    with pytest.raises(SystemExit):
        run_cli("recluster", "--db", url)  # --user or --all
    engine.dispose()


# ------------------------------------------------------------------------------ the worker


def test_the_worker_reclusters_the_users_it_is_sent_and_exits_when_idle(tmp_path, sqlite_template, monkeypatch):
    """In process on the memory bus: every user named by an event is re-clustered once (a
    duplicate event and an unknown user are harmless, a malformed event goes to photo.dead), and
    --exit-when-idle ends the worker with 0 once nothing is left."""
    from services.recluster_worker.worker import GROUP, main

    path = tmp_path / "facecluster.db"
    shutil.copyfile(sqlite_template, path)
    url, bus_url = f"sqlite:///{path}", f"memory://{unique('recluster')}"
    engine = make_engine(url)
    sessions = session_factory(engine)
    names = [f"w{i}" for i in range(6)]
    with sessions() as session:
        seeded = [seed_user(session, n, [3, 2], seed=30 + i) for i, n in enumerate(names)]
        session.commit()
    bus = busmod.connect(bus_url)
    bus.ensure_topics()
    bus.publish(busmod.RECLUSTER, [(n, {"user": n}) for n in [*names, names[0], "nobody"]])
    bus.publish(busmod.RECLUSTER, [("w1", b"{not json")])
    dead = bus.consumer(busmod.DEAD, "test-dead", max_records=10)

    monkeypatch.setenv("FACECLUSTER_DATABASE_URL", url)
    monkeypatch.setenv("FACECLUSTER_BUS_URL", bus_url)
    monkeypatch.setenv("FACECLUSTER_BATCH_SIZE", "3")
    stop, result = threading.Event(), []
    thread = threading.Thread(target=lambda: result.append(main(stop, ["--exit-when-idle", "1"])))
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the worker did not exit when idle"
    assert result == [0]
    assert bus.pending(busmod.RECLUSTER, GROUP) == 0
    with sessions() as session:
        for s in seeded:
            assert set(partition(session, s.user_id).values()) == {frozenset(s.faces_of(0)), frozenset(s.faces_of(1))}
    assert [m.value["reason"].startswith("malformed") for m in dead.poll(1.0)] == [True]
    engine.dispose()


def test_an_idle_worker_waits_while_another_member_holds_uncommitted_events():
    """--exit-when-idle: a member's own empty polls are not enough; it stays while the group's lag
    is not 0 (a peer's batch in hand, or a killed peer's events waiting for their partitions)."""
    from services.recluster_worker.worker import GROUP, ReclusterWorker

    bus = busmod.connect(f"memory://{unique('idle')}")
    bus.ensure_topics()
    bus.publish(busmod.RECLUSTER, [("ann", {"user": "ann"})])
    peer = bus.consumer(busmod.RECLUSTER, GROUP, max_records=10)
    batch = peer.poll(1.0)
    assert len(batch) == 1
    stop = threading.Event()
    worker = ReclusterWorker(bus, None, stop, GROUP, max_distance=0.0, min_size=2, exit_when_idle=0.0)
    worker.idle()
    assert not stop.is_set()  # the peer has not committed its batch
    assert peer.commit(batch)
    worker.idle()
    assert stop.is_set()
    never = ReclusterWorker(bus, None, threading.Event(), GROUP, max_distance=0.0, min_size=2)
    never.idle()
    assert not never.stop.is_set()  # without --exit-when-idle a worker runs until it is stopped
