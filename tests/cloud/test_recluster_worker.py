"""The batch recluster job at scale on the real PostgreSQL and Kafka: 2,000 users enqueued with
`facecluster recluster --all --enqueue`, re-clustered by two recluster worker processes of which
one is killed with SIGKILL mid-run and started again; the final persons and links of every user
equal those of a serial `facecluster recluster --all` on a copy of the same database.

The users' faces are synthetic clusters (random directions plus noise, as in
tests/test_recluster.py), not model output: the test checks bookkeeping under concurrency and
kills, not clustering accuracy. Their starting states are written in bulk (the rules layer's
way would take minutes for 2,000 users) and cover the cases a re-clustering meets: never
clustered, a stale person holding two people, one person cut in two with flags set on the
halves and a "not this person", and a correct clustering with a name, a confirmed person, a
face the user moved by hand and a rejection.

``FACECLUSTER_RECLUSTER_USERS`` (default 2000) sets the number of users.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from facecore.types import FaceRecord
from services import bus as busmod
from services.recluster import recluster_users
from services.recluster_worker.worker import GROUP
from services.store import repository as repo
from services.store.db import make_engine, migrate, session_factory
from services.store.models import Face, FacePerson, FaceRejection, Person, Photo, User
from testbus import drop_topics

pytestmark = pytest.mark.cloud

REPO = Path(__file__).resolve().parents[2]
USERS = int(os.environ.get("FACECLUSTER_RECLUSTER_USERS", "2000"))
SIZES = (3, 2)  # faces of the user's two synthetic persons
MODEL = "sface-2021dec"
DIM = 128
BATCH = 16
START_S = 120  # a worker's imports and group join on a busy 2-core machine
USER_LINE = re.compile(r"recluster_worker\[\d+\]: (user-\d{5}): ")


# ------------------------------------------------------------------------------ the population


def _face(v: np.ndarray, k: int) -> FaceRecord:
    return FaceRecord(index=0, box=np.array((100.0, 60.0, 220.0, 180.0), np.float32),
                      landmarks=np.zeros((5, 2), np.float32), det_score=0.99 - 0.01 * k, blur=0.8, blurry=False,
                      trash_score=0.1, is_trash=False, embedding=v, model_version=MODEL, attributes={})


def seed(engine: sa.Engine, n: int) -> None:
    """n users of 5 one-face photos (synthetic persons A of 3 faces, B of 2) in four starting states."""
    rng = np.random.default_rng(2024)
    with engine.begin() as conn:
        user_ids = list(conn.scalars(sa.insert(User).returning(User.id, sort_by_parameter_order=True),
                                     [{"name": f"user-{i:05d}"} for i in range(n)]))
        photos = [{"user_id": u, "uri": f"p{k}.jpg", "sha256": hashlib.sha256(f"{u}/{k}".encode()).hexdigest(),
                   "status": "indexed", "width": 320, "height": 240}
                  for u in user_ids for k in range(sum(SIZES))]
        photo_ids = list(conn.scalars(sa.insert(Photo).returning(Photo.id, sort_by_parameter_order=True), photos))
        rows = []
        for i, u in enumerate(user_ids):
            bases = rng.standard_normal((len(SIZES), DIM)).astype(np.float32)
            k = 0
            for p, size in enumerate(SIZES):
                for j in range(size):
                    v = bases[p] + 0.35 * rng.standard_normal(DIM).astype(np.float32)
                    rows.append(repo._face_row(photo_ids[i * sum(SIZES) + k], u, _face(v / np.linalg.norm(v), j)))
                    k += 1
        face_ids = list(conn.scalars(sa.insert(Face).returning(Face.id, sort_by_parameter_order=True), rows))

        persons, links, rejections = [], [], []  # (user, key, fields), (face, user, key, source), (face, user, key)
        for i, u in enumerate(user_ids):
            a0, a1, a2, b0, b1 = face_ids[i * 5:i * 5 + 5]
            state = i % 4
            if state == 1:  # one stale person holds both people, and has a name
                persons.append((u, "AB", {"name": f"Family {i}"}))
                links += [(f, u, "AB", "auto") for f in (a0, a1, a2, b0, b1)]
            elif state == 2:  # A cut in two, flags on the halves; b1 was said not to be the second half
                persons += [(u, "A1", {"hidden": True}), (u, "A2", {"favorite": True})]
                links += [(a0, u, "A1", "auto"), (a1, u, "A1", "auto"), (a2, u, "A2", "auto"), (b0, u, "A2", "auto")]
                rejections.append((b1, u, "A2"))
            elif state == 3:  # right, with decisions: a name, a confirmed B, a2 moved to B by hand, a rejection
                persons += [(u, "A", {"name": f"Ann {i}"}), (u, "B", {"user_confirmed": True})]
                links += [(a0, u, "A", "auto"), (a1, u, "A", "auto"), (a2, u, "B", "user"), (b0, u, "B", "user"),
                          (b1, u, "B", "auto")]
                rejections.append((a2, u, "A"))
        ids = list(conn.scalars(sa.insert(Person).returning(Person.id, sort_by_parameter_order=True),
                                [{"user_id": u, "name": None, "hidden": False, "favorite": False,
                                  "user_confirmed": False, **fields} for u, _, fields in persons]))
        person_of = {(u, key): pid for (u, key, _), pid in zip(persons, ids)}
        conn.execute(sa.insert(FacePerson), [{"face_id": f, "person_id": person_of[(u, key)], "source": source}
                                             for f, u, key, source in links])
        if rejections:
            conn.execute(sa.insert(FaceRejection), [{"face_id": f, "person_id": person_of[(u, key)], "user_id": u}
                                                    for f, u, key in rejections])
        # face counts and covers, as the rules layer keeps them
        count = sa.select(sa.func.count()).where(FacePerson.person_id == Person.id).scalar_subquery()
        cover = sa.select(sa.func.min(FacePerson.face_id)).where(FacePerson.person_id == Person.id).scalar_subquery()
        conn.execute(sa.update(Person).values(face_count=count, cover_face_id=cover))


def final_state(url: str, first_new_person: int) -> dict:
    """user -> (persons, rejections): every person with its fields and its faces with their sources.
    Persons made by the re-clustering get ids in the order the workers reach the users, so
    those are compared by their contents only."""
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        names = dict(conn.execute(sa.select(User.id, User.name)).all())
        faces = defaultdict(list)
        for f, p, source in conn.execute(sa.select(FacePerson.face_id, FacePerson.person_id, FacePerson.source)):
            faces[p].append((f, source))
        out: dict[str, tuple[list, list]] = {name: ([], []) for name in names.values()}
        for p in conn.execute(sa.select(Person)):
            pid = p.id if p.id < first_new_person else "new"
            out[names[p.user_id]][0].append((str(pid), p.name, p.hidden, p.favorite, p.user_confirmed, p.cover_face_id,
                                             p.face_count, tuple(sorted(faces[p.id]))))
        for f, p, u in conn.execute(sa.select(FaceRejection.face_id, FaceRejection.person_id, FaceRejection.user_id)):
            out[names[u]][1].append((f, p))
    engine.dispose()
    return {name: (sorted(persons), sorted(rejected)) for name, (persons, rejected) in out.items()}


# ------------------------------------------------------------------------------ processes


class Worker:
    def __init__(self, env: dict, log_path: Path):
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.recluster_worker", "--exit-when-idle", "5"],
                                         cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def users_handled(self) -> int:
        """Users of the batches this worker finished (re-clustered and their offsets about to be committed)."""
        return sum(int(n) for n in re.findall(r"batch of \d+: (\d+) users re-clustered", self.log()))

    def in_batch(self) -> int:
        """Users this worker re-clustered (committed) in the batch it is on now."""
        return len(USER_LINE.findall(self.log().rsplit(" users re-clustered (", 1)[-1]))

    def users(self) -> list[str]:
        """Every user this worker re-clustered, once per time."""
        return USER_LINE.findall(self.log())

    def changed(self) -> list[str]:
        """The users whose re-clustering here changed something."""
        return re.findall(r"recluster_worker\[\d+\]: (user-\d{5}): \d+ faces; ", self.log())


@pytest.fixture
def deployment(pg_url, kafka_bootstrap, tmp_path):
    """A fresh database and topic namespace; yields (db url, copy url, bus url, env); drops them after."""
    namespace = f"t{uuid.uuid4().hex[:10]}"
    bus_url = f"kafka://{kafka_bootstrap}/{namespace}"
    names = [f"facecluster_test_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    urls = [sa.make_url(pg_url).set(database=n).render_as_string(hide_password=False) for n in names]
    admin_db = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin_db.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{names[0]}"')
    bus = busmod.connect(bus_url)
    try:
        yield urls, names, admin_db, bus, bus_url
    finally:
        drop_topics(bus)
        bus.close()
        with admin_db.connect() as conn:
            for n in names:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)')
        admin_db.dispose()


def test_two_workers_one_killed_end_where_a_serial_run_ends(deployment, tmp_path):
    (url, copy_url), (name, copy_name), admin_db, bus, bus_url = deployment
    t0 = time.perf_counter()
    engine = make_engine(url)
    migrate(engine)
    seed(engine, USERS)
    with engine.connect() as conn:
        first_new_person = conn.scalar(sa.select(sa.func.coalesce(sa.func.max(Person.id), 0))) + 1
        faces = conn.scalar(sa.select(sa.func.count()).select_from(Face))
    engine.dispose()
    with admin_db.connect() as conn:  # the serial run's copy, before anything is re-clustered
        conn.exec_driver_sql(f'CREATE DATABASE "{copy_name}" TEMPLATE "{name}"')
    seeded_s = time.perf_counter() - t0

    env = {**os.environ, "FACECLUSTER_DATABASE_URL": url, "FACECLUSTER_BUS_URL": bus_url,
           "FACECLUSTER_BATCH_SIZE": str(BATCH)}
    enqueue = subprocess.run([sys.executable, "-m", "services.cli", "recluster", "--all", "--enqueue"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=300)
    assert enqueue.returncode == 0, enqueue.stderr[-4000:]
    assert f"enqueued {USERS} users on recluster.requested" in enqueue.stdout
    assert bus.pending(busmod.RECLUSTER, GROUP) == USERS

    def pending() -> int:
        return bus.pending(busmod.RECLUSTER, GROUP)

    def wait(what: str, condition, timeout: float, workers: list[Worker]) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {w.log_path.name}\n{w.log()[-3000:]}" for w in workers)
                pytest.fail(f"timed out after {timeout}s waiting for {what} (pending {pending()})\n{logs}")
            time.sleep(0.2)

    t1 = time.perf_counter()
    a = Worker(env, tmp_path / "worker-a.log")
    b = Worker(env, tmp_path / "worker-b.log")
    # Kill a mid-run, and mid-batch: once both are consuming and the group has done a third, at a
    # moment when a has committed some users of its batch in hand but not the batch's offsets.
    wait("both workers consuming and a third done",
         lambda: a.users_handled() >= BATCH and b.users_handled() >= BATCH and pending() <= USERS * 2 // 3,
         START_S + 300, [a, b])
    wait("a in the middle of a batch", lambda: 1 <= a.in_batch() <= BATCH // 2, 60, [a, b])
    a.proc.send_signal(signal.SIGKILL)
    assert a.proc.wait(timeout=30) == -signal.SIGKILL
    left_at_kill, done_before_kill, in_hand = pending(), len(a.users()), a.in_batch()
    a2 = Worker(env, tmp_path / "worker-a2.log")
    for w in (b, a2):
        try:
            code = w.proc.wait(timeout=START_S + 600)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            pytest.fail(f"{w.log_path.name} did not exit when idle\n{w.log()[-4000:]}")
        assert code == 0, w.log()[-4000:]
        assert "the group's lag is 0: exiting" in w.log()
    parallel_s = time.perf_counter() - t1
    assert pending() == 0
    runs = Counter(a.users() + b.users() + a2.users())
    assert set(runs) == {f"user-{i:05d}" for i in range(USERS)}
    twice = sorted(u for u, n in runs.items() if n > 1)
    assert len(twice) >= in_hand  # a's batch in hand was delivered again, and found done
    changes = Counter(a.changed() + b.changed() + a2.changed())
    assert max(changes.values()) == 1  # nothing was done twice in effect

    t2 = time.perf_counter()
    serial = subprocess.run([sys.executable, "-m", "services.cli", "recluster", "--all", "--db", copy_url],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    serial_s = time.perf_counter() - t2
    assert serial.returncode == 0, serial.stderr[-4000:]
    summary = serial.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{USERS} users re-clustered ({faces} faces)"), summary

    got, want = final_state(url, first_new_person), final_state(copy_url, first_new_person)
    assert got.keys() == want.keys() and len(got) == USERS
    differ = [u for u in want if got[u] != want[u]]
    assert not differ, f"{len(differ)} users differ from the serial run, e.g. {differ[0]}: {got[differ[0]]} != " \
                       f"{want[differ[0]]}"

    # What the states became (the serial run's, the same): every decision kept.
    for i, name_ in enumerate(sorted(want)):
        persons, rejected = want[name_]
        if i % 4 == 1:
            assert any(p[1] == f"Family {i}" and p[0] != "new" for p in persons)  # the name stayed, on one id
        if i % 4 == 3:
            assert any(p[1] == f"Ann {i}" for p in persons) and any(p[4] for p in persons)
            assert sum(s == "user" for p in persons for _, s in p[7]) == 2 and len(rejected) == 1
        if i % 4 == 2:
            assert {(p[2], p[3]) for p in persons} >= {(True, False), (False, True)} and len(rejected) == 1

    # Re-clustering again changes nothing (every 10th user, and every one the workers did twice; a
    # whole second run would cost as much as the first).
    engine = make_engine(url)
    again, _ = recluster_users(session_factory(engine), sorted({*list(want)[::10], *twice}))
    engine.dispose()
    assert again.users >= USERS // 10 and again.changed_users == 0 and again.moved == 0, again
    print(f"\nrecluster kill test: {USERS} users, {faces} faces; seeded in {seeded_s:.1f}s; 2 workers (one "
          f"SIGKILLed after {done_before_kill} users, {in_hand} of them in its batch in hand, {left_at_kill} events "
          f"left, restarted) drained the topic in {parallel_s:.1f}s, re-clustering {len(twice)} users twice "
          f"(harmless: the second time found nothing to change); serial run "
          f"{serial_s:.1f}s: {summary}")
