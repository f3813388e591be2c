"""Cluster job: all of one user's usable faces -> person albums, keeping what the user said.

Re-clustering maps new clusters onto existing person ids (``persons.service.apply_clustering``),
so names, hidden flags and covers survive a model upgrade or a re-run. :func:`recluster` is the one
clustering rule: the cluster worker applies it too while a user is small enough
(docs/ARCHITECTURE.md, "One clustering policy").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from facecore.cluster import calibrated_distance
from facecore.graph_cluster import graph_cluster
from facecore.settings import Settings

from .persons import service as person_service
from .store import repository as repo

log = logging.getLogger(__name__)

MIN_SIZE = Settings.model_fields["min_cluster_size"].default


@dataclass
class ClusterSummary:
    faces: int
    clusters: int
    persons: int
    unassigned: int
    seconds: float


def recluster(session: Session, user_id: int, face_ids: np.ndarray, x: np.ndarray, cut: float, *,
              min_size: int = MIN_SIZE) -> tuple[dict[int, int], dict[int, int]]:
    """Cluster ``face_ids`` (the user's clusterable faces of one model version, vectors ``x``)
    from scratch and make the result the user's automatic links; the caller commits.

    A cluster becomes a person when it has at least ``min_size`` faces; the other faces are in
    no person. Returns (face id -> cluster label for the faces in a cluster, label -> person id)."""
    photo_of = repo.face_photo_ids(session, user_id, face_ids)
    photos = np.array([photo_of[int(f)] for f in face_ids], np.int64)
    # cluster.cluster's labels up to 20,000 faces; bounded memory and time beyond (a million faces)
    labels = graph_cluster(x, cut, min_size=min_size, photos=photos)
    assigned = {int(f): int(l) for f, l in zip(face_ids, labels) if l >= 0}
    return assigned, person_service.apply_clustering(session, user_id, assigned)


def cluster_user(sessions: sessionmaker[Session], user_name: str, model_version: str, *,
                 max_distance: float = 0.0, min_size: int = MIN_SIZE) -> ClusterSummary:
    """Faces of other model versions are left as they are: their vectors are not comparable.
    ``max_distance`` 0 takes the cut calibrated for ``model_version``'s embedder."""
    t0 = time.perf_counter()
    with sessions() as session:
        user = repo.get_or_create_user(session, user_name)
        face_ids, x = repo.user_embeddings(session, user.id, model_version=model_version)
        cut = max_distance or calibrated_distance(model_version)
        assigned, _ = recluster(session, user.id, face_ids, x, cut, min_size=min_size)
        session.commit()
        persons = repo.user_summary(session, user.id)["persons"]
    n_clusters = len(set(assigned.values()))
    summary = ClusterSummary(faces=len(face_ids), clusters=n_clusters, persons=persons,
                             unassigned=len(face_ids) - len(assigned), seconds=time.perf_counter() - t0)
    log.info("clustered %d faces of %s (%s, cut %.2f) into %d clusters in %.1fs", summary.faces, user_name,
             model_version, cut, n_clusters, summary.seconds)
    return summary
