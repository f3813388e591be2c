"""Batch re-clustering: a user's faces clustered again from scratch, through the rules layer.

``recluster_user`` is the one function behind ``facecluster recluster --user U | --all`` and the
recluster worker (``python -m services.recluster_worker``, fed by ``recluster.requested``). It
clusters with the cluster job's own rule (``services.clustering.recluster``: the calibrated cut,
``min_cluster_size``) and files the result with ``persons.service.apply_clustering``, so person
ids are kept by overlap (the assignment of clusters to persons that keeps the most faces where
they were) and names, hidden flags, favourites, covers, the user's own links, merges, splits and
"not this person" all survive; nothing here decides about persons itself.

One user is one transaction, holding the user's edit lock (an edit by hand waits for it, and it
for the edit). Before committing it compares the user's persons and links with what they were
and writes that difference down as the user's :class:`Plan`: persons created, deleted, merged,
split or changed, faces moved. An empty plan is rolled back, so re-clustering a clustered user
changes nothing at all (not even the clustering revision); a dry run rolls back every plan.
A run killed at any point has committed whole users only, and running it again finds the users
done already with empty plans: nothing is done twice in effect.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from facecore.cluster import calibrated_distance

from .clustering import MIN_SIZE, recluster
from .persons import repository as persons_repo
from .store import repository as repo
from .store.models import Person, User
from .store.repository import NotFound

log = logging.getLogger(__name__)

RACES = 3  # tries per user while a concurrent writer (the cluster worker) collides with it
# Below this many faces the clustering's kNN runs on one thread: starting faiss's OpenMP team for
# a handful of vectors cost more than the whole search (100 -> 34 ms per 5-face user on a busy
# 2-core machine, docs/BENCHMARKS.md), and a population of small users is the common case.
ONE_THREAD_FACES = 2000

# What the plan reports of a person besides its faces.
_FIELDS = ("name", "hidden", "favorite", "user_confirmed", "cover_face_id")


@dataclass
class Plan:
    """What re-clustering one user changes (or, in a dry run, would change).

    Persons are referred to by id; a person a dry run would create has no id yet and is
    called ``"new-1"``, ``"new-2"``... ``None`` is "in no person"."""

    user: str
    faces: int = 0  # the faces clustered
    model_version: str | None = None
    created: list[dict] = field(default_factory=list)  # {"person": ref, "faces": n}
    deleted: list[dict] = field(default_factory=list)  # {"person": id, "name": str | None, "faces": n}
    merged: list[dict] = field(default_factory=list)  # {"into": ref, "from": [id, ...]}
    split: list[dict] = field(default_factory=list)  # {"person": id, "into": [ref, ...]}
    changed: list[dict] = field(default_factory=list)  # {"person": id, field: [before, after], ...}
    moved: list[dict] = field(default_factory=list)  # {"face": id, "from": ref | None, "to": ref | None}
    seconds: float = 0.0

    @property
    def empty(self) -> bool:
        return not (self.created or self.deleted or self.merged or self.split or self.changed or self.moved)

    def counts(self) -> dict[str, int]:
        return {"created": len(self.created), "merged": len(self.merged), "split": len(self.split),
                "deleted": len(self.deleted), "changed": len(self.changed), "moved": len(self.moved)}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        c = self.counts()
        if self.empty:
            return f"{self.user}: {self.faces} faces, nothing to change"
        return (f"{self.user}: {self.faces} faces; persons {c['created']} created, {c['merged']} merged, "
                f"{c['split']} split, {c['deleted']} deleted, {c['changed']} changed; {c['moved']} faces moved")


@dataclass
class Summary:
    users: int = 0
    changed_users: int = 0
    missing_users: list[str] = field(default_factory=list)
    faces: int = 0
    created: int = 0
    merged: int = 0
    split: int = 0
    deleted: int = 0
    changed: int = 0
    moved: int = 0
    seconds: float = 0.0

    def add(self, plan: Plan) -> None:
        self.users += 1
        self.changed_users += not plan.empty
        self.faces += plan.faces
        for key, n in plan.counts().items():
            setattr(self, key, getattr(self, key) + n)

    def line(self, dry_run: bool) -> str:
        verb = "would change" if dry_run else "changed"
        return (f"{self.users} users re-clustered ({self.faces} faces) in {self.seconds:.1f}s: {verb} "
                f"{self.changed_users} users; persons {self.created} created, {self.merged} merged, "
                f"{self.split} split, {self.deleted} deleted, {self.changed} changed; {self.moved} faces moved"
                + (f"; {len(self.missing_users)} users not found" if self.missing_users else ""))


# ------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class _State:
    persons: dict[int, tuple]  # id -> _FIELDS values
    links: dict[int, int]  # face id -> person id


def _state(session: Session, user_id: int) -> _State:
    session.flush()
    columns = [getattr(Person, f) for f in _FIELDS]
    persons = {row[0]: tuple(row[1:]) for row in session.execute(
        sa.select(Person.id, *columns).where(Person.user_id == user_id).execution_options(populate_existing=True))}
    return _State(persons, persons_repo.face_links(session, user_id))


def _diff(user: str, before: _State, after: _State, *, provisional: bool) -> Plan:
    plan = Plan(user)
    created = sorted(set(after.persons) - set(before.persons))
    ref: dict[int | None, Any] = {p: p for p in set(before.persons) | set(after.persons)}
    ref[None] = None
    if provisional:
        ref.update({p: f"new-{i}" for i, p in enumerate(created, 1)})
    faces = set(before.links) | set(after.links)
    moved = sorted(f for f in faces if before.links.get(f) != after.links.get(f))
    plan.moved = [{"face": f, "from": ref[before.links.get(f)], "to": ref[after.links.get(f)]} for f in moved]

    # Where the faces of each old person went, and where those of each new one came from
    # (faces in no person before or after do not count: a person that takes in new faces
    # is not merged, one that loses faces to nobody is not split).
    went: dict[int, set] = defaultdict(set)
    came: dict[int, set] = defaultdict(set)
    for f in faces:
        old, new = before.links.get(f), after.links.get(f)
        if old is not None and new is not None:
            went[old].add(new)
            came[new].add(old)
    count_after = defaultdict(int)
    for p in after.links.values():
        count_after[p] += 1
    count_before = defaultdict(int)
    for p in before.links.values():
        count_before[p] += 1
    plan.created = [{"person": ref[p], "faces": count_after[p]} for p in created]
    plan.deleted = [{"person": p, "name": before.persons[p][0], "faces": count_before[p]}
                    for p in sorted(set(before.persons) - set(after.persons))]
    plan.merged = [{"into": ref[p], "from": sorted(came[p])} for p in sorted(came) if len(came[p]) > 1]
    plan.split = [{"person": p, "into": sorted((ref[q] for q in went[p]), key=str)}
                  for p in sorted(went) if len(went[p]) > 1]
    for p in sorted(set(before.persons) & set(after.persons)):
        change = {f: [b, a] for f, b, a in zip(_FIELDS, before.persons[p], after.persons[p]) if b != a}
        if change:
            plan.changed.append({"person": p, **change})
    return plan


# ------------------------------------------------------------------------------ one user


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """faiss's OpenMP threads set to ``n`` (None: left alone) for the block."""
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _recluster_once(sessions: sessionmaker[Session], user_name: str, *, dry_run: bool, max_distance: float,
                    min_size: int) -> Plan:
    t0 = time.perf_counter()
    with sessions() as session:
        user = repo.find_user(session, user_name)
        if user is None:
            raise NotFound(f"user {user_name!r}")
        persons_repo.lock_edits(session, user.id)
        before = _state(session, user.id)
        version = repo.main_model_version(session, user.id)
        face_ids, x = repo.user_embeddings(session, user.id, model_version=version)
        if version is not None:  # None: the user has no embedded face, so nothing to cluster
            cut = max_distance or calibrated_distance(version)
            with _threads(1 if len(face_ids) < ONE_THREAD_FACES else None):
                recluster(session, user.id, face_ids, x, cut, min_size=min_size)
        plan = _diff(user_name, before, _state(session, user.id), provisional=dry_run)
        plan.faces, plan.model_version = len(face_ids), version
        if dry_run or plan.empty:
            session.rollback()  # an empty plan leaves even the clustering revision alone
        else:
            session.commit()
    plan.seconds = time.perf_counter() - t0
    return plan


