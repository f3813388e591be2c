"""The API as a separate process: ``python -m services.api`` on a free port, over real HTTP
(a plain module, so any test folder can import it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


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
