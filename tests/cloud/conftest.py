"""Fixtures for tests against the project's real PostgreSQL and Kafka.

The session fixture runs ``scripts/services.sh start`` itself, so ``pytest tests/cloud`` works on
a fresh machine: the script installs and starts whatever is missing. A failure to start fails
the tests (never skips them). The services are left running afterwards so the next run starts
in under a second; ``scripts/services.sh stop`` shuts them down.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICES_SH = REPO / "scripts" / "services.sh"

# A cold start installs PostgreSQL and downloads the Kafka jars; allow for a slow mirror.
START_TIMEOUT_S = 1200


def run_services(*args: str, timeout: float = START_TIMEOUT_S) -> str:
    """Run scripts/services.sh with ``args``; fail the test with its output if it fails."""
    proc = subprocess.run(
        ["bash", str(SERVICES_SH), *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"scripts/services.sh {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}",
            pytrace=False,
        )
    return proc.stdout


def _parse_env(text: str) -> dict[str, str]:
    # Lines look like: export NAME='value';
    env = {}
    for line in text.splitlines():
        words = shlex.split(line.rstrip().rstrip(";"))
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            env[name] = value
    return env


@pytest.fixture(scope="session")
def cloud_services() -> dict[str, str]:
    """Starts (or finds running) PostgreSQL and Kafka; returns the script's env values."""
    run_services("start")
    env = _parse_env(run_services("env"))
    missing = {"FACECLUSTER_PG_URL", "FACECLUSTER_KAFKA"} - env.keys()
    assert not missing, f"scripts/services.sh env did not print {missing}"
    return env


@pytest.fixture(scope="session")
def pg_url(cloud_services) -> str:
    """SQLAlchemy URL (postgresql+psycopg2://...) of the started database."""
    return cloud_services["FACECLUSTER_PG_URL"]


@pytest.fixture(scope="session")
def kafka_bootstrap(cloud_services) -> str:
    """host:port of the started Kafka broker."""
    return cloud_services["FACECLUSTER_KAFKA"]


@pytest.fixture
def restart_service(cloud_services):
    """Call with "kafka" or "pg" to restart that service through the script (waits until ready)."""

    def restart(name: str) -> None:
        assert name in ("kafka", "pg"), name
        run_services(f"restart-{name}", timeout=300)

    return restart
