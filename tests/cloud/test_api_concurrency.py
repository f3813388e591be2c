"""The person API under concurrent use while the cluster worker files new faces, on the real
services: a scratch PostgreSQL database, Kafka (a topic namespace of the test's own), a real
cluster worker process consuming ``faces.indexed`` and the real API over HTTP.

One user's faces keep arriving (photo and face rows with synthetic embeddings near one of a few
known persons, announced on ``faces.indexed`` as the ingest worker does) while several client
threads rename, merge, move faces, say "not this person" and undo through the API; once with the
worker re-clustering the user each batch, once filing new faces incrementally. Afterwards, once
the worker has consumed everything, the database must say what the answers said:

- no face is lost, none is in two persons, and every person's ``face_count`` is its real count;
- every face is where the user's last edit touching it that is still in force put it (a move or
  a merge: in that person; "not this person": not in it); a face whose edits were all undone is
  back in the person the user had put it in (an automatic link is the worker's to change);
- a face that no edit ever touched was filed by the worker (it is in a person);
- no face is in a person it was rejected from;
- each thread owns persons of its own that only it renames and merges (only into each other), so
  the final name of each is the last name the thread wrote whose edit was not undone (an undo
  reverts the user's newest edit, whoever made it: the edit log says which), and a person is gone
  only if a merge still in force took it;
- no answer was a 5xx, and 404/409 only where a race explains them (counted and reported).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from apiserver import start_api, stop_api
from facecore.types import FaceRecord, PhotoResult
from services import bus as busmod
from services import tokens
from services.store import repository as repo
from services.store.db import make_engine, migrate, session_factory
from services.store.models import Face, FacePerson, FaceRejection, Person, PersonEdit
from testbus import drop_topics
from testdb import scratch_pg_database

pytestmark = pytest.mark.cloud

REPO = Path(__file__).resolve().parents[2]
MODEL = "sface-2021dec"
DIM = 128
USER = "ann"
BASES = 12  # true persons
SEED_FACES = 5  # faces of each true person filed before the clients start
NEW_FACES = 240  # faces that arrive while the clients edit
ARRIVAL_S = 0.06  # between two arriving photos
THREADS = 4  # clients; each owns BASES // THREADS of the seeded persons
OPS = 70  # edits (and a few reads) per client
WORKER_TIMEOUT_S = 120
NO_ANSWER = 599  # recorded for a request the server answered with a dropped connection


# ------------------------------------------------------------------------------ the deployment


class WorkerProcess:
    """``python -m services.cluster_worker`` with its log in a file."""

    def __init__(self, env: dict, log_path: Path):
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.cluster_worker"], cwd=REPO, env=env,
                                         stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the cluster worker did not exit 60 s after SIGTERM\n{self.log()[-4000:]}")


@dataclass
class Deployment:
    db_url: str
    bus_url: str
    bus: busmod.Bus
    engine: sa.Engine
    tmp: Path
    worker: WorkerProcess | None = None

    def start_worker(self, recluster_max_faces: int) -> WorkerProcess:
        env = {**os.environ, "FACECLUSTER_DATABASE_URL": self.db_url, "FACECLUSTER_BUS_URL": self.bus_url,
               "FACECLUSTER_BATCH_SIZE": "16", "FACECLUSTER_RECLUSTER_MAX_FACES": str(recluster_max_faces)}
        self.worker = WorkerProcess(env, self.tmp / "cluster-worker.log")
        return self.worker

    def pending(self) -> int | None:
        try:
            return self.bus.pending(busmod.INDEXED, "cluster")
        except busmod.BusUnavailable:
            return None

    def wait_consumed(self, timeout: float = WORKER_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while self.pending() != 0:
            if not self.worker.alive():
                pytest.fail(f"the cluster worker exited ({self.worker.proc.returncode})\n{self.worker.log()[-6000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"faces.indexed not consumed after {timeout} s (pending {self.pending()})\n"
                            f"{self.worker.log()[-4000:]}")
            time.sleep(0.3)


@pytest.fixture
def deployment(pg_url, kafka_bootstrap, tmp_path):
    """A migrated scratch database and a Kafka topic namespace, both the test's own."""
    with scratch_pg_database(pg_url) as db_url:
        engine = make_engine(db_url)
        migrate(engine)
        bus_url = f"kafka://{kafka_bootstrap}/t{uuid.uuid4().hex[:10]}"
        bus = busmod.connect(bus_url)
        bus.ensure_topics()
        dep = Deployment(db_url, bus_url, bus, engine, tmp_path)
        try:
            yield dep
        finally:
            if dep.worker is not None and dep.worker.alive():
                dep.worker.proc.kill()
                dep.worker.proc.wait()
            try:
                drop_topics(bus)
            finally:
                bus.close()
            engine.dispose()


