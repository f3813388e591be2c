"""Fixtures for the deployment checks: a kustomize binary, and the rendered overlays.

kustomize is built from the Go module proxy (``go install``) into ``.cache/bin`` of the
checkout on first use, so a fresh clone needs only Go (1.24 or later); the first build takes a
few minutes, later runs reuse it. No Go fails the tests: they never skip for a missing tool.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploytools import BIN, K8S, KUSTOMIZE_MODULE, KUSTOMIZE_VERSION, OVERLAYS, REPO


def _go() -> str:
    go = shutil.which("go") or next((str(p) for p in (Path(os.environ.get("GOROOT", "/nonexistent")) / "bin" / "go",
                                                       Path("/usr/local/go/bin/go")) if p.is_file()), None)
    if go is None:
        pytest.fail("Go is needed to build kustomize for the deployment tests (go install "
                    f"{KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION}); put `go` on PATH", pytrace=False)
    return go


def _installed_version(exe: Path) -> str | None:
    if not exe.is_file():
        return None
    out = subprocess.run([str(exe), "version"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip() if out.returncode == 0 else None


@pytest.fixture(scope="session")
def kustomize() -> Path:
    """Path of kustomize KUSTOMIZE_VERSION, built into .cache/bin if not there yet."""
    exe = BIN / "kustomize"
    if _installed_version(exe) != KUSTOMIZE_VERSION:
        BIN.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GOBIN": str(BIN), "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
        proc = subprocess.run([_go(), "install", f"{KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            pytest.fail(f"go install {KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION} exited {proc.returncode}\n"
                        f"{proc.stderr[-6000:]}", pytrace=False)
        got = _installed_version(exe)
        assert got == KUSTOMIZE_VERSION, f"built kustomize reports {got!r}"
    return exe


def kustomize_build(exe: Path, overlay: str) -> list[dict]:
    proc = subprocess.run([str(exe), "build", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"kustomize build k8s/overlays/{overlay} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="session")
def rendered(kustomize) -> dict[str, list[dict]]:
    """overlay name -> the documents of ``kustomize build k8s/overlays/<name>``."""
    return {overlay: kustomize_build(kustomize, overlay) for overlay in OVERLAYS}
