"""Cluster job: all of one user's usable faces -> person albums, keeping what the user said.

Re-clustering maps new clusters onto existing person ids (repository), so names,
hidden flags and covers survive a model upgrade or a re-run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from facecore.cluster import calibrated_distance, cluster

from .persons import service as person_service
from .store import repository as repo

log = logging.getLogger(__name__)


@dataclass
class ClusterSummary:
    faces: int
    clusters: int
    persons: int
    unassigned: int
    seconds: float


def cluster_user(sessions: sessionmaker[Session], user_name: str, model_version: str, *,
                 max_distance: float = 0.0, min_size: int = 1) -> ClusterSummary:
    """Faces of other model versions are left as they are: their vectors are not comparable.
    ``max_distance`` 0 takes the cut calibrated for ``model_version``'s embedder."""
    t0 = time.perf_counter()
    with sessions() as session:
        user = repo.get_or_create_user(session, user_name)
        face_ids, x = repo.user_embeddings(session, user.id, model_version=model_version)
        photo_of = repo.face_photo_ids(session, user.id, face_ids)
        photos = np.array([photo_of[int(f)] for f in face_ids], np.int64)
        cut = max_distance or calibrated_distance(model_version)
        labels = cluster(x, cut, min_size=min_size, photos=photos)
        assigned = {int(f): int(l) for f, l in zip(face_ids, labels) if l >= 0}
        person_service.apply_clustering(session, user.id, assigned)
        session.commit()
        persons = repo.user_summary(session, user.id)["persons"]
    n_clusters = len(set(assigned.values()))
    summary = ClusterSummary(faces=len(face_ids), clusters=n_clusters, persons=persons,
                             unassigned=len(face_ids) - len(assigned), seconds=time.perf_counter() - t0)
    log.info("clustered %d faces of %s (%s, cut %.2f) into %d clusters in %.1fs", summary.faces, user_name,
             model_version, cut, n_clusters, summary.seconds)
    return summary