RECORD = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ ([\w.]+)\[\d+\]: ")


def tracebacks_by_origin(text: str) -> tuple[int, int]:
    """Tracebacks in a process's log: (ours or uncaught, logged by kafka-python itself). The
    Kafka client logs and recovers from its own socket bookkeeping races (a bootstrap socket
    unregistered twice: "socket ... is not registered", "Invalid file descriptor: -1", as
    reported in kafka-python-ng#180); those are counted in the report, not failed on."""
    ours = theirs = 0
    record = None
    for line in text.splitlines():
        if (m := RECORD.match(line)) is not None:
            record = m.group(1)
        elif line.startswith("Traceback (most recent call last)"):
            if record is not None and record.startswith("kafka."):
                theirs += 1
            else:
                ours += 1
        elif line and not line[0].isspace() and not re.match(r"\w+(\.\w+)*(Error|Exception)\b", line):
            record = None  # a line of no record (e.g. "Exception in thread ..."): not the library's log
    return ours, theirs


# ------------------------------------------------------------------------------ faces arriving


class Library:
    """Stores one-face photos of the true persons and announces them, as the ingest worker does."""

    def __init__(self, dep: Deployment, user_id: int):
        self.dep, self.user_id = dep, user_id
        self.sessions = session_factory(dep.engine)
        self.rng = np.random.default_rng(7)
        bases = self.rng.standard_normal((BASES, DIM))
        self.bases = bases / np.linalg.norm(bases, axis=1, keepdims=True)
        self.face_ids: list[int] = []  # every face stored, in order (appends are atomic)
        self.truth: dict[int, int] = {}  # face id -> true person

    def add(self, bases: list[int]) -> list[int]:
        """One photo per true person in ``bases``, stored in one transaction and announced."""
        events, made = [], []
        with self.sessions() as s:
            for b in bases:
                v = self.bases[b] + 0.03 * self.rng.standard_normal(DIM)
                face = FaceRecord(index=0, box=np.array([10, 10, 90, 110], np.float32),
                                  landmarks=np.zeros((5, 2), np.float32), det_score=0.99, blur=0.5, blurry=False,
                                  trash_score=0.0, is_trash=False,
                                  embedding=(v / np.linalg.norm(v)).astype(np.float32), model_version=MODEL)
                key = f"{USER}/{uuid.uuid4().hex}.jpg"
                sha = hashlib.sha256(key.encode()).hexdigest()
                saved = repo.save_photo_result(s, self.user_id, key, PhotoResult(key=key, sha256=sha, width=200,
                                                                                  height=200, faces=[face]))
                events.append((USER, {"user": USER, "photo_id": saved.id, "sha256": sha,
                                      "face_ids": saved.face_ids}))
                made.append((saved.face_ids[0], b))
            s.commit()
        for f, b in made:
            self.truth[f] = b
            self.face_ids.append(f)
        self.dep.bus.publish(busmod.INDEXED, events)
        return [f for f, _ in made]


# ------------------------------------------------------------------------------ the clients


@dataclass
class Answer:
    thread: int
    op: str
    status: int
    detail: str
    args: dict


