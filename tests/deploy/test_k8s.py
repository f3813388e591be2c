"""The k8s manifests: every raw file and every document of ``kustomize build`` of each overlay is
valid against the Kubernetes API schemas (kubernetes-validate, strict: no unknown fields), the
custom resources (KEDA) are checked structurally here, and what the manifests refer to exists:
images some Dockerfile builds, ConfigMaps, Secrets, claims, scale targets, Python modules and
`facecluster` subcommands with the flags they are given."""

from __future__ import annotations

import importlib.util
import re
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from deploytools import (CRD_KINDS, KUBERNETES_VERSION, OVERLAYS, REPO, containers, find, pod_spec,
                         raw_documents)
from services import bus
from services.cli import build_parser
from services.ingest.worker import GROUP as INGEST_GROUP


def validate(doc: dict, where: str) -> None:
    if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
        return  # no schema in kubernetes-validate: test_scaled_object checks it
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata'].get('name')}: {e.message} at "
                    f"{'.'.join(map(str, e.path))}", pytrace=False)
    except kubernetes_validate.SchemaNotFoundError:
        pytest.fail(f"{where}: {doc['apiVersion']} {doc['kind']} is not a Kubernetes {KUBERNETES_VERSION} kind "
                    f"(a custom resource must be listed in CRD_KINDS and checked structurally)", pytrace=False)


def test_the_overlays_are_cpu_and_gpu():
    assert OVERLAYS == ["cpu", "gpu"]


def test_every_raw_manifest_is_valid():
    docs = list(raw_documents())
    assert len(docs) >= 12
    for path, doc in docs:
        validate(doc, str(path.relative_to(REPO)))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_document_is_valid(rendered, overlay):
    docs = rendered[overlay]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "Job", "CronJob", "ConfigMap", "Secret", "ScaledObject"} <= kinds
    for doc in docs:
        validate(doc, f"kustomize build k8s/overlays/{overlay}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_object(rendered, overlay):
    """KEDA's ScaledObject, by hand: it scales the ingest Deployment on its group's lag on photo.uploaded."""
    docs = rendered[overlay]
    scalers = [d for d in docs if d["kind"] == "ScaledObject"]
    assert len(scalers) == 1
    so = scalers[0]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert set(so) == {"apiVersion", "kind", "metadata", "spec"}
    spec = so["spec"]
    assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                         "cooldownPeriod", "idleReplicaCount", "fallback", "advanced", "triggers"}
    target = find(docs, spec["scaleTargetRef"].get("kind", "Deployment"), spec["scaleTargetRef"]["name"])
    assert "replicas" not in target["spec"], "KEDA owns the replica count; a fixed one fights it on every apply"
    assert any(c.spec["command"][-1] == "services.ingest" for c in containers([target]))
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= bus.PARTITIONS, \
        "replicas beyond the partition count get no partition"
    [trigger] = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
    assert meta["topic"] == bus.UPLOADED
    assert meta["consumerGroup"] == INGEST_GROUP
    assert int(meta["lagThreshold"]) > 0
    bus_url = find(docs, "ConfigMap", "facecluster-config")["data"]["FACECLUSTER_BUS_URL"]
    assert meta["bootstrapServers"] == urlsplit(bus_url).netloc, "KEDA must watch the Kafka the workers use"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(rendered, overlay):
    docs = rendered[overlay]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for c in containers(docs):
        for source in c.spec.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef")
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            assert (kind, ref["name"]) in names, f"{c.workload}: no {kind} {ref['name']}"
        volumes = {v["name"]: v for v in c.pod.get("volumes", [])}
        for mount in c.spec.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{c.workload}: mounts undeclared volume {mount['name']}"
    for d in docs:
        for v in (pod_spec(d) or {}).get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names
    for svc in (d for d in docs if d["kind"] == "Service" and d["spec"].get("type") != "ExternalName"):
        selector = svc["spec"]["selector"]
        assert any(d["kind"] == "Deployment" and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in docs), f"Service {svc['metadata']['name']} selects no pods"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_built_by_a_dockerfile(rendered, overlay):
    """Every image is facecluster:<tag> and `docker build ... -t facecluster:<tag>` is in a Dockerfile."""
    built = {m.group(1) for f in REPO.glob("Dockerfile*")
             for m in re.finditer(r"docker build .*-t (facecluster:[\w.-]+)", f.read_text())}
    assert built == {"facecluster:cpu", "facecluster:gpu"}
    for c in containers(rendered[overlay]):
        assert c.spec["image"] in built, f"{c.workload}: image {c.spec['image']} is built by no Dockerfile"


