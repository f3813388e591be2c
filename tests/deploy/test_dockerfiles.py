"""The Dockerfiles, read (no Docker engine needed): multi-stage, a non-root user in the image
that ships, the model files checked against their pinned sha256, the locked extras that exist,
and every COPY source present in the repository and not excluded by .dockerignore."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from dataclasses import dataclass, field

import pytest

from deploytools import REPO
from facecore.models import REGISTRY

DOCKERFILES = sorted(p.name for p in REPO.glob("Dockerfile*"))


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(ARGs before the first FROM with their defaults, the stages)."""
    lines, buf = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    assert not buf, "a line continuation runs off the end"
    args, stages = {}, []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append((instruction, rest))
    return args, stages


def ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore's rule, enough for our patterns: the last matching pattern wins, ! re-includes."""
    result = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        anywhere = pattern.startswith("**/")  # in any folder: match the last component
        if any(fnmatch.fnmatch(p.rsplit("/", 1)[-1], pattern[3:]) if anywhere else fnmatch.fnmatch(p, pattern)
               for p in prefixes):
            result = not negate
    return result


def dockerignore() -> list[str]:
    return [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_both_images_have_a_dockerfile():
    assert DOCKERFILES == ["Dockerfile", "Dockerfile.gpu"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_multi_stage_non_root(name):
    args, stages = parse((REPO / name).read_text())
    assert len(stages) >= 2, "build and runtime stages"
    names = [s.name for s in stages]
    assert all(names) and len(set(names)) == len(names), f"every stage named, once: {names}"
    for stage in stages:
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage.base)
        assert ":" in base and not base.endswith(":latest"), f"{stage.name}: base image {base} is not pinned to a tag"
    final = stages[-1]
    users = [rest for instruction, rest in final.instructions if instruction == "USER"]
    assert users, "the image that ships sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"the image runs as {users[-1]}"
    for stage in stages[1:]:
        for instruction, rest in stage.instructions:
            if instruction == "COPY" and "--from=" in rest:
                source = re.search(r"--from=(\S+)", rest).group(1)
                assert source in names[:names.index(stage.name)], f"COPY --from={source}: no earlier stage"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_models_checked_by_sha256(name):
    """`facecluster models check` (libs/facecore/models.py's pinned sha256) runs in the build stage
    and again in the image that ships; what it skips are registered models."""
    _, stages = parse((REPO / name).read_text())
    for stage in (stages[0], stages[-1]):
        checks = [rest for instruction, rest in stage.instructions
                  if instruction == "RUN" and "facecluster models check" in rest]
        assert checks, f"stage {stage.name} does not run `facecluster models check`"
        for check in checks:
            skipped = re.findall(r"--skip[ =](\S+)", check)
            assert set(skipped) <= REGISTRY.keys()
            assert "sface" not in skipped and not any(s.startswith("mtcnn") for s in skipped)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_installs_a_locked_extra_that_exists(name):
    text = (REPO / name).read_text()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = re.findall(r"uv sync [^\n]*--extra (\S+)", text)
    assert wanted and set(wanted) <= extras.keys(), f"{name} installs extras {wanted}; pyproject has {list(extras)}"
    assert all("--frozen" in line for line in re.findall(r"uv sync [^\n]*", text)), "only the locked versions"
    assert set(wanted) == ({"gpu"} if name.endswith(".gpu") else {"cpu"})


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copy_sources_exist_and_reach_the_build(name):
    _, stages = parse((REPO / name).read_text())
    patterns = dockerignore()
    copied = []
    for stage in stages:
        for instruction, rest in stage.instructions:
            if instruction in ("COPY", "ADD") and "--from=" not in rest:
                words = [w for w in shlex.split(rest) if not w.startswith("--")]
                for source in words[:-1]:
                    assert (REPO / source).exists(), f"{name}: COPY {source}: not in the repository"
                    assert not ignored(source, patterns), f"{name}: COPY {source}: excluded by .dockerignore"
                    copied.append(source)
    # what the installed project needs: its metadata, lock, packages and migrations
    assert {"pyproject.toml", "uv.lock", "README.md", "alembic.ini", "migrations", "libs", "services"} <= set(copied)


def test_dockerignore_keeps_local_state_out():
    patterns = dockerignore()
    for path in (".git", ".venv", ".cache/bin/kustomize", "var/objects", "services/__pycache__/cli.cpython-312.pyc",
                 "facecluster.egg-info/PKG-INFO"):
        assert ignored(path, patterns), f"{path} would be sent to the build"
    for path in ("pyproject.toml", "libs/facecore/models.py", "libs/facecore/assets/gender_head.onnx",
                 "migrations/env.py"):
        assert not ignored(path, patterns), path