@dataclass
class Client:
    """One user session doing edits through the API; ``own`` are the persons it alone renames
    and merges (into each other)."""

    index: int
    http: httpx.Client
    own: list[int]
    seeded: list[int]  # every seeded person, its own included
    library: Library
    rng: random.Random
    answers: list[Answer] = field(default_factory=list)
    renames: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))  # 2xx, in order
    merged_away: set[int] = field(default_factory=set)  # own persons this client merged (2xx) at some point
    alive: set[int] = field(default_factory=set)  # own persons it believes exist (an undo may bring one back)
    seen: set[int] = field(default_factory=set)  # persons the worker made that a listing showed
    seq: int = 0

    def __post_init__(self):
        self.alive = set(self.own)

    def pick_own(self, n: int) -> list[int]:
        pool = sorted(self.alive) if len(self.alive) >= n else self.own
        return self.rng.sample(pool, n)

    def pick_any(self) -> int:
        return self.rng.choice(self.seeded + sorted(self.seen))

    def call(self, op: str, method: str, path: str, args: dict, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:  # the server dropped the connection: as bad as a 5xx
            response = httpx.Response(NO_ANSWER, text=f"{type(e).__name__}: {e}")
        detail = "" if response.is_success else response.text[:300]
        self.answers.append(Answer(self.index, op, response.status_code, detail, args))
        return response

    def rename(self) -> None:
        (person,) = self.pick_own(1)
        self.seq += 1
        name = f"p{person}-t{self.index}-{self.seq}"
        r = self.call("rename", "PATCH", f"/api/v1/people/{person}", {"person": person, "name": name},
                      json={"name": name})
        if r.is_success:
            self.renames[person].append(name)
            self.alive.add(person)
        elif r.status_code == 404:
            self.alive.discard(person)

    def merge(self) -> None:
        if len(self.alive) < 2:  # its persons are merged into one: look whether an undo brought one back
            self.read()
            return
        target, other = self.pick_own(2)
        r = self.call("merge", "POST", f"/api/v1/people/{target}/merge", {"target": target, "other": other},
                      json={"person_ids": [other]})
        if r.is_success:
            self.merged_away.add(other)
            self.alive.discard(other)
        elif r.status_code == 404:
            self.alive -= {target, other}

    def move(self) -> None:
        faces = self.rng.sample(self.library.face_ids[:len(self.library.face_ids)], self.rng.randint(1, 3))
        person = self.pick_any()
        self.call("move", "POST", f"/api/v1/people/{person}/faces", {"person": person, "faces": faces},
                  json={"face_ids": faces})

    def reject(self) -> None:
        person = self.pick_any()
        r = self.call("list faces", "GET", f"/api/v1/people/{person}/faces", {"person": person},
                      params={"limit": 100})
        if r.is_success and r.json()["items"]:
            face = self.rng.choice(r.json()["items"])["id"]
            self.call("reject", "DELETE", f"/api/v1/people/{person}/faces/{face}", {"person": person, "face": face})

    def undo(self) -> None:
        self.call("undo", "POST", "/api/v1/edits/undo", {})

    def read(self) -> None:
        """The people page: which own persons exist (an undo may have brought one back) and
        which persons the worker made."""
        r = self.call("list people", "GET", "/api/v1/people", {},
                      params={"limit": 500, "hidden": "all", "min_faces": 0})
        if r.is_success:
            ids = {p["id"] for p in r.json()["items"]}
            self.alive = ids & set(self.own)
            self.seen = ids - set(self.seeded)

    def run(self, start: threading.Event, errors: list) -> None:
        ops = [(self.rename, 30), (self.merge, 10), (self.move, 22), (self.reject, 22), (self.undo, 10),
               (self.read, 8)]
        try:
            start.wait()
            for _ in range(OPS):
                op = self.rng.choices([f for f, _ in ops], weights=[w for _, w in ops])[0]
                op()
                time.sleep(self.rng.uniform(0, 0.03))
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)


