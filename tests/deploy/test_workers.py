"""The bus workers as a deployment starts them: without an explicit database and bus URL they
refuse to start (exit code 2, a message naming the settings), and `--help` lists every setting
they read, from the settings' own field descriptions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deploytools import REPO, containers
from facecore.settings import Settings, load_settings
from services.runner import REQUIRED, env_name, missing_settings, refusal, settings_help

WORKERS = ["services.ingest", "services.cluster_worker", "services.recluster_worker"]


def run(module: str, *args: str, env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FACECLUSTER_")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=300)


def test_the_workers_are_those_the_manifests_run(rendered):
    run_by_manifests = {argv[2] for c in containers(rendered["cpu"]) for argv in c.commands()
                        if argv[0] == "python" and argv[2] != "services.api"}
    assert run_by_manifests == set(WORKERS)


@pytest.mark.parametrize("module", WORKERS[:2])
def test_refuses_to_start_without_database_and_bus(module, tmp_path):
    proc = run(module, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to start: FACECLUSTER_DATABASE_URL and FACECLUSTER_BUS_URL were not given" in proc.stderr
    assert "FACECLUSTER_BUS_URL=kafka://" in proc.stderr  # an example
    assert not (tmp_path / "facecluster.db").exists()


def test_refuses_to_start_without_the_bus(tmp_path):
    proc = run("services.cluster_worker", env={"FACECLUSTER_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"},
               cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to start: FACECLUSTER_BUS_URL was not given" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("module", WORKERS)
def test_help_lists_the_settings(module, rendered):
    proc = run(module, "--help", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    for name, field in Settings.model_fields.items():
        line = next((l for l in proc.stdout.splitlines() if l.split()[:1] == [env_name(name)]), None)
        assert line, f"--help of {module} does not list {env_name(name)}"
        if field.description:
            assert " ".join(field.description.split()[:4]) in line
    assert "FACECLUSTER_CONFIG" in proc.stdout
    # and the flags the manifests give the worker are its own
    for c in containers(rendered["cpu"]):
        for argv in c.commands():
            if argv[:3] == ["python", "-m", module]:
                for flag in (w for w in argv[3:] if w.startswith("--")):
                    assert flag in proc.stdout


def test_explicit_means_env_toml_or_init(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("FACECLUSTER_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    assert missing_settings(Settings()) == list(REQUIRED)
    toml = tmp_path / "settings.toml"
    toml.write_text('database_url = "postgresql://db/x"\nbus_url = "kafka://k:9092"\n')
    assert missing_settings(load_settings(toml)) == []
    monkeypatch.setenv("FACECLUSTER_CONFIG", str(toml))
    assert missing_settings(Settings()) == []
    monkeypatch.delenv("FACECLUSTER_CONFIG")
    monkeypatch.setenv("FACECLUSTER_BUS_URL", "kafka://k:9092")
    assert missing_settings(Settings()) == ["database_url"]
    assert missing_settings(Settings(database_url="sqlite:///x.db")) == []
    monkeypatch.setenv("FACECLUSTER_DATABASE_URL", "")  # set but empty is not given
    assert missing_settings(Settings()) == ["database_url"]
    assert "FACECLUSTER_DATABASE_URL was not given" in refusal(["database_url"])


def test_settings_help_is_one_line_per_field():
    text = settings_help(Settings)
    assert len([l for l in text.splitlines() if l.startswith("  FACECLUSTER_")]) == len(Settings.model_fields) + 1
