"""Cluster worker: consumes ``faces.indexed`` and files new faces under persons as they arrive.

It follows the batch job's rules (docs/ARCHITECTURE.md, "One clustering policy"): while a user
has at most ``recluster_max_faces`` clusterable faces (``FACECLUSTER_RECLUSTER_MAX_FACES``), each
batch of theirs re-clusters them from scratch with the cluster job's own function
(``services.clustering.recluster``: same cut, same ``min_cluster_size``, person ids kept by
overlap), so the same photos give the same albums as ``facecluster run``. Re-clustering a whole
library for every upload does not scale, so above that the worker is incremental:

- a new face joins an existing person by ``facecore.assign``'s rule: the mean similarity of
  its ``top_k`` nearest faces of that person (kNN over the user's assigned faces, exact up to
  ``facecore.assign.EXACT_MAX_FACES``, a PQ scan re-ranked exactly beyond) exceeds
  ``1 - max_distance``, with the cut average linkage uses in the batch job (calibrated per
  embedder, ``facecore.cluster``);
- faces that join nobody wait in the user's unassigned pool; ``facecore.graph_cluster`` runs
  over the new ones and the pool faces near them (see ``ClusterWorker._new_persons``) and
  every cluster of at least ``min_faces`` (``min_cluster_size``, as in the batch job) becomes
  a new person.

Events are keyed by user, so a user's faces all arrive in one partition and one worker owns
them; it keeps the user's faces in memory while it owns the partition and forgets them when
the partition is revoked (another worker will change them). The copies together hold at most
``FACECLUSTER_CLUSTER_CACHE_MB``; the least recently used users are dropped first and read
again from the database with their next faces. Writes go through the repository
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
from collections import Counter, OrderedDict
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import faiss
import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from facecore.assign import TOP_K, FaceIndex, assign, one_per_photo
from facecore.cluster import KNN, LOOSE_SIMILARITY, calibrated_distance
from facecore.graph_cluster import graph_cluster
from facecore.settings import Settings

from .. import bus as busmod
from ..bus import Bus, Message, dead_letter, retry, worker_args
from ..clustering import recluster
from ..persons import repository as persons_repo
from ..persons import service as person_service
from ..runner import Hooks, describe_settings, run_worker
from ..settings import ClusterWorkerSettings
from ..store import repository as repo
from ..store.models import User
from ..store.repository import NotFound

log = logging.getLogger("facecluster.cluster_worker")

GROUP = "cluster"
MIN_FACES = Settings.model_fields["min_cluster_size"].default
RECLUSTER_MAX_FACES = Settings.model_fields["recluster_max_faces"].default
CACHE_MB = ClusterWorkerSettings.model_fields["cluster_cache_mb"].default
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
    index: FaceIndex | None  # their embeddings and person ids, same order
    pool_ids: np.ndarray  # (m,) face ids in no person
    pool_x: np.ndarray  # (m, d) their embeddings

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
        state = cls(partition, model_version, revision, np.zeros(0, np.int64), None, np.zeros(0, np.int64),
                    np.zeros((0, x.shape[1] if x.ndim == 2 else 0), np.float32))
        if len(ids):
            state.add(ids[linked], np.array([links[int(i)] for i in ids[linked]], np.int64), x[linked])
            state.pool_ids, state.pool_x = np.asarray(ids[~linked], np.int64), np.asarray(x[~linked], np.float32)
        return state

    @property
    def person_of(self) -> np.ndarray:
        """(n,) the person of each assigned face."""
        return self.index.labels if self.index is not None else np.zeros(0, np.int64)

    @property
    def faces(self) -> int:
        return len(self.assigned_ids) + len(self.pool_ids)

    @property
    def nbytes(self) -> int:
        """What the copy holds in memory: the index (vectors, persons), the face ids, the pool."""
        return ((self.index.nbytes if self.index is not None else 0) + self.assigned_ids.nbytes
                + self.pool_ids.nbytes + self.pool_x.nbytes)

    def add(self, face_ids: np.ndarray, person_ids: np.ndarray, x: np.ndarray) -> None:
        if len(face_ids):
            if self.index is None:
                self.index = FaceIndex(x.shape[1])
            self.index.add(x, person_ids)
            self.assigned_ids = np.concatenate([self.assigned_ids, face_ids])


class ClusterWorker:
    def __init__(self, bus: Bus, sessions: sessionmaker[Session], stop: threading.Event, *,
                 max_distance: float = 0.0, top_k: int = TOP_K, min_faces: int = MIN_FACES,
                 recluster_max_faces: int = RECLUSTER_MAX_FACES, cache_mb: float = CACHE_MB):
        """``max_distance`` 0 takes the cut calibrated for each model version's embedder;
        ``recluster_max_faces`` 0 files every user's faces incrementally; ``cache_mb`` bounds
        the users' copies kept in memory (``FACECLUSTER_CLUSTER_CACHE_MB``)."""
        self.bus, self.sessions, self.stop = bus, sessions, stop
        self.max_distance, self.top_k, self.min_faces = max_distance, top_k, min_faces
        self.recluster_max_faces = recluster_max_faces
        self.cache_limit = int(cache_mb * 2**20)
        self.users: OrderedDict[str, _UserFaces] = OrderedDict()  # least recently used first
        self.evictions = 0
        self._swept = time.monotonic()

    @property
    def cache_bytes(self) -> int:
        return sum(state.nbytes for state in self.users.values())

    def _keep(self, name: str, state: _UserFaces) -> None:
        """Keep ``state`` as the most recently used copy and drop the least recently used
        others until the copies fit in ``cache_limit``; a user who alone does not fit has been
        served and is dropped too. A dropped user is read from the database again when their
        next faces arrive: it costs time, never a different result."""
        self.users[name] = state
        self.users.move_to_end(name)
        total = self.cache_bytes
        while total > self.cache_limit and next(iter(self.users)) != name:
            _, old = self.users.popitem(last=False)
            total -= old.nbytes
            self.evictions += 1
        if total > self.cache_limit:
            del self.users[name]
            self.evictions += 1
            log.warning("%s's copy (%.0f MB) is larger than the cache (FACECLUSTER_CLUSTER_CACHE_MB=%.0f): "
                        "served, not kept", name, total / 2**20, self.cache_limit / 2**20)

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
        """face id -> person id for the new faces close enough to one person's faces, by
        ``facecore.assign``'s rule (of two faces of one photo that pick the same person only
        the closer one joins; never a person the face was rejected from)."""
        rejected = rejected or {}
        if state.index is None or state.index.ntotal == 0 or not len(ids):
            return {}
        sims, idx = state.index.search(x, KNN)
        person, score = assign(sims, idx, state.index.labels, self.cut(state.model_version), self.top_k,
                               [rejected.get(int(f), ()) for f in ids])
        photos = np.array([photo_of.get(int(f), -1 - int(f)) for f in ids], np.int64)
        joins = one_per_photo(photos, person, score)
        return dict(zip(ids[joins].tolist(), person[joins].tolist()))

    def _new_persons(self, pool_ids: np.ndarray, pool_x: np.ndarray, new_ids: np.ndarray,
                     photo_ids: Callable[[list[int]], dict[int, int]], model_version: str) -> list[list[int]]:
        """Groups of pooled faces, at most one per photo, that agree with each other well
        enough to be a person, among the new faces and the pool faces near them.

        The batch job's clustering (``facecore.graph_cluster``: cut, ``min_faces``, one
        person per photo) runs over the new faces of the pool, the pool faces among their
        ``KNN`` nearest at ``LOOSE_SIMILARITY`` or more (what links faces into one component
        there), and the pool faces close enough (``1 - cut``) to one of those that are close
        enough to a new face. A pool face with no new face near it therefore cannot form a new
        person this batch (clustering the whole pool would have let it); pool faces that agree
        were normally clustered together when the last of them was new. Nothing else changes,
        and a batch costs a search of the pool instead of clustering it all."""
        fresh = np.isin(pool_ids, new_ids)
        if len(pool_ids) < self.min_faces or not fresh.any():
            return []
        cut = self.cut(model_version)
        k = min(KNN, len(pool_ids))

        def near(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return faiss.knn(pool_x[rows], pool_x, k, metric=faiss.METRIC_INNER_PRODUCT)

        new_rows = np.flatnonzero(fresh)
        sims, idx = near(new_rows)
        rows = np.union1d(new_rows, idx[(sims >= LOOSE_SIMILARITY) & (idx >= 0)])
        close = np.setdiff1d(idx[(sims >= 1.0 - cut) & (idx >= 0)], new_rows)
        if len(close):
            sims, idx = near(close)
            rows = np.union1d(rows, idx[(sims >= 1.0 - cut) & (idx >= 0)])
        ids = pool_ids[rows]
        photo_of = photo_ids(ids.tolist())
        photos = np.array([photo_of.get(int(i), -1 - j) for j, i in enumerate(ids)], np.int64)
        labels = graph_cluster(pool_x[rows], cut, min_size=self.min_faces, photos=photos)
        return [sorted(int(i) for i in ids[labels == label]) for label in np.unique(labels[labels >= 0])]

    def _small(self, state: _UserFaces, new_ids: np.ndarray) -> bool:
        """Whether the user, with ``new_ids``, has at most ``recluster_max_faces`` faces."""
        added = int(np.isin(new_ids, state.pool_ids, invert=True).sum())
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
        self._keep(name, _UserFaces.of(partition, version, now, ids, x, links))
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
                if state is not None:
                    self.users.move_to_end(name)
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
                photo_of = repo.face_photo_ids(session, user.id, new_ids.tolist())
                rejected = persons_repo.rejected_persons(session, user.id, new_ids.tolist())
                wanted = self._assign(state, new_ids, new_x, photo_of, rejected)
                links = person_service.link_new_faces(session, user.id, wanted)
                waiting = np.array([int(i) not in links for i in new_ids], bool)
                old = ~np.isin(state.pool_ids, new_ids)  # a face announced again is in new_ids
                pool_ids = np.concatenate([state.pool_ids[old], new_ids[waiting]])
                pool_x = np.concatenate([state.pool_x[old], np.asarray(new_x[waiting], np.float32)])
                persons = []
                for group in self._new_persons(pool_ids, pool_x, new_ids,
                                               lambda f: repo.face_photo_ids(session, user.id, f), version):
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
                if persons:
                    row_of = {int(f): r for r, f in enumerate(pool_ids)}
                    for person_id, group, _ in persons:
                        state.add(np.array(group, np.int64), np.full(len(group), person_id, np.int64),
                                  pool_x[[row_of[f] for f in group]])
                    left = ~np.isin(pool_ids, [f for _, group, _ in persons for f in group])
                    pool_ids, pool_x = pool_ids[left], pool_x[left]
                state.pool_ids, state.pool_x = pool_ids, pool_x
                self._keep(name, state)
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
        describe_settings(parser, Settings, ClusterWorkerSettings)

    settings = Settings()
    args = worker_args("python -m services.cluster_worker", __doc__.split("\n\n")[0], GROUP,
                       "consumer group (workers of one group share the users)", argv, options)

    def build(bus: Bus, sessions: sessionmaker[Session], resources: ExitStack):
        # A batch searches a few faces at a time: faiss's OpenMP team of one thread per core
        # costs more than it gives, and on a busy host a search waits for every thread of it
        # (benchmarks/scale.py measured 0.4 ms a face on one thread, 8 ms on two, 2 cores busy).
        faiss.omp_set_num_threads(1)
        worker = ClusterWorker(bus, sessions, stop, max_distance=settings.cluster_threshold,
                               top_k=args.top_k, min_faces=args.min_faces,
                               recluster_max_faces=settings.recluster_max_faces,
                               cache_mb=ClusterWorkerSettings().cluster_cache_mb)
        return Hooks(worker.handle, worker.on_revoke, worker.sweep)

    return run_worker(settings, stop, busmod.INDEXED, args.group, build, log)