# ------------------------------------------------------------------------------ the edit log


LABEL = re.compile(r"'p(\d+)-[^']*'|person (\d+)")


def label_person(label: str) -> int:
    """The person id an edit summary names: every name this test writes starts with p<id>-."""
    m = LABEL.search(label)
    assert m, label
    return int(m.group(1) or m.group(2))


@dataclass
class Edit:
    id: int
    kind: str
    summary: str
    undo: dict
    undone: bool

    @property
    def faces(self) -> list[int]:
        return [f for f, _, _ in self.undo["links"]]

    def link_before(self, face: int) -> tuple[int | None, str | None]:
        """(person, source) of the face's link before this edit."""
        return next((p, source) for f, p, source in self.undo["links"] if f == face)

    @property
    def target(self) -> int:
        """The person a move, merge or rejection is about."""
        if self.kind == "move":
            return label_person(self.summary.split(" faces to ", 1)[1])
        if self.kind == "merge":
            return label_person(self.summary.split(" into ", 1)[1])
        if self.kind == "reject":
            return label_person(self.summary.split(" is not ", 1)[1])
        raise ValueError(self.kind)


# ------------------------------------------------------------------------------ the test


# The worker's two ways of filing: re-clustering the whole (small) user each batch, or new faces
# only (kNN against the persons' faces, new persons from the unassigned pool).
POLICIES = {"re-clustering": 100_000, "incremental": 0}


