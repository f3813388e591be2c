"""Cluster worker: consumes ``faces.indexed`` and files new faces under persons as they arrive.

It follows the batch job's rules (docs/ARCHITECTURE.md, "One clustering policy"): while a user
has at most ``recluster_max_faces`` clusterable faces (``FACECLUSTER_RECLUSTER_MAX_FACES``), each
batch of theirs re-clusters them from scratch with the cluster job's own function
(``services.clustering.recluster``: same cut, same ``min_cluster_size``, person ids kept by
overlap), so the same photos give the same albums as ``facecluster run``. Re-clustering a whole
library for every upload does not scale, so above that the worker is incremental:

- a new face joins an existing person when the mean similarity of its ``top_k`` nearest faces
  of that person (faiss kNN over the user's assigned faces) exceeds ``1 - max_distance``, with
  the cut average linkage uses in the batch job (calibrated per embedder, ``facecore.cluster``);
- faces that join nobody wait in the user's unassigned pool; ``facecore.cluster.cluster`` runs
  over that pool and every cluster of at least ``min_faces`` (``min_cluster_size``, as in the
  batch job) becomes a new person.

Events are keyed by user, so a user's faces all arrive in one partition and one worker owns
them; it keeps the user's faces in memory while it owns the partition and forgets them when
the partition is revoked (another worker will change them). Writes go through the repository
(auto links, new persons) in one transaction per user and batch. Every step is idempotent: a
face already linked is skipped. The copy is read again after a restart, when the user's
``clustering_revision`` moved (everyone else who changes faces, vectors or links moves it: a
deleted photo, a merge or a moved face, a batch re-cluster, the re-embedding job), and when a
write of its own finds the database changed under it (a person went away meanwhile). Every
``SWEEP_S`` it also drops the copies of users deleted or changed since, busy or idle, so a
deleted photo's or user's embeddings do not live on in its memory either.

Run: ``python -m services.cluster_worker``. The batch job (``facecluster cluster``) can still
re-cluster a user from scratch; this worker then carries on from its result.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass

import faiss
import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from facecore.cluster import KNN, calibrated_distance, cluster
from facecore.settings import Settings

from .. import bus as busmod
from ..bus import Bus, Message, dead_letter, retry, worker_args
from ..clustering import recluster
from ..persons import repository as persons_repo
from ..persons import service as person_service
from ..runner import Hooks, describe_settings, run_worker
from ..store import repository as repo
from ..store.models import User
from ..store.repository import NotFound

log = logging.getLogger("facecluster.cluster_worker")

GROUP = "cluster"
TOP_K = 3
MIN_FACES = Settings.model_fields["min_cluster_size"].default
RECLUSTER_MAX_FACES = Settings.model_fields["recluster_max_faces"].default
SWEEP_S = 30.0
RACES = 3  # re-clustering tries per user and batch while edits overtake it


class _Raced(Exception):
    """The user changed while the worker re-clustered them; nothing was written."""


@dataclass
class _UserFaces:
    """One user's clusterable faces of one model version, as of the last commit."""

    partition: int
    model_version: str
    revision: int  # the user's clustering_revision this copy was read at
    assigned_ids: np.ndarray  # (n,) face ids that belong to a person
    person_of: np.ndarray  # (n,) their person ids
    index: faiss.IndexFlatIP  # their embeddings, same order
    unassigned: dict[int, np.ndarray]

    @classmethod
    def load(cls, session: Session, user: User, partition: int, model_version: str) -> _UserFaces:
        """``user`` as read at the start of the transaction: its revision is never newer than
        the faces read here."""
        ids, x = repo.user_embeddings(session, user.id, model_version=model_version)
        return cls.of(partition, model_version, user.clustering_revision, ids, x,
                      persons_repo.face_links(session, user.id))

    @classmethod
    def of(cls, partition: int, model_version: str, revision: int, ids: np.ndarray, x: np.ndarray,
           links: dict[int, int]) -> _UserFaces:
        """The copy of faces ``ids`` (vectors ``x``) with the person ``links`` (face id -> person id)."""
        linked = np.array([int(i) in links for i in ids], dtype=bool)
        state = cls(partition, model_version, revision, np.zeros(0, np.int64), np.zeros(0, np.int64), None, {})
        if len(ids):
            state.index = faiss.IndexFlatIP(x.shape[1])
            state.add(ids[linked], np.array([links[int(i)] for i in ids[linked]], np.int64), x[linked])
            state.unassigned = {int(i): v for i, v, done in zip(ids, x, linked) if not done}
        return state

    @property
    def faces(self) -> int:
        return len(self.assigned_ids) + len(self.unassigned)

    def add(self, face_ids: np.ndarray, person_ids: np.ndarray, x: np.ndarray) -> None:
        if len(face_ids):
            if self.index is None:
                self.index = faiss.IndexFlatIP(x.shape[1])
            self.index.add(np.ascontiguousarray(x, dtype=np.float32))
            self.assigned_ids = np.concatenate([self.assigned_ids, face_ids])
            self.person_of = np.concatenate([self.person_of, person_ids])