def test_cpu_overlay_asks_for_no_gpu(rendered):
    docs = rendered["cpu"]
    for c in containers(docs):
        assert c.spec["image"] == "facecluster:cpu"
        assert "nvidia.com/gpu" not in str(c.spec.get("resources")), c.workload
        assert not c.pod.get("nodeSelector") and not c.pod.get("tolerations"), c.workload
    assert find(docs, "ConfigMap", "facecluster-config")["data"]["FACECLUSTER_PROVIDERS"] == '["CPUExecutionProvider"]'


def test_gpu_overlay_runs_the_models_on_a_gpu(rendered):
    import json

    docs = rendered["gpu"]
    for kind, name in [("Deployment", "facecluster-ingest"), ("Job", "facecluster-reembed")]:
        [c] = containers([find(docs, kind, name)])
        assert c.spec["image"] == "facecluster:gpu"
        assert c.spec["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c.pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in c.pod["tolerations"]
        trt_cache = find(docs, "ConfigMap", "facecluster-config")["data"]["FACECLUSTER_TRT_CACHE"]
        assert any(m["mountPath"] == trt_cache and not m.get("readOnly") for m in c.spec["volumeMounts"]), \
            f"{name}: TensorRT's engine cache {trt_cache} is on no writable volume"
    others = [c for c in containers(docs) if c.workload not in ("Deployment/facecluster-ingest", "Job/facecluster-reembed")]
    assert others and all(c.spec["image"] == "facecluster:cpu" for c in others)
    providers = json.loads(find(docs, "ConfigMap", "facecluster-config")["data"]["FACECLUSTER_PROVIDERS"])
    assert providers == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_recluster_job_and_cronjob(rendered, overlay):
    docs = rendered[overlay]
    job, cron = find(docs, "Job", "facecluster-recluster"), find(docs, "CronJob", "facecluster-recluster")
    assert cron["spec"]["jobTemplate"]["spec"] == job["spec"], "the nightly run and the Job must be the same"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == 2
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    [c] = containers([job])
    script = c.script
    enqueue = script.index("facecluster recluster --all --enqueue")
    assert 'if [ "$JOB_COMPLETION_INDEX" = 0 ]' in script[:enqueue], "only pod 0 enqueues"
    assert re.search(r"python -m services.recluster_worker --exit-when-idle \d+", script[enqueue:]), \
        "every pod then runs the worker until the group is idle"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_commands_exist(rendered, overlay):
    """What each container runs exists: Python modules (with the flags they are given), `facecluster`
    subcommands (parsed by the real parser), alembic with its ini file. A missing module fails."""
    seen = set()
    for c in containers(rendered[overlay]):
        commands = c.commands()
        assert commands, f"{c.workload}: runs none of python -m / facecluster / alembic: {c.argv}"
        for argv in commands:
            seen.add(argv[0] if argv[0] != "python" else f"python -m {argv[2]}")
            if argv[0] == "facecluster":
                words = [w for w in argv[1:] if w != "--verbose"]
                build_parser().parse_args(words)  # SystemExit on an unknown subcommand or flag
            elif argv[0] == "alembic":
                assert argv[1:] == ["upgrade", "head"] and (REPO / "alembic.ini").is_file()
            else:
                assert argv[1] == "-m", argv
                spec = importlib.util.find_spec(argv[2])
                assert spec is not None, f"{c.workload} runs python -m {argv[2]}, which does not exist"
                if argv[2] == "services.api":  # `facecluster serve` under another name
                    build_parser().parse_args(["serve", *argv[3:]])
                    continue
                source = "".join(p.read_text() for p in
                                 (REPO / argv[2].replace(".", "/")).glob("*.py"))
                for flag in (w.split("=")[0] for w in argv[3:] if w.startswith("--")):
                    assert f'"{flag}"' in source, f"{c.workload}: python -m {argv[2]} has no {flag}"
    assert {"python -m services.api", "python -m services.ingest", "python -m services.cluster_worker",
            "python -m services.recluster_worker", "facecluster", "alembic"} <= seen