@pytest.mark.parametrize("policy", POLICIES)
def test_concurrent_edits_and_arriving_faces_leave_a_consistent_library(deployment, tmp_path, policy):
    dep = deployment
    started = time.monotonic()
    sessions = session_factory(dep.engine)
    with sessions() as s:
        user_id = repo.get_or_create_user(s, USER).id
        _, token = tokens.create(s, USER)
        s.commit()
    library = Library(dep, user_id)
    worker = dep.start_worker(POLICIES[policy])

    # Seed: SEED_FACES photos of each true person, filed by the worker into one person each.
    for _ in range(SEED_FACES):
        library.add(list(range(BASES)))
    dep.wait_consumed()
    with sessions() as s:
        links = dict(s.execute(sa.select(FacePerson.face_id, FacePerson.person_id)).all())
    person_of_base = {}
    for b in range(BASES):
        persons = {links.get(f) for f, t in library.truth.items() if t == b}
        assert len(persons) == 1 and None not in persons, f"true person {b} was filed as {persons}"
        person_of_base[b] = persons.pop()
    assert len(set(person_of_base.values())) == BASES
    seeded = sorted(person_of_base.values())
    seed_names = {p: f"p{p}-seed" for p in seeded}
    with sessions() as s:  # named outside the edit log, so no undo ever clears them
        for p, name in seed_names.items():
            s.execute(sa.update(Person).where(Person.id == p).values(name=name))
        s.commit()

    proc, api = start_api(dep.db_url, tmp_path)
    per_thread = BASES // THREADS
    clients = [Client(i, api.client(token), seeded[i * per_thread:(i + 1) * per_thread], seeded, library,
                      random.Random(1000 + i)) for i in range(THREADS)]
    start, errors = threading.Event(), []
    threads = [threading.Thread(target=c.run, args=(start, errors), name=f"client-{c.index}") for c in clients]

    def arrive() -> None:
        rng = random.Random(5)
        try:
            start.wait()
            for _ in range(NEW_FACES):
                library.add([rng.randrange(BASES)])
                time.sleep(ARRIVAL_S)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads.append(threading.Thread(target=arrive, name="arrivals"))
    edits_started = time.monotonic()
    try:
        for t in threads:
            t.start()
        start.set()
        for t in threads:
            t.join(timeout=300)
            assert not t.is_alive(), f"{t.name} still running after 300 s"
        edits_s = time.monotonic() - edits_started
        assert not errors, errors
        dep.wait_consumed()
        assert worker.alive(), worker.log()[-6000:]
    finally:
        for c in clients:
            c.http.close()
        stop_api(proc)
    api_log = api.log.read_text(errors="replace")
    assert worker.stop() == 0, worker.log()[-6000:]
    worker_log = worker.log()

    # ---------------------------------------------------------------- what the database says
    with sessions() as s:
        stored = set(s.scalars(sa.select(Face.id).where(Face.user_id == user_id)))
        links = dict(s.execute(sa.select(FacePerson.face_id, FacePerson.person_id)).all())
        doubled = s.execute(sa.select(FacePerson.face_id).group_by(FacePerson.face_id)
                            .having(sa.func.count() > 1)).scalars().all()
        persons = {p.id: p for p in s.scalars(sa.select(Person).where(Person.user_id == user_id))}
        counted = Counter(links.values())
        rejections = set(s.execute(sa.select(FaceRejection.face_id, FaceRejection.person_id)).all())
        edits = [Edit(e.id, e.kind, e.summary, e.undo, e.undone_at is not None)
                 for e in s.scalars(sa.select(PersonEdit).where(PersonEdit.user_id == user_id)
                                    .order_by(PersonEdit.id))]

    answers = [a for c in clients for a in c.answers]
    statuses = Counter((a.op, a.status) for a in answers)
    problems: list[str] = []

    # Worker and API health.
    library_errors = 0
    for name, text in (("cluster worker", worker_log), ("API", api_log)):
        ours, theirs = tracebacks_by_origin(text)
        library_errors += theirs
        if ours:
            errors_logged = Counter(line for line in text.splitlines()
                                    if re.match(r"\w+(\.\w+)*(Error|Exception)\b", line))
            problems.append(f"the {name} logged {ours} tracebacks: {dict(errors_logged)}")
    retried = worker_log.count("retrying in")

    # Status codes: never a 5xx; 404/409 only where a race explains them.
    ever_merged = set().union(*(c.merged_away for c in clients))

    def explained(c: Client, a: Answer) -> bool:
        if a.status == 409:
            return a.op == "undo"  # nothing left to undo: the other clients undid it all
        if a.status != 404:
            return False
        if a.op in ("rename", "merge"):  # its own person, gone only by a merge of its own
            return bool({a.args.get("person"), a.args.get("target"), a.args.get("other")} & c.merged_away)
        if a.op in ("move", "list faces"):  # merged away, or an automatic person re-clustered away
            return a.args["person"] in ever_merged or a.args["person"] not in seeded
        return a.op == "reject"  # the face left the person since the client listed it

    unexplained = [a for c in clients for a in c.answers if a.status >= 400 and not explained(c, a)]
    if unexplained:
        problems.append(f"{len(unexplained)} answers no race explains, e.g. "
                        + "; ".join(f"{a.op} {a.args} -> {a.status} {a.detail}" for a in unexplained[:8]))

    # No face lost, none in two persons, counts right.
    all_faces = set(library.face_ids)
    if all_faces - stored:
        problems.append(f"faces lost: {sorted(all_faces - stored)[:20]}")
    if doubled:
        problems.append(f"faces in two persons: {doubled[:20]}")
    drift = {p: (person.face_count, counted.get(p, 0)) for p, person in persons.items()
             if person.face_count != counted.get(p, 0)}
    if drift:
        problems.append(f"face_count (stored, real) wrong for {len(drift)} persons: {dict(list(drift.items())[:10])}")
    linked_to_gone = {f: p for f, p in links.items() if p not in persons}
    if linked_to_gone:
        problems.append(f"faces linked to persons not the user's: {linked_to_gone}")

    # Rejections are obeyed.
    broken = sorted((f, p) for f, p in rejections if links.get(f) == p)
    if broken:
        problems.append(f"faces in a person they were rejected from (face, person): {broken[:20]}; their edits "
                        + "; ".join(f"{f, p}: {[(e.id, e.summary, e.undone) for e in edits if f in e.faces]}"
                                    for f, p in broken[:3]))

    # Every face is where the edits in force (or the worker) put it.
    touching: dict[int, list[Edit]] = defaultdict(list)
    for e in edits:
        for f in e.faces:
            touching[f].append(e)
    misplaced = []
    for f in sorted(all_faces & stored):
        in_force = [e for e in touching[f] if not e.undone]
        now = links.get(f)
        if in_force:
            last = in_force[-1]
            history = [(e.id, e.kind, e.target, "undone" if e.undone else "in force") for e in touching[f]]
            if last.kind in ("move", "merge") and now != last.target:
                misplaced.append(f"face {f} is in {now}, edit {last.id} ({last.summary}) put it in {last.target}; "
                                 f"its edits {history}")
            elif last.kind == "reject" and now == last.target:
                misplaced.append(f"face {f} is back in {now} after edit {last.id} ({last.summary}); "
                                 f"its edits {history}")
            elif last.kind not in ("move", "merge", "reject"):
                misplaced.append(f"face {f}: unexpected edit {last.kind}")
        elif touching[f]:
            before, source = touching[f][0].link_before(f)
            # Undoing the first edit put the face back where it was. An automatic link (or none)
            # is the worker's to change since; a link the user made stays.
            if source == "user" and now != before:
                misplaced.append(f"face {f} is in {now}; every edit touching it was undone, "
                                 f"the user had put it in {before} before them")
        elif now is None:
            misplaced.append(f"face {f} (true person {library.truth[f]}) was never touched by an edit "
                             f"but the worker filed it nowhere")
    if misplaced:
        problems.append(f"{len(misplaced)} faces misplaced: " + "; ".join(misplaced[:12]))

    # Renames and merges of each client's own persons.
    renames_in_log = Counter()
    open_rename = {}
    for e in edits:
        if e.kind == "update":
            m = re.search(r"renamed to '([^']*)'", e.summary)
            if m:
                renames_in_log[m.group(1)] += 1
                open_rename[m.group(1)] = not e.undone
    merged_by_open_edit = set()
    for e in edits:
        if e.kind == "merge" and not e.undone:
            merged_by_open_edit |= set(e.undo["person_ids"]) - {e.target}
    names = []
    for c in clients:
        for p in c.own:
            written = c.renames.get(p, [])
            missing = [n for n in written if renames_in_log[n] != 1]
            if missing:
                names.append(f"renames of {p} answered 2xx but logged {[renames_in_log[n] for n in missing]} "
                             f"times: {missing}")
            if p not in persons:
                if p not in merged_by_open_edit:
                    names.append(f"person {p} is gone, but no merge in force took it")
                continue
            if p in merged_by_open_edit:
                names.append(f"person {p} exists although a merge in force took it")
            expected = next((n for n in reversed(written) if open_rename.get(n)), seed_names[p])
            if persons[p].name != expected:
                history = [(e.id, e.summary, "undone" if e.undone else "in force") for e in edits
                           if p in e.undo["person_ids"]][-8:]
                names.append(f"person {p} is named {persons[p].name!r}, its last rename in force was "
                             f"{expected!r} (client {c.index} wrote {written[-3:]}); its last edits {history}")
    if names:
        problems.append("names: " + "; ".join(names[:12]))

    total_s = time.monotonic() - started
    edit_answers = sum(n for (op, _), n in statuses.items() if op not in ("list faces", "list people"))
    report = (f"{len(all_faces)} faces ({NEW_FACES} while editing), {edit_answers} edit calls by {THREADS} "
              f"clients in {edits_s:.1f}s ({total_s:.1f}s in all); {len(edits)} edits logged, "
              f"{sum(e.undone for e in edits)} undone; statuses {dict(sorted(statuses.items()))}; "
              f"worker retries {retried}; persons at the end {len(persons)}; "
              f"errors kafka-python logged and recovered from {library_errors}")
    print(report)
    assert not problems, report + "\n" + "\n".join(problems)