class ClusterWorker:
    def __init__(self, bus: Bus, sessions: sessionmaker[Session], stop: threading.Event, *,
                 max_distance: float = 0.0, top_k: int = TOP_K, min_faces: int = MIN_FACES,
                 recluster_max_faces: int = RECLUSTER_MAX_FACES):
        """``max_distance`` 0 takes the cut calibrated for each model version's embedder;
        ``recluster_max_faces`` 0 files every user's faces incrementally."""
        self.bus, self.sessions, self.stop = bus, sessions, stop
        self.max_distance, self.top_k, self.min_faces = max_distance, top_k, min_faces
        self.recluster_max_faces = recluster_max_faces
        self.users: dict[str, _UserFaces] = {}
        self._swept = time.monotonic()

    def cut(self, model_version: str) -> float:
        return self.max_distance or calibrated_distance(model_version)

    def sweep(self, *, now: bool = False) -> None:
        """Forget the copies of users deleted or changed since they were read (at most every
        ``SWEEP_S`` unless ``now``); a changed one is read again with its next event."""
        if not self.users or not (now or time.monotonic() - self._swept >= SWEEP_S):
            return

        def read() -> dict[str, int]:
            with self.sessions() as session:
                return repo.clustering_revisions(session, list(self.users))

        current = retry(read, "sweeping cached users", self.stop)
        stale = [name for name, state in self.users.items() if current.get(name) != state.revision]
        for name in stale:
            del self.users[name]
        self._swept = time.monotonic()
        if stale:
            log.info("forgot %d of %d cached users (deleted or changed since read)", len(stale),
                     len(self.users) + len(stale))

    def on_revoke(self, partitions: set[int]) -> None:
        """Forget the users of partitions another worker takes over."""
        for name in [n for n, s in self.users.items() if s.partition in partitions]:
            del self.users[name]

    def _assign(self, state: _UserFaces, ids: np.ndarray, x: np.ndarray, photo_of: dict[int, int],
                rejected: dict[int, set[int]] | None = None) -> dict[int, int]:
        """face id -> person id for the new faces close enough to one person's faces; of two
        faces of one photo that pick the same person, only the closer one joins it. A face never
        picks a person it was rejected from (``rejected``: face id -> person ids, "not this
        person"); the closest of the others may take it."""
        rejected = rejected or {}
        if state.index is None or state.index.ntotal == 0 or not len(ids):
            return {}
        cut = self.cut(state.model_version)
        sims, idx = state.index.search(np.ascontiguousarray(x, dtype=np.float32), min(KNN, state.index.ntotal))
        chosen: dict[tuple[int, int], tuple[int, float]] = {}  # (photo, person) -> (face, score)
        for face_id, row_sims, row_idx in zip(ids, sims, idx):
            best: dict[int, list[float]] = {}
            never = rejected.get(int(face_id), ())
            for sim, j in zip(row_sims, row_idx):  # nearest first
                if j >= 0 and int(state.person_of[j]) not in never:
                    near = best.setdefault(int(state.person_of[j]), [])
                    if len(near) < self.top_k:
                        near.append(float(sim))
            if not best:
                continue
            person, score = max(((p, float(np.mean(s))) for p, s in best.items()), key=lambda ps: ps[1])
            if score > 1.0 - cut:
                key = (photo_of.get(int(face_id), -1 - int(face_id)), person)
                if key not in chosen or score > chosen[key][1]:
                    chosen[key] = (int(face_id), score)
        return {face_id: person for (_, person), (face_id, _) in chosen.items()}

    def _new_persons(self, pool: dict[int, np.ndarray], photo_of: dict[int, int], model_version: str
                     ) -> list[list[int]]:
        """Groups of pooled faces, at most one per photo, that agree with each other well
        enough to be a person."""
        if len(pool) < self.min_faces:
            return []
        ids = np.fromiter(pool, dtype=np.int64, count=len(pool))
        photos = np.array([photo_of.get(int(i), -1 - k) for k, i in enumerate(ids)], np.int64)
        labels = cluster(np.stack([pool[int(i)] for i in ids]), self.cut(model_version), min_size=self.min_faces,
                         photos=photos)
        return [sorted(int(i) for i in ids[labels == label]) for label in np.unique(labels[labels >= 0])]

    def _small(self, state: _UserFaces, new_ids: np.ndarray) -> bool:
        """Whether the user, with ``new_ids``, has at most ``recluster_max_faces`` faces."""
        added = sum(int(i) not in state.unassigned for i in new_ids)
        return state.faces + added <= self.recluster_max_faces

    def _recluster(self, session: Session, name: str, user_id: int, revision: int, partition: int, version: str,
                   state: _UserFaces, new_ids: np.ndarray) -> tuple[int, int] | None:
        """Re-cluster the user from scratch as the batch job does and commit: (new faces placed,
        persons made), or None when the user has faces of several model versions (a re-embedding
        under way): their vectors are not comparable, and the batch rule would unlink the faces
        of the other version, so those users are filed incrementally until the re-embedding job
        re-clusters them itself.

        The user's persons are locked first, in id order as an edit locks them, so an edit of the
        albums waits for the re-clustering or the re-clustering for it. Anything else that
        changed the user meanwhile (every writer of faces and links moves ``revision``, and the
        re-clustering moves it once) rolls it back: raises :class:`_Raced`, and the batch is
        read again."""
        try:
            persons_repo.get_persons(session, user_id, set(persons_repo.face_links(session, user_id).values()),
                                     lock=True)
            try:
                ids, x = repo.user_embeddings(session, user_id)
            except ValueError:
                return None
            before = set(state.person_of.tolist())
            assigned, person_of = recluster(session, user_id, ids, x, self.cut(version), min_size=self.min_faces)
            links = persons_repo.face_links(session, user_id)
            now = repo.clustering_revisions(session, [name]).get(name)
        except (NotFound, IntegrityError) as e:  # a person or face went away, a face was linked
            session.rollback()
            raise _Raced(str(e).splitlines()[0]) from e
        if now != revision + 1:
            session.rollback()
            raise _Raced(f"clustering revision {revision} -> {now}")
        session.commit()
        self.users[name] = _UserFaces.of(partition, version, now, ids, x, links)
        return sum(int(f) in links for f in new_ids), len(set(person_of.values()) - before)

    def _update_user(self, name: str, partition: int, face_ids: set[int], *, reclustering: bool = True
                     ) -> tuple[int, int, int]:
        """One transaction for one user's new faces: (faces seen, faces linked, persons made).
        ``reclustering`` off files them incrementally whatever the user's size."""
        seen = linked = made = 0
        with self.sessions() as session:
            user = repo.find_user(session, name)
            if user is None:  # deleted since the photo was indexed
                return seen, linked, made
            ids, versions, x = repo.face_embeddings(session, user.id, face_ids)
            for version in sorted(set(versions)):
                rows = np.array([v == version for v in versions])
                state = self.users.get(name)
                if (state is None or state.model_version != version
                        or state.revision != user.clustering_revision):
                    state = _UserFaces.load(session, user, partition, version)
                new = ~np.isin(ids[rows], state.assigned_ids)
                new_ids, new_x = ids[rows][new], x[rows][new]
                if reclustering and len(new_ids) and self._small(state, new_ids):
                    done = self._recluster(session, name, user.id, user.clustering_revision, partition, version,
                                           state, new_ids)
                    if done is not None:
                        seen, linked, made = seen + len(new_ids), linked + done[0], made + done[1]
                        continue
                photo_of = repo.face_photo_ids(session, user.id, [*new_ids.tolist(), *state.unassigned])
                rejected = persons_repo.rejected_persons(session, user.id, new_ids.tolist())
                wanted = self._assign(state, new_ids, new_x, photo_of, rejected)
                links = person_service.link_new_faces(session, user.id, wanted)
                pool = {i: v for i, v in state.unassigned.items() if i not in links}
                pool.update((int(i), v) for i, v in zip(new_ids, new_x) if int(i) not in links)
                persons = []
                for group in self._new_persons(pool, photo_of, version):
                    person_id, members = person_service.new_person(session, user.id, group)
                    persons.append((person_id, group, members))
                session.commit()
                seen, linked, made = seen + len(new_ids), linked + len(links), made + len(persons)

                if links != wanted or any(set(group) != members for _, group, members in persons):
                    # A person went away or a face was linked by someone else meanwhile: the
                    # cache is no longer the truth, so the next batch reads the database again.
                    self.users.pop(name, None)
                    continue
                if links:
                    by_id = dict(zip(new_ids.tolist(), new_x))
                    state.add(np.fromiter(links, np.int64), np.fromiter(links.values(), np.int64),
                              np.stack([by_id[f] for f in links]))
                for person_id, group, _ in persons:
                    state.add(np.array(group, np.int64), np.full(len(group), person_id, np.int64),
                              np.stack([pool.pop(f) for f in group]))
                state.unassigned = pool
                self.users[name] = state
        return seen, linked, made

    def _update_user_racing(self, name: str, partition: int, face_ids: set[int]) -> tuple[int, int, int]:
        """:meth:`_update_user`, read again while edits of the user's albums keep overtaking its
        re-clustering; after ``RACES`` tries the batch is filed incrementally (the next quiet
        batch re-clusters the user)."""
        for _ in range(RACES):
            try:
                return self._update_user(name, partition, face_ids)
            except _Raced as e:
                self.users.pop(name, None)
                log.info("re-clustering %s overtaken (%s); reading the user again", name, e)
        return self._update_user(name, partition, face_ids, reclustering=False)

    def handle(self, batch: list[Message]) -> None:
        started = time.perf_counter()
        self.sweep()
        dead = [dead_letter(m, m.error) for m in batch if m.error]
        by_user: dict[str, tuple[int, set[int]]] = {}
        for m in batch:
            if not m.error:
                by_user.setdefault(m.value["user"], (m.partition, set()))[1].update(m.value["face_ids"])
        totals = Counter()
        for name, (partition, face_ids) in by_user.items():
            seen, linked, made = retry(lambda: self._update_user_racing(name, partition, face_ids),
                                       f"clustering faces of {name}", self.stop)
            totals.update(seen=seen, linked=linked, persons=made)
        retry(lambda: self.bus.publish(busmod.DEAD, dead), "publishing photo.dead", self.stop)
        log.info("batch of %d (%d users): %d clusterable new faces, %d joined persons, %d new persons, "
                 "%d malformed; %.2fs", len(batch), len(by_user), totals["seen"], totals["linked"],
                 totals["persons"], len(dead), time.perf_counter() - started)


def main(stop: threading.Event, argv: list[str] | None = None) -> int:
    """``stop`` is set by SIGTERM/SIGINT; ``__main__`` installs that before importing this module."""

    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--top-k", type=int, default=TOP_K, help="nearest faces of a person that must agree")
        parser.add_argument("--min-faces", type=int, default=settings.min_cluster_size,
                            help="faces that make a new person (default: FACECLUSTER_MIN_CLUSTER_SIZE, %(default)s, "
                            "the batch job's)")
        describe_settings(parser)

    settings = Settings()
    args = worker_args("python -m services.cluster_worker", __doc__.split("\n\n")[0], GROUP,
                       "consumer group (workers of one group share the users)", argv, options)

    def build(bus: Bus, sessions: sessionmaker[Session], resources: ExitStack):
        worker = ClusterWorker(bus, sessions, stop, max_distance=settings.cluster_threshold,
                               top_k=args.top_k, min_faces=args.min_faces,
                               recluster_max_faces=settings.recluster_max_faces)
        return Hooks(worker.handle, worker.on_revoke, worker.sweep)

    return run_worker(settings, stop, busmod.INDEXED, args.group, build, log)
