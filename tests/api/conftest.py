"""The API as a client meets it: a real uvicorn server over HTTP on a migrated database (SQLite,
and the project's real PostgreSQL), seeded with a synthetic library, and bearer tokens."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from testdb import scratch_pg_database
from services import tokens
from services.store.db import make_engine, migrate, session_factory

from apilibrary import Library, seed_library


REPO = Path(__file__).resolve().parents[2]
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.cloud)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveApi:
    url: str  # http://127.0.0.1:PORT
    db_url: str
    cache: Path  # the server's thumbnail cache
    log: Path

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def start_api(db_url: str, tmp: Path, *, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, LiveApi]:
    """``python -m services.api`` on a free port; waits until /readyz answers 200."""
    port = free_port()
    cache = tmp / "thumbnails"
    log = tmp / f"api-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.api", "--db", db_url, "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, "FACECLUSTER_THUMBNAIL_CACHE": str(cache), **(env or {})})
    api = LiveApi(f"http://127.0.0.1:{port}", db_url, cache, log)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(api.url + "/readyz", timeout=2).status_code == 200:
                return proc, api
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the API did not get ready in 60 s:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def stop_api(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(params=BACKENDS)
def api_db(request, tmp_path) -> Iterator[str]:
    """URL of a freshly migrated database of its own (SQLite file, or a scratch PostgreSQL database)."""
    if request.param == "sqlite":
        path = tmp_path / "api.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    with scratch_pg_database(request.getfixturevalue("pg_url")) as url:
        engine = make_engine(url)
        migrate(engine)
        engine.dispose()
        yield url


@dataclass
class Seeded:
    api: LiveApi
    ann: Library
    bob: Library
    ann_token: str
    bob_token: str


def seed_two_users(db_url: str, root: Path) -> tuple[Library, Library, str, str]:
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as session:
            ann = seed_library(session, "ann", root, persons=4, faces_per_person=3, seed=1)
            bob = seed_library(session, "bob", root, persons=3, faces_per_person=2, seed=2)
            _, ann_token = tokens.create(session, "ann")
            _, bob_token = tokens.create(session, "bob")
            session.commit()
    finally:
        engine.dispose()
    return ann, bob, ann_token, bob_token


@pytest.fixture
def seeded(api_db, tmp_path) -> Iterator[Seeded]:
    """Two users (ann: 4 persons x 3 faces, bob: 3 x 2) with tokens, served by a live API."""
    ann, bob, ann_token, bob_token = seed_two_users(api_db, tmp_path / "photos")
    proc, api = start_api(api_db, tmp_path)
    try:
        yield Seeded(api, ann, bob, ann_token, bob_token)
    finally:
        stop_api(proc)