def recluster_user(sessions: sessionmaker[Session], user_name: str, *, dry_run: bool = False,
                   max_distance: float = 0.0, min_size: int = MIN_SIZE) -> Plan:
    """Re-cluster one user's faces of their main model version in one transaction and return
    the plan (what changed; with ``dry_run``, what would change, and nothing is written).

    ``max_distance`` 0 takes the cut calibrated for the model version. Raises ``NotFound`` for
    an unknown user. A collision with a concurrent writer of the same faces (the cluster
    worker linking a new face meanwhile) rolls back and tries again."""
    for attempt in range(1, RACES + 1):
        try:
            return _recluster_once(sessions, user_name, dry_run=dry_run, max_distance=max_distance, min_size=min_size)
        except IntegrityError:
            if attempt == RACES:
                raise
            log.warning("re-clustering %s collided with another writer; trying again", user_name, exc_info=True)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------ many users


def user_names(sessions: sessionmaker[Session]) -> list[str]:
    """Every user, oldest first."""
    with sessions() as session:
        return list(session.scalars(sa.select(User.name).order_by(User.id)))


def recluster_users(sessions: sessionmaker[Session], names: Iterable[str], *, dry_run: bool = False,
                    max_distance: float = 0.0, min_size: int = MIN_SIZE,
                    on_plan: Callable[[Plan], None] | None = None) -> tuple[Summary, list[Plan]]:
    """``recluster_user`` for each name in turn (a user deleted meanwhile is counted as missing)."""
    t0 = time.perf_counter()
    summary, plans = Summary(), []
    for name in names:
        try:
            plan = recluster_user(sessions, name, dry_run=dry_run, max_distance=max_distance, min_size=min_size)
        except NotFound:
            summary.missing_users.append(name)
            log.warning("user %r not found; skipped", name)
            continue
        summary.add(plan)
        plans.append(plan)
        log.info("%s", plan.line())
        if on_plan is not None:
            on_plan(plan)
    summary.seconds = time.perf_counter() - t0
    return summary, plans


def plans_json(summary: Summary, plans: list[Plan], *, dry_run: bool) -> str:
    """The file ``--out`` writes: the summary and every user's plan that changes something."""
    return json.dumps({"dry_run": dry_run, "summary": asdict(summary),
                       "users": [p.as_dict() for p in plans if not p.empty]}, indent=1, default=str)
