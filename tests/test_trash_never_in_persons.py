"""Trash faces (detections the trash model says are not faces) never form or join a person, by
any of the ways faces get into persons: the batch cluster job, the recluster job, the cluster
worker (re-clustering a small user, or filing faces incrementally), and after a re-embedding
turns a face that was in a person into trash.

Synthetic vectors as in test_recluster.py: each true group is a random direction in 128
dimensions plus noise. Some trash faces lie right on a real person's direction (they would
join that person) and others on a direction of their own (they would form a person), so a
path that let trash through would fail here.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import uuid
from dataclasses import dataclass

import numpy as np
import pytest

from facecore.types import FaceRecord, PhotoResult
from services import bus as busmod
from services.bus import Message
from services.cluster_worker.worker import ClusterWorker
from services.clustering import cluster_user
from services.persons import repository as persons_repo
from services.recluster import recluster_user
from services.store import repository as repo
from services.store.db import make_engine, session_factory

MODEL = "sface-2021dec"
DIM = 128


@dataclass
class Library:
    name: str
    user_id: int
    real: list[int]  # one person's faces
    trash_near_real: list[int]  # trash faces on that person's direction
    trash_group: list[int]  # trash faces that agree with each other


def record(v: np.ndarray, trash: bool) -> FaceRecord:
    return FaceRecord(index=0, box=np.array((100.0, 60.0, 220.0, 180.0), np.float32),
                      landmarks=np.zeros((5, 2), np.float32), det_score=0.95, blur=0.8, blurry=False,
                      trash_score=0.9 if trash else 0.1, is_trash=trash, embedding=v / np.linalg.norm(v),
                      model_version=MODEL, attributes={})


def seed(sessions) -> Library:
    """A user with one face per photo: 5 of one person, 3 trash faces next to them, 4 trash
    faces of one other direction; indexed, not clustered."""
    name = f"trash-{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(7)
    person, other = rng.standard_normal((2, DIM)).astype(np.float32)
    groups: dict[str, list[int]] = {"real": [], "trash_near_real": [], "trash_group": []}
    with sessions() as session:
        user = repo.get_or_create_user(session, name)
        for group, base, n, trash in (("real", person, 5, False), ("trash_near_real", person, 3, True),
                                      ("trash_group", other, 4, True)):
            for k in range(n):
                face = record(base + 0.3 * rng.standard_normal(DIM).astype(np.float32), trash)
                key = f"{name}/{group}_{k}.jpg"
                result = PhotoResult(key=key, sha256=hashlib.sha256(key.encode()).hexdigest(), width=320,
                                     height=240, faces=[face])
                groups[group] += repo.save_photo_result(session, user.id, key, result).face_ids
        session.commit()
        return Library(name, user.id, **groups)


def persons_of(sessions, lib: Library) -> list[set[int]]:
    with sessions() as session:
        out: dict[int, set[int]] = {}
        for face, person in persons_repo.face_links(session, lib.user_id).items():
            out.setdefault(person, set()).add(face)
    return list(out.values())


@pytest.fixture
def sessions(tmp_path, sqlite_template):
    path = tmp_path / "facecluster.db"
    shutil.copyfile(sqlite_template, path)
    engine = make_engine(f"sqlite:///{path}")
    yield session_factory(engine)
    engine.dispose()


def run_worker(sessions, lib: Library, face_ids: list[int], recluster_max_faces: int) -> None:
    """The cluster worker's handling of one faces.indexed batch announcing ``face_ids``."""
    bus = busmod.connect(f"memory://{uuid.uuid4().hex}")
    bus.ensure_topics()
    worker = ClusterWorker(bus, sessions, threading.Event(), recluster_max_faces=recluster_max_faces)
    worker.handle([Message(busmod.INDEXED, 0, 0, lib.name, {"user": lib.name, "face_ids": face_ids}, b"")])


def cluster_with(how: str, sessions, lib: Library) -> None:
    everything = lib.real + lib.trash_near_real + lib.trash_group
    if how == "cluster job":
        cluster_user(sessions, lib.name, MODEL)
    elif how == "recluster job":
        recluster_user(sessions, lib.name)
    elif how == "worker, re-clustering":
        run_worker(sessions, lib, everything, recluster_max_faces=1000)
    else:
        # incrementally: the person exists first, then the trash is announced to it
        run_worker(sessions, lib, lib.real, recluster_max_faces=0)
        run_worker(sessions, lib, lib.trash_near_real + lib.trash_group, recluster_max_faces=0)


HOW = ["cluster job", "recluster job", "worker, re-clustering", "worker, incremental"]


@pytest.mark.parametrize("how", HOW)
def test_trash_faces_neither_form_nor_join_a_person(sessions, how):
    lib = seed(sessions)
    cluster_with(how, sessions, lib)
    assert persons_of(sessions, lib) == [set(lib.real)]


@pytest.mark.parametrize("how", ["cluster job", "recluster job"])
def test_a_face_reembedded_as_trash_leaves_its_person(sessions, how):
    """Re-embedding rewrites the trash verdict of faces already in persons; the re-clustering
    that follows (the reembed job's and ``facecluster run``'s is the cluster job) takes the
    now-trash face out of its person."""
    lib = seed(sessions)
    cluster_user(sessions, lib.name, MODEL)
    assert persons_of(sessions, lib) == [set(lib.real)]
    turned = lib.real[0]
    with sessions() as session:
        vector = repo.face_embeddings(session, lib.user_id, [turned])[2][0]
        assert repo.update_face_vectors(session, lib.user_id, [turned], [record(vector, trash=True)]) == 1
        session.commit()
    cluster_with(how, sessions, lib)
    assert persons_of(sessions, lib) == [set(lib.real[1:])]
