"""Re-embedding job: after a change of embedder, bring every stored face into the new space.

Vectors of two embedders cannot be compared, so once a deployment's embedder changes
(``FACECLUSTER_EMBEDDER``, flip TTA, an embedding head) the faces stored before are clustered
apart from the new ones, and persons made of old vectors never get a new face. The ingest worker
skips bytes it has indexed, so nothing else fixes that. This job does, in place: it reads each
stale photo back from the object store, embeds its stored faces again at their stored landmarks
(``FacePipeline.reembed``) and rewrites only what the embedder decides, one transaction per
photo. Face ids stay, and with them every person link, name and hidden flag. Each user is then
re-clustered in the new space (``services.clustering``), which maps the new clusters onto the
existing persons, and only then are the user's re-embedded photos announced on ``faces.indexed``.
Each rewrite and the re-clustering bump the user's clustering revision, so a cluster worker that
cached the user's faces reads them again before it files another face, announcement or not.

A photo whose bytes are gone or no longer decode keeps its old vectors and is reported; the run
goes on. Pages are walked by photo id, so a failure is not retried in the same run, and a run
that stops is resumed by running it again: only stale photos are visited. A user whose photos
were all re-embedded before a stop is re-clustered by naming it (``--user``).

Run: ``facecluster reembed [--user U ...]`` (``k8s/reembed-job.yaml``), with the settings of the
workers (``FACECLUSTER_DATABASE_URL``, ``FACECLUSTER_OBJECT_STORE``, ``FACECLUSTER_BUS_URL``, the
model settings).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from . import bus as busmod
from .clustering import MIN_SIZE, ClusterSummary, cluster_user
from .indexing import store_reembedded
from .publish import object_key, read_object
from .store import repository as repo

log = logging.getLogger("facecluster.reembed")


@dataclass
class ReembedSummary:
    model_version: str
    photos: int = 0  # re-embedded
    faces: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (user, uri, reason): old vectors kept
    clustered: dict[str, ClusterSummary] = field(default_factory=dict)
    seconds: float = 0.0


def stale_photo_count(sessions: sessionmaker[Session], model_version: str, users: Sequence[str]) -> int:
    """Photos the job would visit, for a progress bar."""
    with sessions() as session:
        found = [repo.find_user(session, name) for name in users]
        return sum(len(repo.photos_of_other_models(session, u.id, model_version)) for u in found if u)


def reembed_user(sessions: sessionmaker[Session], pipeline, store: Path, name: str, summary: ReembedSummary, *,
                 batch_size: int, max_bytes: int, progress: Callable[[int], object] | None = None) -> list[dict]:
    """Re-embed one user's stale photos, ``batch_size`` photos per pipeline call; returns the
    ``faces.indexed`` events of the photos re-embedded."""
    version = pipeline.model_version
    with sessions() as session:
        user = repo.find_user(session, name)
        if user is None:
            raise LookupError(f"no user {name!r}")
        user_id = user.id
    events, after = [], 0
    while True:
        with sessions() as session:
            page = repo.photos_of_other_models(session, user_id, version, after_id=after, limit=batch_size)
            faces = repo.faces_of_other_models(session, user_id, [p for p, _, _ in page], version) if page else {}
        if not page:
            return events
        after = page[-1][0]
        items, owners = [], []
        for photo_id, uri, sha256 in page:
            data = read_object(store, object_key(sha256), sha256, max_bytes)
            if isinstance(data, str):
                summary.failures.append((name, uri, data.split(": ", 1)[1]))  # the uri says which object
                log.warning("cannot re-embed %s of %s: %s", uri, name, data)
                continue
            items.append((uri, data, np.stack([lm for _, lm in faces[photo_id]])))
            owners.append((photo_id, sha256, [face_id for face_id, _ in faces[photo_id]]))
        results = pipeline.reembed(items)
        stored = store_reembedded(sessions, user_id, [face_ids for _, _, face_ids in owners], results)
        for (photo_id, sha256, face_ids), r, ok in zip(owners, results, stored):
            if ok is None:
                summary.failures.append((name, r.key, r.error or "unknown"))
                log.warning("cannot re-embed %s of %s: %s", r.key, name, r.error)
            elif ok:  # (False: the photo was deleted meanwhile)
                events.append({"user": name, "photo_id": photo_id, "sha256": sha256, "face_ids": face_ids})
                summary.photos += 1
                summary.faces += len(face_ids)
        if progress:
            progress(len(page))


def reembed_library(sessions: sessionmaker[Session], pipeline, store: Path, bus: busmod.Bus, users: Sequence[str],
                    *, batch_size: int = 32, max_bytes: int, cluster: bool = True, max_distance: float = 0.0,
                    min_size: int = MIN_SIZE, progress: Callable[[int], object] | None = None) -> ReembedSummary:
    """Re-embed the stale photos of each user (``repository.users_with_other_models`` finds them
    all), re-cluster the user in the new space unless ``cluster`` is off, then announce the
    user's re-embedded photos on ``bus``."""
    t0 = time.perf_counter()
    summary = ReembedSummary(pipeline.model_version)
    for name in users:
        events = reembed_user(sessions, pipeline, store, name, summary, batch_size=batch_size,
                              max_bytes=max_bytes, progress=progress)
        with sessions() as session:
            if repo.find_user(session, name) is None:  # deleted meanwhile: nothing to file, no one to recreate
                log.info("user %s was deleted while being re-embedded", name)
                continue
        if cluster:
            summary.clustered[name] = cluster_user(sessions, name, pipeline.model_version,
                                                   max_distance=max_distance, min_size=min_size)
        bus.publish(busmod.INDEXED, [(name, e) for e in events])
    summary.seconds = time.perf_counter() - t0
    return summary
