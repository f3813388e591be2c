"""The deployment checks' helpers: paths, the pinned tool versions, reading the k8s manifests (the raw
files, the workloads' containers, what each container runs)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))

KUSTOMIZE_MODULE = "sigs.k8s.io/kustomize/kustomize/v5"
KUSTOMIZE_VERSION = "v5.8.1"  # v5.8.2 and later need Go 1.26+
BIN = REPO / ".cache" / "bin"

# The Kubernetes version the manifests are validated against (kubernetes-validate's schemas).
KUBERNETES_VERSION = "1.33.0"

# Kinds the Kubernetes API does not know: custom resources, checked structurally (test_k8s.py).
CRD_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}


def raw_documents() -> Iterator[tuple[Path, dict]]:
    """Every Kubernetes object written in k8s/ (not kustomizations, not JSON patches)."""
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") != "Kustomization":
                yield path, doc


@dataclass(frozen=True)
class Container:
    workload: str  # kind/name
    pod: dict  # the pod spec
    spec: dict  # the container

    @property
    def argv(self) -> list[str]:
        return [*self.spec.get("command", []), *self.spec.get("args", [])]

    @property
    def script(self) -> str:
        """The command line(s) it runs: argv joined, or the script of ``sh -c``."""
        argv = self.argv
        if argv[:1] in (["sh"], ["/bin/sh"], ["bash"], ["/bin/bash"]) and "-c" in argv:
            return argv[argv.index("-c") + 1]
        return shlex.join(argv)

    def commands(self) -> list[list[str]]:
        """Each program invocation in ``script`` as argv (facecluster ..., python -m ..., alembic ...)."""
        found = []
        for m in re.finditer(r"((?:python3?|facecluster|alembic)\b[^;&|\n]*)", self.script):
            words = shlex.split(m.group(1))
            if words[0] in ("python", "python3", "facecluster", "alembic"):
                found.append(words)
        return found


def pod_spec(doc: dict) -> dict | None:
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def containers(docs: list[dict]) -> list[Container]:
    out = []
    for doc in docs:
        pod = pod_spec(doc)
        if pod is None:
            continue
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            out.append(Container(f"{doc['kind']}/{doc['metadata']['name']}", pod, c))
    return out


def find(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} documents"
    return hits[0]


def environment(container: Container, docs: list[dict]) -> dict[str, str]:
    """The environment variables ``container`` gets from envFrom (ConfigMaps, Secrets) and env."""
    env: dict[str, str] = {}
    for source in container.spec.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(docs, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        elif "secretRef" in source:
            secret = find(docs, "Secret", source["secretRef"]["name"])
            env.update(secret.get("stringData", {}))
            env.update({k: "<base64>" for k in secret.get("data", {})})
        else:
            raise AssertionError(f"{container.workload}: envFrom {source} is neither a ConfigMap nor a Secret")
    for var in container.spec.get("env", []):
        env[var["name"]] = var.get("value", "<from valueFrom>")
    return env
