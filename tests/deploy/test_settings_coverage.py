"""Every setting the services need in the cloud reaches every container that needs it through
the rendered manifests, and every FACECLUSTER_* key the manifests set is a real setting."""

from __future__ import annotations

import os
from pathlib import PurePosixPath

import pytest

from deploytools import OVERLAYS, REPO, Container, containers, environment, raw_documents
from facecore.settings import Settings
from services.runner import REQUIRED, env_name, missing_settings
from services.settings import ClusterWorkerSettings, ServiceSettings

KNOWN = {env_name(f) for f in (*Settings.model_fields, *ServiceSettings.model_fields,
                                *ClusterWorkerSettings.model_fields)} | {"FACECLUSTER_CONFIG"}

# What each process reads beyond what every bus worker refuses to start without (runner.REQUIRED).
# Paths among them must be inside a volume the container mounts.
NEEDS = {
    "python -m services.api": {"database_url", "bus_url", "object_store", "thumbnail_cache"},
    "python -m services.ingest": {*REQUIRED, "object_store"},
    "python -m services.cluster_worker": {*REQUIRED},
    "python -m services.recluster_worker": {*REQUIRED},
    "facecluster recluster": {*REQUIRED},
    "facecluster reembed": {"database_url", "bus_url", "object_store"},
    "alembic upgrade": {"database_url"},
}
PATHS = {"object_store", "thumbnail_cache"}
# The bus workers (services/runner.py run_worker), which refuse to start without REQUIRED.
WORKERS = {"python -m services.ingest", "python -m services.cluster_worker", "python -m services.recluster_worker"}


def programs(c: Container) -> list[str]:
    return [f"python -m {argv[2]}" if argv[0] == "python" else
            f"{argv[0]} {next(w for w in argv[1:] if not w.startswith('-'))}" for argv in c.commands()]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_gets_the_settings_it_needs(rendered, overlay, monkeypatch):
    docs = rendered[overlay]
    checked = set()
    for c in containers(docs):
        env = environment(c, docs)
        mounts = [PurePosixPath(m["mountPath"]) for m in c.spec.get("volumeMounts", [])]
        for program in programs(c):
            assert program in NEEDS, f"{c.workload} runs {program!r}: say in NEEDS which settings it reads"
            checked.add(program)
            for field in NEEDS[program]:
                name = env_name(field)
                assert env.get(name), f"{overlay}: {c.workload} runs {program} but gets no {name}"
                if field in PATHS:
                    path = PurePosixPath(env[name])
                    assert any(path == m or m in path.parents for m in mounts), \
                        f"{overlay}: {c.workload}: {name}={path} is in no volume it mounts"
        # The values parse as the settings do, and a worker would not refuse to start on them.
        for key in [k for k in os.environ if k.startswith("FACECLUSTER_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        ServiceSettings()
        if any(p in WORKERS for p in programs(c)):
            assert missing_settings(settings) == [], f"{overlay}: {c.workload} would refuse to start"
    assert checked == NEEDS.keys(), f"NEEDS lists programs no manifest runs: {NEEDS.keys() - checked}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_key_the_rendered_manifests_set_is_a_setting(rendered, overlay):
    docs = rendered[overlay]
    keys = set()
    for c in containers(docs):
        keys |= {k for k in environment(c, docs) if k.startswith("FACECLUSTER_")}
    for d in docs:
        if d["kind"] in ("ConfigMap", "Secret"):
            keys |= {k for k in {**d.get("data", {}), **d.get("stringData", {})} if k.startswith("FACECLUSTER")}
    assert keys, "no FACECLUSTER_* setting at all"
    assert keys <= KNOWN, f"not settings (typos?): {sorted(keys - KNOWN)}"


def test_every_key_the_raw_manifests_set_is_a_setting():
    """The overlays' patches too (a ConfigMap patch with a typo would only add a dead key)."""
    for path, doc in raw_documents():
        data = {**doc.get("data", {}), **doc.get("stringData", {})} if doc["kind"] in ("ConfigMap", "Secret") else {}
        unknown = {k for k in data if k.startswith("FACECLUSTER")} - KNOWN
        assert not unknown, f"{path.relative_to(REPO)}: not settings: {sorted(unknown)}"
