"""The person-album API under load on PostgreSQL: one user with 1,000,000 faces in 20,000 persons.

Makes a scratch database on the PostgreSQL server of ``--db`` (created and dropped here, never a
table of that database itself), fills it with synthetic rows by COPY (skewed like a real library:
a few persons with thousands of faces, most with a handful; four other users' rows interleaved
with the main user's, so every query has to scope), writes a few hundred JPEG files the photos
share for thumbnails, serves it with ``python -m services.api`` and loads it from 127.0.0.1 only.

First, with ``--solo N``, each operation N times in a row from one client: latency without
queueing and the CPU one request costs the API process and PostgreSQL. Then ``--clients``
concurrent clients (asyncio; one keep-alive connection each) for at most ``--duration`` seconds
or ``--requests`` requests per phase, after ``--warmup`` seconds that are not recorded. Each
client repeats: pick an operation by weight, time it, wait a think time (``--think MIN:MAX``
seconds, uniform, like locust's ``between``; ``0`` = back to back, which measures the ceiling).
The operations:

- ``people_first``: ``GET /people`` (50, most faces first);
- ``people_deep``: ``GET /people?cursor=...`` of pages 191-210 (``--deep-page``; the cursors were
  followed from page 1 in setup);
- ``person_faces``: ``GET /people/{id}/faces`` (first 100) of one of the 1,000 largest persons;
- ``thumbnail_cached``: ``GET /faces/{id}/thumbnail`` of a face fetched once in setup (a hit of
  the API's disk cache; the setup's first fetches are reported apart);
- ``rename``: ``PATCH /people/{id}`` with a new name;
- ``merge``: ``POST /people/{a}/merge`` of two small persons (1-5 faces) no merge used before.

    python benchmarks/api_load.py --db "$FACECLUSTER_PG_URL" [--faces 1000000] [--persons 20000]
        [--solo 100] [--clients 50] [--duration 60] [--think 0.5:1.5] [--think 0] [--workers 1]
        [--explain] [--json out/bench/api_load.json] [--keep | --reuse URL]

Every ``--think`` is one phase, run in order on the same data and server. ``--explain`` prints
EXPLAIN (ANALYZE, BUFFERS) of the reads and of every statement one rename and one merge run.
Per phase it reports p50/p95/p99 per operation, throughput, errors, the cores the API,
PostgreSQL and the load generator used, the machine's busy share and load average, and how many
database connections the API opened.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path
from urllib.parse import urlencode

import httpx
import numpy as np
import sqlalchemy as sa
from PIL import Image, ImageDraw
from sqlalchemy.pool import NullPool

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services import tokens  # noqa: E402
from services.persons import repository as persons_repo  # noqa: E402
from services.persons import service as person_service  # noqa: E402
from services.store.db import make_engine, migrate, session_factory  # noqa: E402

OPS = {"people_first": 0.25, "people_deep": 0.10, "person_faces": 0.20, "thumbnail_cached": 0.30,
       "rename": 0.08, "merge": 0.07}
READS = ("people_first", "people_deep", "person_faces", "thumbnail_cached")
TARGET_MS = {**dict.fromkeys(READS, 50), "rename": 100, "merge": 100}
IMAGE = (640, 480)
DIM = 16  # small random embeddings: no endpoint timed here reads them
MODEL = "sface-2021dec"


# ------------------------------------------------------------------------------ the data


@contextmanager
def scratch_database(server_url: str, keep: bool):
    name = f"facecluster_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        if keep:
            print(f"kept database {name}", flush=True)
        else:
            with admin.connect() as c:
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` JPEG files the photos share (uri = one of them), each with a face-like oval."""
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        img = Image.new("RGB", IMAGE, tuple(int(v) for v in rng.integers(40, 200, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = int(rng.integers(0, IMAGE[0] - 200)), int(rng.integers(0, IMAGE[1] - 200))
            draw.ellipse((x, y, x + 160, y + 200), fill=tuple(int(v) for v in rng.integers(120, 255, 3)))
        name = f"img/{i:04d}.jpg"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(folder / name, "JPEG", quality=85)
        names.append(name)
    return names


def person_sizes(persons: int, linked: int, skew: float = 1.2, offset: int = 20) -> np.ndarray:
    """Zipf-like face counts: with 20,000 persons and 940,000 linked faces, the largest has
    about 12,600 faces, 146 have 1,000 or more, the median 7 and 8,300 have 5 or fewer."""
    w = 1.0 / (np.arange(persons) + offset) ** skew
    return np.maximum(1, np.floor(w / w.sum() * linked)).astype(np.int64)


def _copy(raw, table: str, columns: str, lines) -> None:
    buf = io.StringIO()
    buf.writelines(lines)
    buf.seek(0)
    with raw.cursor() as cur:
        cur.copy_expert(f"COPY {table} ({columns}) FROM STDIN", buf)


def seed(url: str, root: Path, *, faces: int, persons: int, other_users: int, other_faces: int,
         images: int, seed_: int = 0) -> dict:
    """Users, photos, faces, persons and links by COPY; returns the main user's id and name."""
    rng = np.random.default_rng(seed_)
    uris = write_images(root, images, seed_)
    users = [("bench", faces, persons)] + [(f"other{i}", other_faces, max(1, persons * other_faces // faces))
                                           for i in range(other_users)]
    engine = make_engine(url)
    raw = engine.raw_connection()
    t0 = time.perf_counter()
    try:
        _copy(raw, "users", "id, name, library_root",
              [f"{i + 1}\t{name}\t{root.resolve()}\n" for i, (name, _, _) in enumerate(users)])

        # Photos of 1-3 faces each; users' photos (and so faces and persons) interleave in id order.
        face_user = np.concatenate([np.full(n, u + 1) for u, (_, n, _) in enumerate(users)])
        rng.shuffle(face_user)
        per_photo = rng.choice([1, 2, 3], size=len(face_user), p=[0.5, 0.35, 0.15])
        photo_user, face_photo, face_index = [], np.empty(len(face_user), np.int64), np.empty(len(face_user), np.int64)
        pending: dict[int, list[int]] = {}  # user -> faces of their open photo
        want: dict[int, int] = {}
        for f, u in enumerate(face_user.tolist()):
            if u not in pending:
                photo_user.append(u)
                pending[u], want[u] = [len(photo_user)], int(per_photo[f])
            face_photo[f], face_index[f] = pending[u][0], len(pending[u]) - 1
            pending[u].append(f)
            if len(pending[u]) - 1 >= want[u]:
                del pending[u]
        n_photos = len(photo_user)
        photo_uri = rng.integers(0, len(uris), n_photos)
        _copy(raw, "photos", "id, user_id, uri, sha256, status, width, height, indexed_at",
              (f"{p + 1}\t{u}\t{uris[photo_uri[p]]}\t{p + 1:064x}\tindexed\t{IMAGE[0]}\t{IMAGE[1]}\t2026-12-01 00:00:00+00\n"
               for p, u in enumerate(photo_user)))
        t_photos = time.perf_counter()

        # Faces: a box inside the image, scores, a small random unit vector.
        n = len(face_user)
        x1 = rng.uniform(0, IMAGE[0] - 200, n).round(1)
        y1 = rng.uniform(0, IMAGE[1] - 220, n).round(1)
        side = rng.uniform(60, 180, n).round(1)
        det = rng.uniform(0.7, 1.0, n).round(4)
        blur = rng.uniform(0.1, 1.0, n).round(4)
        trash = rng.uniform(0, 1, n).round(4)
        chunk = 200_000
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            vec = rng.standard_normal((stop - start, DIM)).astype("<f4")
            vec /= np.linalg.norm(vec, axis=1, keepdims=True)
            hexes = [v.tobytes().hex() for v in vec]
            _copy(raw, "faces", "id, photo_id, user_id, face_index, x1, y1, x2, y2, landmarks, det_score, blur, "
                                "blurry, trash_score, trash, embedding, embedding_dim, model_version, attributes",
                  (f"{f + 1}\t{face_photo[f]}\t{face_user[f]}\t{face_index[f]}\t{x1[f]}\t{y1[f]}\t"
                   f"{x1[f] + side[f]:.1f}\t{y1[f] + side[f]:.1f}\t[]\t{det[f]}\t{blur[f]}\t"
                   f"{'t' if blur[f] < 0.2 else 'f'}\t{trash[f]}\t{'t' if trash[f] > 0.98 else 'f'}\t"
                   f"\\\\x{hexes[f - start]}\t{DIM}\t{MODEL}\t{{}}\n" for f in range(start, stop)))
            print(f"  faces {stop:,}/{n:,} ({time.perf_counter() - t0:.0f} s)", flush=True)
        t_faces = time.perf_counter()

        # Persons with skewed sizes; about 6% of each user's faces are in no person.
        person_user, person_size, link_face, link_person = [], [], [], []
        for u, (_, n_faces, n_persons) in enumerate(users, start=1):
            sizes = person_sizes(n_persons, int(n_faces * 0.94))
            person_user += [u] * n_persons
            person_size.append(sizes)
        person_size = np.concatenate(person_size)
        order = rng.permutation(len(person_user))  # interleave the users' person ids
        person_user = np.array(person_user)[order]
        person_size = person_size[order]
        person_id = np.arange(1, len(person_user) + 1)
        for u in range(1, len(users) + 1):
            mine = np.flatnonzero(face_user == u) + 1
            rng.shuffle(mine)
            ids = person_id[person_user == u]
            sizes = person_size[person_user == u]
            link_face.append(mine[: sizes.sum()])
            link_person.append(np.repeat(ids, sizes))
        link_face = np.concatenate(link_face)
        link_person = np.concatenate(link_person)
        cover = np.zeros(len(person_id) + 1, np.int64)
        cover[link_person[::-1]] = link_face[::-1]  # the first face listed for each person
        named = rng.uniform(0, 1, len(person_id)) < 0.3
        hidden = rng.uniform(0, 1, len(person_id)) < 0.02
        favorite = rng.uniform(0, 1, len(person_id)) < 0.01
        _copy(raw, "persons", "id, user_id, name, hidden, cover_face_id, user_confirmed, favorite, face_count",
              (f"{p}\t{person_user[i]}\t{f'Person {p}' if named[i] else chr(92) + 'N'}\t{'t' if hidden[i] else 'f'}\t"
               f"{cover[p]}\t{'t' if named[i] else 'f'}\t{'t' if favorite[i] else 'f'}\t{person_size[i]}\n"
               for i, p in enumerate(person_id.tolist())))
        order = np.argsort(link_face)
        _copy(raw, "face_person", "face_id, person_id, source",
              (f"{f}\t{p}\tauto\n" for f, p in zip(link_face[order].tolist(), link_person[order].tolist())))
        with raw.cursor() as cur:
            for table in ("users", "photos", "faces", "persons"):
                cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        raw.commit()
        t_links = time.perf_counter()
    finally:
        raw.close()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.exec_driver_sql("VACUUM (ANALYZE)")
        size = c.exec_driver_sql("SELECT pg_size_pretty(pg_database_size(current_database()))").scalar()
    engine.dispose()
    t_end = time.perf_counter()
    main_sizes = person_size[person_user == 1]
    return {"user_id": 1, "users": len(users), "photos": n_photos, "faces": n, "persons": len(person_id),
            "links": len(link_face), "main_faces": faces, "main_persons": persons,
            "main_largest_persons": sorted(main_sizes.tolist())[-3:][::-1],
            "main_median_person": float(np.median(main_sizes)), "main_persons_le5": int((main_sizes <= 5).sum()),
            "database_size": size, "images": images,
            "seconds": {"photos": round(t_photos - t0, 1), "faces": round(t_faces - t_photos, 1),
                        "persons_links": round(t_links - t_faces, 1), "vacuum_analyze": round(t_end - t_links, 1)}}


def reuse(url: str, root: Path, images: int) -> dict:
    """A kept database: its photos' files written again (their old folder is gone) and its counts."""
    write_images(root, images)
    engine = make_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("UPDATE users SET library_root = :r"), {"r": str(root.resolve())})
        counts = {t: c.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar()
                  for t in ("users", "photos", "faces", "persons", "face_person", "person_edits")}
        main = c.exec_driver_sql("SELECT count(*), max(face_count) FROM persons WHERE user_id = 1").one()
    engine.dispose()
    return {"user_id": 1, "reused": True, **counts, "main_persons": main[0], "main_largest_person": main[1]}


# ------------------------------------------------------------------------------ EXPLAIN


def explain_calls(url: str, user_id: int, pools: dict) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of the reads, and of each statement one rename and one merge
    issue (each explained inside a savepoint that is rolled back, then run for real; the whole
    transaction is rolled back at the end)."""
    engine = make_engine(url)
    sessions = session_factory(engine)
    print("\n=== EXPLAIN ANALYZE ===", flush=True)

    def show(session, sql, params):
        raw = session.connection().connection.dbapi_connection
        with raw.cursor() as cur:
            cur.execute("SAVEPOINT explain_")
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
            plan = [r[0] for r in cur.fetchall()]
            cur.execute("ROLLBACK TO SAVEPOINT explain_")
        print("\n--- " + " ".join(sql.split())[:400] + "\n" + "\n".join(plan), flush=True)

    def traced(label, fn):
        print(f"\n##### {label}", flush=True)
        with sessions() as session:
            conn = session.connection()

            def hook(_conn, _cursor, statement, parameters, _context, executemany):
                if statement.lstrip().upper().startswith(("SAVEPOINT", "ROLLBACK", "RELEASE")):
                    return
                show(session, statement, parameters[0] if executemany else parameters)

            sa.event.listen(conn, "before_cursor_execute", hook)
            try:
                fn(session)
            finally:
                sa.event.remove(conn, "before_cursor_execute", hook)
                session.rollback()

    deep = pools["deep_keys"][len(pools["deep_keys"]) // 2]
    traced("people, first page", lambda s: persons_repo.people_page(
        s, user_id, hidden=False, favorite=False, min_faces=1, q=None, order="faces", after=None, limit=51))
    traced(f"people, page ~200 (after {deep})", lambda s: persons_repo.people_page(
        s, user_id, hidden=False, favorite=False, min_faces=1, q=None, order="faces", after=deep, limit=51))
    big = pools["faces"][0]
    traced(f"faces of person {big}", lambda s: persons_repo.person_faces_page(s, user_id, big, 0, 101))
    traced("token lookup", lambda s: tokens.authenticate(s, pools["token"]))
    traced("rename", lambda s: person_service.update_person(s, user_id, pools["rename"][0], name="explained"))
    a, b = pools["merge_spare"]
    traced(f"merge {b} into {a}", lambda s: person_service.merge(s, user_id, a, [b]))
    engine.dispose()


# ------------------------------------------------------------------------------ the load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_api(url: str, tmp: Path, workers: int) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = tmp / "api.log"
    cmd = [sys.executable, "-m", "services.api", "--db", url, "--host", "127.0.0.1", "--port", str(port)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "FACECLUSTER_THUMBNAIL_CACHE": str(tmp / "thumbnails"),
                                 "FACECLUSTER_OBJECT_STORE": str(tmp / "objects")})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the API exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return proc, base, log
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"the API was not ready in 120 s:\n{log.read_text()[-4000:]}")


def _proc_cpu(entry: Path) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of one /proc entry."""
    try:
        fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class StackCpu:
    """CPU seconds of the API (with its workers), of the PostgreSQL backends serving the scratch
    database (their process titles name it) and of this load generator. Backends come and go
    (a pool's overflow connections are closed when returned), so they are sampled every 0.2 s
    in a thread, and each backend counts with the last CPU time seen of it."""

    def __init__(self, api_pid: int, database: str):
        self.api_pid, self.database = api_pid, database.encode()
        self.backends: dict[int, tuple[float, float]] = {}  # pid -> (first seen, last seen)
        self.kinds: dict[int, str | None] = {}  # pid -> "api", "postgres" or None (not ours)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _scan(self) -> float:
        api = 0.0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            kind = self.kinds.get(pid, "new")
            if kind is None:
                continue
            if not (found := _proc_cpu(entry)):
                continue
            if kind == "new":
                try:
                    title = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                kind = self.kinds[pid] = ("api" if pid == self.api_pid or found[0] == self.api_pid else
                                          "postgres" if title.startswith(b"postgres:") and self.database in title
                                          else None)
            if kind == "api":
                api += found[1]
            elif kind == "postgres":
                first = self.backends.get(pid, (found[1], 0.0))[0]
                self.backends[pid] = (first, found[1])
        return api

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._scan()

    def read(self) -> dict[str, float]:
        """Totals so far; a backend first seen during a phase counts from 0 (its connect)."""
        api = self._scan()
        return {"api": api, "postgres": sum(last for _, last in self.backends.values()),
                "client": time.process_time()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def db_sessions(url: str) -> int:
    """Connections ever opened to the database (PostgreSQL's own count, pg_stat_database)."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as c:
            c.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
            return c.execute(sa.text("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")).scalar()
    finally:
        engine.dispose()


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def prepare(base: str, token: str, other_token: str, url: str, user_id: int, deep_page: int) -> dict:
    """Pools of ids for each operation, cursors of the pages around ``deep_page``, and one fetch of every
    thumbnail the run will fetch again (timed: the uncached figure)."""
    engine = make_engine(url)
    with engine.connect() as c:
        top = c.execute(sa.text("SELECT id FROM persons WHERE user_id = :u AND NOT hidden "
                                "ORDER BY face_count DESC, id LIMIT 1000"), {"u": user_id}).scalars().all()
        small = c.execute(sa.text("SELECT id FROM persons WHERE user_id = :u AND face_count BETWEEN 1 AND 5 "
                                  "AND name IS NULL ORDER BY id"), {"u": user_id}).scalars().all()
        middle = c.execute(sa.text("SELECT id FROM persons WHERE user_id = :u AND face_count > 5 ORDER BY id"),
                           {"u": user_id}).scalars().all()
        thumbs = c.execute(sa.text("SELECT f.id FROM faces f WHERE f.user_id = :u ORDER BY f.id LIMIT 400"),
                           {"u": user_id}).scalars().all()
        foreign = c.execute(sa.text("SELECT id FROM persons WHERE user_id <> :u LIMIT 1"), {"u": user_id}).scalar()
    engine.dispose()
    small = sorted(set(small) - set(top))  # never merge away a person another operation reads
    rng = random.Random(1)
    rng.shuffle(small)
    headers = {"Authorization": f"Bearer {token}"}
    pools = {"faces": top, "rename": middle, "merge": small[:-2], "merge_spare": small[-2:], "thumbs": thumbs,
             "token": token}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        # Scoping: another user's person is a 404 for this token, this user's is one for theirs.
        assert client.get(f"/api/v1/people/{foreign}").status_code == 404
        assert client.get(f"/api/v1/people/{top[0]}", headers={"Authorization": f"Bearer {other_token}"}).status_code == 404
        chain, cursor = [], None  # (page the cursor fetches, cursor, its sort key)
        for page in range(1, deep_page + 10):
            r = client.get("/api/v1/people", params={"limit": 50, **({"cursor": cursor} if cursor else {})})
            r.raise_for_status()
            cursor = r.json()["next_cursor"]
            if cursor is None:
                break
            last = r.json()["items"][-1]
            chain.append((page + 1, cursor, [last["face_count"], last["id"]]))
        chain = [c for c in chain if c[0] > deep_page - 10] or chain[-20:]
        pools["deep"], pools["deep_keys"] = [c[1] for c in chain], [c[2] for c in chain]
        pools["deep_pages"] = (chain[0][0], chain[-1][0])
        first = []
        for face in thumbs:
            t = time.perf_counter()
            client.get(f"/api/v1/faces/{face}/thumbnail").raise_for_status()
            first.append(1000 * (time.perf_counter() - t))
    pools["thumbnail_first_ms"] = {"n": len(first), "p50": pct(first, 0.5), "p95": pct(first, 0.95),
                                   "p99": pct(first, 0.99)}
    print(f"prepared: {len(top)} large persons, {len(small)} small ones to merge, {len(middle)} to rename, "
          f"{len(chain)} deep cursors (pages {chain[0][0]}-{chain[-1][0]}), {len(thumbs)} thumbnails "
          f"(first fetch, one client: p50 {pools['thumbnail_first_ms']['p50']:.1f} ms, "
          f"p95 {pools['thumbnail_first_ms']['p95']:.1f} ms)", flush=True)
    return pools


class Requests:
    """The next request of each operation: ids drawn from the pools; every merge takes two
    small persons no earlier merge (of any phase) used."""

    def __init__(self, pools: dict, seed_: int):
        self.pools, self.rng, self.tag, self.renamed = pools, random.Random(seed_), seed_, 0

    def __call__(self, op: str) -> tuple[str, str, dict] | None:
        pools, rng = self.pools, self.rng
        if op == "people_first":
            return "GET", "/api/v1/people", {"params": {"limit": 50}}
        if op == "people_deep":
            return "GET", "/api/v1/people", {"params": {"limit": 50, "cursor": rng.choice(pools["deep"])}}
        if op == "person_faces":
            return "GET", f"/api/v1/people/{rng.choice(pools['faces'])}/faces", {}
        if op == "thumbnail_cached":
            return "GET", f"/api/v1/faces/{rng.choice(pools['thumbs'])}/thumbnail", {}
        if op == "rename":
            self.renamed += 1
            return "PATCH", f"/api/v1/people/{rng.choice(pools['rename'])}", {
                "json": {"name": f"Renamed {self.tag}-{self.renamed}"}}
        i = pools.setdefault("merge_used", 0)
        if i + 2 > len(pools["merge"]):
            return None
        pools["merge_used"] = i + 2
        a, b = pools["merge"][i], pools["merge"][i + 1]
        return "POST", f"/api/v1/people/{a}/merge", {"json": {"person_ids": [b]}}


def summarise(latencies: dict[str, list[float]], errors: dict[str, int], wall: float) -> dict:
    ops = {}
    for op in OPS:
        v, e = latencies.get(op, []), errors.get(op, 0)
        ops[op] = {"n": len(v), "errors": e, "rps": round((len(v) + e) / wall, 1),
                   "p50": round(pct(v, 0.5), 1), "p95": round(pct(v, 0.95), 1), "p99": round(pct(v, 0.99), 1),
                   "max": round(max(v), 1) if v else None, "mean": round(statistics.fmean(v), 1) if v else None}
    return ops


class RawClient:
    """One keep-alive HTTP/1.1 connection, a few lines over asyncio streams: locust's
    FastHttpUser in spirit. The load generator shares the machine's cores with the API and the
    database, and httpx spends about as much CPU per request as the API does (``--client httpx``
    to compare), which would be taken from the server being measured."""

    def __init__(self, base: str, token: str):
        url = httpx.URL(base)
        self.host, self.port = url.host, url.port
        self.head = f"Host: {self.host}:{self.port}\r\nAuthorization: Bearer {token}\r\n"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    reconnects = 0  # kept-alive connections the server had closed when a request was sent on them

    async def request(self, method: str, path: str, params: dict | None = None, json: dict | None = None
                      ) -> tuple[int, bytes]:
        reused = self.writer is not None
        try:
            return await self._request(method, path, params, json)
        except ConnectionResetError:
            await self.close()
            if not reused:
                raise
            # The server closed the idle connection as the request went out (nothing was read,
            # so nothing was done): send it again on a new one, as HTTP clients do.
            RawClient.reconnects += 1
            return await self._request(method, path, params, json)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await self.close()  # the next request connects again
            raise

    async def _request(self, method, path, params, json_body) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        target = path + ("?" + urlencode(params) if params else "")
        body = json.dumps(json_body).encode() if json_body is not None else b""
        head = f"{method} {target} HTTP/1.1\r\n{self.head}"
        if json_body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionResetError("the server closed the connection")
        status = int(status_line.split()[1])
        length, chunked, close = 0, False, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value
            elif name == "connection":
                close = "close" in value
        if chunked:
            data = b""
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                data += await self.reader.readexactly(size + 2)
                data = data[:-2]
            await self.reader.readline()
        else:
            data = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


class HttpxClient:
    """The same interface over one shared httpx.AsyncClient (``--client httpx``)."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client

    async def request(self, method: str, path: str, params: dict | None = None, json: dict | None = None
                      ) -> tuple[int, bytes]:
        r = await self.client.request(method, path, params=params, json=json)
        return r.status_code, r.content

    async def close(self) -> None:
        pass


ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, httpx.HTTPError)


async def solo(base: str, token: str, pools: dict, n: int, cpu: StackCpu) -> dict:
    """Each operation ``n`` times in a row from one client: latency without queueing, and the
    CPU each request costs the API and PostgreSQL (what sets the ceiling under load)."""
    make = Requests(pools, seed_=100)
    client = RawClient(base, token)
    out = {}
    for op in OPS:
        times = []
        cpu0 = cpu.read()
        for _ in range(n):
            request = make(op)
            if request is None:
                break
            method, path, kw = request
            t = time.perf_counter()
            status, data = await asyncio.wait_for(client.request(method, path, **kw), 60)
            times.append(1000 * (time.perf_counter() - t))
            if status >= 300:
                raise SystemExit(f"{op} {method} {path}: {status} {data[:300]!r}")
        cpu1 = cpu.read()
        out[op] = {"n": len(times), "p50": round(pct(times, 0.5), 2), "p95": round(pct(times, 0.95), 2),
                   **{f"{k}_cpu_ms": round(1000 * (cpu1[k] - cpu0[k]) / max(1, len(times)), 2)
                      for k in ("api", "postgres")}}
    await client.close()
    return out


async def run_phase(base: str, token: str, pools: dict, *, clients: int, duration: float, requests: int,
                    think: tuple[float, float], seed_: int, client_kind: str = "raw") -> dict:
    rng = random.Random(seed_)
    make = Requests(pools, seed_)
    names, weights = list(OPS), list(OPS.values())
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    samples: list[str] = []
    issued = 0
    deadline = time.perf_counter() + duration
    resent = RawClient.reconnects

    async def client_loop(client):
        nonlocal issued
        await asyncio.sleep(rng.uniform(0, think[1] or 1.0))  # clients start spread out, as locust ramps up
        while issued < requests and time.perf_counter() < deadline:
            op = rng.choices(names, weights)[0]
            request = make(op)
            if request is None:  # merges used up
                continue
            issued += 1
            method, path, kw = request
            t = time.perf_counter()
            try:
                status, data = await asyncio.wait_for(client.request(method, path, **kw), 60)
                ms = 1000 * (time.perf_counter() - t)
                if status >= 300:
                    errors[op] += 1
                    if len(samples) < 5:
                        samples.append(f"{op} {method} {path}: {status} {data[:200]!r}")
                else:
                    latencies[op].append(ms)
            except ERRORS as e:
                errors[op] += 1
                if len(samples) < 5:
                    samples.append(f"{op} {method} {path}: {type(e).__name__} {e}")
            if think[1] > 0:
                await asyncio.sleep(rng.uniform(*think))
        await client.close()

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60,
                                 limits=limits) as shared:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(RawClient(base, token) if client_kind == "raw" else HttpxClient(shared))
                               for _ in range(clients)))
        wall = time.perf_counter() - t0
    out = {"wall_s": round(wall, 1), "requests": sum(len(v) for v in latencies.values()) + sum(errors.values()),
           "ops": summarise(latencies, errors, wall), "error_samples": samples, "resent": RawClient.reconnects - resent}
    out["throughput_rps"] = round(out["requests"] / wall, 1)
    return out


def parse_think(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(":")
    return float(lo), float(hi or lo)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return {"nproc": os.cpu_count(), "cpu": model, "mem_gib": round(int(mem) / 2**20, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def print_phase(label: str, res: dict) -> None:
    print(f"\n{label}: {res['requests']} requests in {res['wall_s']} s = {res['throughput_rps']} req/s, "
          f"load average {res['loadavg_before']} -> {res['loadavg_after']}")
    print(f"machine CPU busy {res['machine_cpu_busy_pct']}% of {os.cpu_count()} cores; cores used by the API "
          f"{res['cores_used']['api']}, PostgreSQL {res['cores_used']['postgres']}, this client "
          f"{res['cores_used']['client']}; CPU ms per request: API {res['cpu_ms_per_request']['api']}, "
          f"PostgreSQL {res['cpu_ms_per_request']['postgres']}, client {res['cpu_ms_per_request']['client']}; "
          f"{res['connections_opened']} database connections opened; {res['resent']} requests sent again "
          "(the server had closed the kept-alive connection)")
    print(f"{'operation':<18}{'n':>7}{'err':>5}{'req/s':>8}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}  target p95")
    for op, r in res["ops"].items():
        ok = "met" if r["n"] and r["p95"] < TARGET_MS[op] else "MISSED"
        print(f"{op:<18}{r['n']:>7}{r['errors']:>5}{r['rps']:>8}{r['p50']:>9}{r['p95']:>9}{r['p99']:>9}"
              f"{r['max'] if r['max'] is not None else '-':>9}  <{TARGET_MS[op]} ms {ok}")
    for s in res["error_samples"]:
        print("  error:", s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default=os.environ.get("FACECLUSTER_PG_URL"),
                    help="a PostgreSQL URL: the scratch database is made on its server (default: FACECLUSTER_PG_URL)")
    ap.add_argument("--faces", type=int, default=1_000_000)
    ap.add_argument("--persons", type=int, default=20_000)
    ap.add_argument("--other-users", type=int, default=4)
    ap.add_argument("--other-faces", type=int, default=100_000, help="faces of each other user")
    ap.add_argument("--images", type=int, default=300, help="JPEG files the photos share")
    ap.add_argument("--deep-page", type=int, default=200, help="the deep pages timed are this one +-10 (of 50)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=60, help="seconds per phase at most")
    ap.add_argument("--requests", type=int, default=20_000, help="requests per phase at most")
    ap.add_argument("--warmup", type=float, default=10, help="seconds of load before the phases, not recorded")
    ap.add_argument("--think", action="append", type=parse_think,
                    help="MIN:MAX seconds between a client's requests (default 0.5:1.5); repeat for more phases")
    ap.add_argument("--solo", type=int, default=100, metavar="N",
                    help="first, N requests of each operation from one client in a row (0: skip)")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="the clients' HTTP: a minimal keep-alive HTTP/1.1 client (default) or httpx")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the API")
    ap.add_argument("--explain", action="store_true", help="print EXPLAIN ANALYZE of the timed statements")
    ap.add_argument("--keep", action="store_true", help="keep the scratch database (its name is printed)")
    ap.add_argument("--reuse", metavar="URL", help="run on a database an earlier --keep run seeded (merges and "
                                                   "renames of earlier runs stay in it) instead of a new one")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    if not args.db or not args.db.startswith("postgresql"):
        raise SystemExit("--db (or FACECLUSTER_PG_URL) must be a PostgreSQL URL")
    phases = args.think or [(0.5, 1.5)]
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "argv": sys.argv[1:],
              "workers": args.workers, "clients": args.clients, "client": args.client, "phases": []}
    print(json.dumps(result["machine"]), flush=True)
    database = nullcontext(args.reuse) if args.reuse else scratch_database(args.db, args.keep)
    with tempfile.TemporaryDirectory(prefix="api-load-") as tmp_, database as url:
        tmp = Path(tmp_)
        database_name = sa.make_url(url).database
        engine = make_engine(url)
        migrate(engine)
        engine.dispose()
        t = time.perf_counter()
        if args.reuse:
            result["data"] = reuse(url, tmp / "library", args.images)
        else:
            result["data"] = seed(url, tmp / "library", faces=args.faces, persons=args.persons,
                                  other_users=args.other_users, other_faces=args.other_faces, images=args.images)
        print(f"seeded in {time.perf_counter() - t:.0f} s: {json.dumps(result['data'])}", flush=True)
        engine = make_engine(url)
        with session_factory(engine)() as session:
            _, token = tokens.create(session, "bench", "api_load")
            _, other_token = tokens.create(session, "other0", "api_load") if args.other_users else (None, token)
            session.commit()
        engine.dispose()
        proc, base, log = start_api(url, tmp, args.workers)
        cpu = StackCpu(proc.pid, database_name)
        try:
            pools = prepare(base, token, other_token, url, result["data"]["user_id"], args.deep_page)
            result["deep_pages"] = pools["deep_pages"]
            result["thumbnail_first_fetch_ms"] = pools["thumbnail_first_ms"]
            if args.explain:
                explain_calls(url, result["data"]["user_id"], pools)
            if args.solo:
                load0 = os.getloadavg()[0]
                result["solo"] = asyncio.run(solo(base, token, pools, args.solo, cpu))
                result["solo_loadavg"] = round(load0, 2)
                print(f"\none client, {args.solo} requests of each operation in a row (load average {load0:.2f}):")
                print(f"{'operation':<18}{'p50 ms':>9}{'p95 ms':>9}{'CPU ms/request: API':>21}{'PostgreSQL':>12}")
                for op, r in result["solo"].items():
                    print(f"{op:<18}{r['p50']:>9}{r['p95']:>9}{r['api_cpu_ms']:>21}{r['postgres_cpu_ms']:>12}")
            if args.warmup:  # fills the API's connection pool and the caches; not recorded
                asyncio.run(run_phase(base, token, pools, clients=args.clients, duration=args.warmup,
                                      requests=args.requests, think=phases[0], seed_=99, client_kind=args.client))
            for i, think in enumerate(phases):
                load0, cpu0, m0, s0 = os.getloadavg(), cpu.read(), machine_cpu(), db_sessions(url)
                res = asyncio.run(run_phase(base, token, pools, clients=args.clients, duration=args.duration,
                                            requests=args.requests, think=think, seed_=i,
                                            client_kind=args.client))
                cpu1, m1, s1 = cpu.read(), machine_cpu(), db_sessions(url)
                n = max(1, res["requests"])
                res.update(think_s=list(think), loadavg_before=round(load0[0], 2),
                           loadavg_after=round(os.getloadavg()[0], 2),
                           machine_cpu_busy_pct=round(100 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1]), 1),
                           cpu_ms_per_request={k: round(1000 * (cpu1[k] - cpu0[k]) / n, 2) for k in cpu0},
                           cores_used={k: round((cpu1[k] - cpu0[k]) / res["wall_s"], 2) for k in cpu0},
                           connections_opened=s1 - s0)
                result["phases"].append(res)
                print_phase(f"phase {i + 1}: {args.clients} clients, think {think[0]}-{think[1]} s, "
                            f"{args.workers} API worker(s)", res)
        finally:
            cpu.close()
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
            tail = log.read_text()[-2000:]
            if "Traceback" in tail:
                print("API log tail:\n" + tail)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({"load_average_end": os.getloadavg()}))


if __name__ == "__main__":
    main()
