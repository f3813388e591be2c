"""BCubed F1 on LFW-dev after a simulated user answers the questions the people page asks.

The page asks four kinds of question, each answered from the truth (the LFW folder of each
photo; a photo's labelled face is the one nearest the image centre, as the scorer decides):

- merge, "are these two people the same?" (``suggest.similar_pairs``: the library's most
  similar pair of persons not asked yet): yes -> ``service.merge`` into the person with more
  faces; no -> not asked again;
- face, "is this X?" for the face the clustering is least sure of (``suggest.least_sure_faces``):
  yes -> nothing to change, not asked again; no -> ``service.reject_face`` (the face is then
  in no person);
- loose face, "is this Y?" for the face in no person (alone in its cluster, too blurry to
  cluster, or sent away) most like a person it was not said not to be (centroid cosine, as
  ``suggest.nearest_person``): yes -> ``service.move_faces``; no -> not asked about that
  person again;
- lone pair, "are these two the same person?" for the two faces in no person most like each
  other (``suggest.similar_face_pairs``): yes -> ``service.split_faces`` (a new person of the
  two); no -> not asked again. Under ``min_cluster_size`` 2 a person's only face is in no
  person, and this is the only question that can join two of them.

A person's identity, to the simulated user, is the majority folder of its labelled faces. A
question about a face that is not a photo's labelled face, or a person with none, has no
answer in the truth: it is counted as an answer (a real user would spend one), changes nothing
and is not asked again.

Every edit goes through ``services.persons.service`` and is committed per answer. At each
budget (answers per 1,000 faces of the export) the library is exported with ``facecluster
export`` and scored by ``../shared/bench/lfw_score.py clusters``; a copy is then re-clustered with
``facecluster cluster``, exported and scored again, and every answer is checked against the
re-clustered library (two faces the user put together still together, a face the user sent away
not back), which is how "re-clustering keeps the user's corrections" is measured.

The index is made once, by the product (a few minutes on 2 cores), and copied for every run:

    .venv/bin/facecluster index ../shared/data/lfw-dev/images --db sqlite:///out/corrections/lfw-dev.db
    .venv/bin/facecluster cluster --db sqlite:///out/corrections/lfw-dev.db
    .venv/bin/python benchmarks/corrections.py --index out/corrections/lfw-dev.db --out out/corrections \\
        [--policy scored] [--budgets 0,10,50,200] [--svg docs/corrections.svg]

Policies (``--policy``, several comma-separated): ``merges``, ``faces``, ``loose`` (one kind
only; ``loose``: loose faces and lone pairs), ``alternate`` (the four kinds in turn),
``scored`` (the candidate furthest past the clustering's own line), ``adaptive`` (the kind
whose recent answers changed the most); see ``choose``.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facecore.settings import load_settings
from services.persons import repository as persons_repo
from services.persons import service
from services.persons.suggest import least_sure_faces, person_centroids, similar_face_pairs, similar_pairs
from services.store import repository as store
from services.store.db import make_engine, migrate, session_factory

from product import central_faces
from score import DEFAULT_DATA, score_clusters

REPO = Path(__file__).resolve().parents[1]
FACECLUSTER = [str(Path(sys.executable).parent / "facecluster")]
POLICIES = ("merges", "faces", "loose", "alternate", "scored", "adaptive")
WINDOW = 20  # "adaptive": answers of each kind it judges the kind by
FIGURES = ("bcubed_precision", "bcubed_recall", "bcubed_f1", "pairwise_precision", "pairwise_recall",
           "pairwise_f1", "clusters")
# "scored": each candidate is placed by how far it is past the line where the clustering's own
# decision sits, in cosine units; the furthest wins (see choose()).
LINE = 0.44        # 1 - the SFace cut 0.56: a similarity (person, loose face, lone pair) above it
FACE_LINE = 0.0    # a face as close to another person as to the rest of its own


# ------------------------------------------------------------------------------ the library


class Library:
    """The user's faces with vectors (read once: answers change links, never vectors), the truth
    of the labelled faces, the links as they are now, and what has been asked.

    The questions are the product's (``services.persons.suggest``), but recomputing them from
    scratch costs about a second per answer on 2 cores (every face against every person), and a
    run asks thousands. So the similarities (person x person, face x person) and each row's best
    are kept, and after an answer only the persons it touched are computed again;
    ``agree_with_suggest`` checks the questions this gives against ``suggest``'s own functions as
    the run goes.

    ``similarity`` "centroid" compares by cosine to a person's normalised mean vector, as
    ``suggest`` and the service do; "mean" by the mean similarity to a person's faces (average
    linkage's own measure, which the clustering cut was chosen on).
    """

    def __init__(self, user_id: int, face_ids: np.ndarray, x: np.ndarray, sharp: np.ndarray, photos: np.ndarray,
                 truth: dict[int, str], n_export: int, similarity: str = "centroid"):
        self.user_id, self.face_ids, self.x, self.sharp = user_id, face_ids, x.astype(np.float32), sharp
        self.photo = photos
        self.truth, self.n_export, self.similarity = truth, n_export, similarity
        self.row = {int(f): i for i, f in enumerate(face_ids)}
        self.selfdot = np.einsum("ij,ij->i", self.x, self.x)
        self.links: dict[int, int] = {}
        self.members: dict[int, list[int]] = {}
        self.col: dict[int, int] = {}           # person id -> column
        n, d = self.x.shape
        self.pid = np.zeros(0, np.int64)        # column -> person id
        self.own = np.full(n, -1)               # face row -> column of its person, -1: in no person
        self.sums = np.zeros((0, d))            # per column: sum of its sharp faces' vectors
        self.cnt = np.zeros(0)                  # per column: its sharp faces
        self.pp = np.zeros((0, 0), np.float32)  # person x person similarity; -inf: self, dead, asked
        self.pp_best = np.zeros(0, np.float32)
        self.pp_arg = np.zeros(0, np.int64)
        self.fp = np.zeros((n, 0), np.float32)  # face x person similarity; -inf: own person, dead
        self.fp_best = np.full(n, -np.inf, np.float32)
        self.fp_arg = np.full(n, -1, np.int64)
        self.lp_best = np.full(n, -np.inf, np.float32)  # face in no person: its best such face
        self.lp_arg = np.full(n, -1, np.int64)
        self.asked_pairs: set[tuple[int, int]] = set()
        self.asked_faces: set[int] = set()
        self.asked_loose: set[tuple[int, int]] = set()
        self.asked_face_pairs: dict[int, set[int]] = {}

    def _column(self, person_id: int) -> int:
        if person_id not in self.col:
            c = len(self.col)
            if c >= len(self.cnt):
                pad = int(c * 0.25) + 16
                self.sums = np.pad(self.sums, ((0, pad), (0, 0)))
                self.cnt = np.pad(self.cnt, (0, pad))
                self.pp = np.pad(self.pp, ((0, pad), (0, pad)), constant_values=-np.inf)
                self.pp_best = np.pad(self.pp_best, (0, pad), constant_values=-np.inf)
                self.pp_arg = np.pad(self.pp_arg, (0, pad))
                self.fp = np.pad(self.fp, ((0, 0), (0, pad)), constant_values=-np.inf)
                self.pid = np.pad(self.pid, (0, pad), constant_values=-1)
            self.col[person_id] = c
            self.pid[c] = person_id
        return self.col[person_id]

    def _divisor(self, cols: np.ndarray) -> np.ndarray:
        if self.similarity == "centroid":
            return np.sqrt(np.maximum(np.einsum("ij,ij->i", self.sums[cols], self.sums[cols]), 1e-12))
        return np.maximum(self.cnt[cols], 1)

    def refresh(self, session, faces: list[int] | None = None) -> None:
        """Read the links again (only those of ``faces``, the faces of the persons an answer was
        about, when given) and update what depends on the persons whose faces changed."""
        if faces is None:
            links = persons_repo.face_links(session, self.user_id)
            changed = [f for f in links.keys() | self.links.keys() if links.get(f) != self.links.get(f)]
        else:
            now = {f: p for f, (p, _) in persons_repo.links_of(session, self.user_id, faces).items()}
            changed = [f for f in dict.fromkeys(faces) if now.get(f) != self.links.get(f)]
            links = dict(self.links)
            for f in changed:
                if f in now:
                    links[f] = now[f]
                else:
                    del links[f]
        first = not self.links
        touched, moved_rows, left, entered = set(), [], [], []
        for f in changed:
            old, new = self.links.get(f), links.get(f)
            touched.update(self._column(p) for p in (old, new) if p is not None)
            if old is not None:
                self.members[old].remove(f)
                if not self.members[old]:
                    del self.members[old]
            if new is not None:
                self.members.setdefault(new, []).append(f)
            r = self.row.get(f)
            if r is None:
                continue
            if self.sharp[r]:
                if old is not None:
                    self.sums[self.col[old]] -= self.x[r]
                    self.cnt[self.col[old]] -= 1
                if new is not None:
                    self.sums[self.col[new]] += self.x[r]
                    self.cnt[self.col[new]] += 1
            self.own[r] = self.col[new] if new is not None else -1
            moved_rows.append(r)
            if old is None and new is not None:
                left.append(r)
            elif new is None and old is not None:
                entered.append(r)
        self.links = links
        if touched:
            self._update(np.array(sorted(touched)), np.array(moved_rows, np.int64))
        if first:
            self._lp_rows(np.flatnonzero(self.own < 0))
        else:
            self._lp_update(np.array(left, np.int64), np.array(entered, np.int64))

    def _update(self, t: np.ndarray, moved_rows: np.ndarray) -> None:
        k = len(self.col)
        alive = self.cnt[:k] > 0
        s32 = self.sums[:k].astype(np.float32)
        div = self._divisor(np.arange(k)).astype(np.float32)
        # persons x persons: rows and columns of the touched persons
        block = (s32[t] @ s32.T) / np.outer(div[t], div)
        block[:, ~alive] = -np.inf
        block[~alive[t]] = -np.inf
        block[np.arange(len(t)), t] = -np.inf
        for i, c in enumerate(t):
            for a, b in self.asked_pairs:
                if self.pid[c] in (a, b):
                    block[i, self.col[b if self.pid[c] == a else a]] = -np.inf
        self.pp[t, :k] = block
        self.pp[:k, t] = block.T
        redo = np.union1d(t, np.flatnonzero(np.isin(self.pp_arg[:k], t)))
        self._pp_rows(redo)
        rest = np.setdiff1d(np.arange(k), redo)
        if len(rest):
            sub = self.pp[:, t][rest]
            j = sub.argmax(1)
            v = sub[np.arange(len(rest)), j]
            better = v > self.pp_best[rest]
            self.pp_best[rest[better]] = v[better]
            self.pp_arg[rest[better]] = t[j[better]]
        # faces x persons: the touched persons' columns, and the rows of faces that moved
        cols = (self.x @ s32[t].T) / div[t]
        cols[:, ~alive[t]] = -np.inf
        self.fp[:, t] = cols
        linked = np.flatnonzero(self.own >= 0)
        self.fp[linked, self.own[linked]] = -np.inf
        redo = np.union1d(moved_rows, np.flatnonzero(np.isin(self.fp_arg, t)))
        self._fp_rows(redo)
        rest = np.setdiff1d(np.arange(len(self.x)), redo)
        sub = self.fp[:, t][rest]
        j = sub.argmax(1)
        v = sub[np.arange(len(rest)), j]
        better = v > self.fp_best[rest]
        self.fp_best[rest[better]] = v[better]
        self.fp_arg[rest[better]] = t[j[better]]

    def _pp_rows(self, rows: np.ndarray) -> None:
        if len(rows):
            k = len(self.col)
            sub = self.pp[rows, :k]
            self.pp_arg[rows] = sub.argmax(1)
            self.pp_best[rows] = sub[np.arange(len(rows)), self.pp_arg[rows]]

    def _fp_rows(self, rows: np.ndarray) -> None:
        if len(rows):
            k = len(self.col)
            sub = self.fp[rows, :k]
            self.fp_arg[rows] = sub.argmax(1)
            self.fp_best[rows] = sub[np.arange(len(rows)), self.fp_arg[rows]]

    def _lp_sims(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Similarities of faces ``rows`` to faces ``cols``; -inf for two faces of one photo (a
        face and itself included) and for pairs already asked."""
        sims = self.x[rows] @ self.x[cols].T
        sims[self.photo[rows][:, None] == self.photo[cols][None, :]] = -np.inf
        where = {int(c): j for j, c in enumerate(cols)}
        for i, r in enumerate(rows):
            for other in self.asked_face_pairs.get(int(self.face_ids[r]), ()):
                j = where.get(self.row[other])
                if j is not None:
                    sims[i, j] = -np.inf
        return sims

    def _lp_rows(self, rows: np.ndarray) -> None:
        """Best face in no person for each of ``rows`` (faces in no person), from scratch."""
        rows = rows[self.own[rows] < 0]
        cols = np.flatnonzero(self.own < 0)
        if len(rows) == 0:
            return
        for chunk in np.array_split(rows, max(1, len(rows) // 1000)):
            sims = self._lp_sims(chunk, cols)
            arg = sims.argmax(1)
            self.lp_best[chunk] = sims[np.arange(len(chunk)), arg]
            self.lp_arg[chunk] = cols[arg]

    def _lp_update(self, left: np.ndarray, entered: np.ndarray) -> None:
        """Faces ``left`` joined a person, faces ``entered`` left theirs: keep each face in no
        person's best such face right."""
        self.lp_best[left] = -np.inf
        self.lp_arg[left] = -1
        loose = np.flatnonzero(self.own < 0)
        redo = np.union1d(entered, loose[np.isin(self.lp_arg[loose], left)])
        self._lp_rows(redo)
        rest = np.setdiff1d(loose, redo)
        if len(entered) and len(rest):
            sims = self._lp_sims(rest, entered)
            arg = sims.argmax(1)
            v = sims[np.arange(len(rest)), arg]
            better = v > self.lp_best[rest]
            self.lp_best[rest[better]] = v[better]
            self.lp_arg[rest[better]] = entered[arg[better]]

    # -------------------------------------------------------------------- the next questions

    def next_merge(self) -> Question | None:
        k = len(self.col)
        if k < 2:
            return None
        i = int(np.argmax(self.pp_best[:k]))
        j = int(self.pp_arg[i])
        if not np.isfinite(self.pp_best[i]):
            return None
        a, b = sorted((int(self.pid[i]), int(self.pid[j])))
        return Question("merge", a, b, float(self.pp_best[i]))

    def margins(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, margin) of the faces ``suggest.least_sure_faces`` would rank (sharp, in a
        person with another sharp face), not asked yet: similarity to the rest of its person
        minus the best similarity to another person."""
        own = self.own
        rows = np.flatnonzero(self.sharp & (own >= 0))
        rows = rows[self.cnt[own[rows]] > 1]
        if self.asked_faces:
            rows = rows[~np.isin(self.face_ids[rows], list(self.asked_faces))]
        if len(rows) == 0:
            return rows, np.zeros(0)
        o = own[rows]
        rest = self.sums[o] - self.x[rows]
        f_own = np.einsum("ij,ij->i", rest, self.x[rows])
        if self.similarity == "centroid":
            own_sim = f_own / np.maximum(np.linalg.norm(rest, axis=1), 1e-12)
        else:
            own_sim = f_own / (self.cnt[o] - 1)
        best = np.where(np.isfinite(self.fp_best[rows]), self.fp_best[rows], -1.0)
        return rows, own_sim - best

    def next_face(self) -> Question | None:
        rows, margin = self.margins()
        if len(rows) == 0:
            return None
        i = int(np.lexsort((self.face_ids[rows], margin))[0])
        f = int(self.face_ids[rows[i]])
        return Question("face", f, self.links[f], float(margin[i]))

    def next_loose(self, faces: list[int] | None = None) -> Question | None:
        """The face in no person (of ``faces``, default all) most like a person it was not said
        not to be, with that person."""
        k = len(self.col)
        rows = np.flatnonzero(self.own < 0)
        if faces is not None:
            rows = rows[np.isin(self.face_ids[rows], faces)]
        if len(rows) == 0 or k == 0:
            return None
        a = self.fp[rows, :k].copy()
        where = {int(f): i for i, f in enumerate(self.face_ids[rows])}
        for f, p in self.asked_loose:
            if f in where and p in self.col:
                a[where[f], self.col[p]] = -np.inf
        i, j = np.unravel_index(int(np.argmax(a)), a.shape)
        if not np.isfinite(a[i, j]):
            return None
        return Question("loose", int(self.face_ids[rows[i]]), int(self.pid[j]), float(a[i, j]))

    def next_pair(self) -> Question | None:
        """The two faces in no person (of different photos) most like each other, not asked yet."""
        loose = np.flatnonzero(self.own < 0)
        if len(loose) < 2:
            return None
        i = loose[int(np.argmax(self.lp_best[loose]))]
        if not np.isfinite(self.lp_best[i]):
            return None
        a, b = sorted((int(self.face_ids[i]), int(self.face_ids[self.lp_arg[i]])))
        return Question("pair", a, b, float(self.lp_best[i]))

    # -------------------------------------------------------------------- what was asked

    def ask_pair(self, a: int, b: int) -> None:
        self.asked_pairs.add((min(a, b), max(a, b)))
        i, j = self.col[a], self.col[b]
        self.pp[i, j] = self.pp[j, i] = -np.inf
        self._pp_rows(np.array([i, j]))

    def ask_face_pair(self, a: int, b: int) -> None:
        self.asked_face_pairs.setdefault(a, set()).add(b)
        self.asked_face_pairs.setdefault(b, set()).add(a)
        self._lp_rows(np.array([self.row[a], self.row[b]]))

    # -------------------------------------------------------------------- the truth

    def identity(self, person_id: int) -> str | None:
        """Who the user sees in a person: the majority name of its labelled faces (None: nobody)."""
        names = Counter(self.truth[f] for f in self.members.get(person_id, ()) if f in self.truth)
        if not names:
            return None
        top = max(names.values())
        return min(n for n, c in names.items() if c == top)

    def witness(self, person_id: int, name: str | None, but: int = -1) -> int | None:
        """A labelled face of the person that truly is ``name`` (to check answers by later)."""
        return min((f for f in self.members.get(person_id, ()) if f != but and self.truth.get(f) == name),
                   default=None)

    def agree_with_suggest(self) -> tuple[float, ...]:
        """(merge score here, by ``suggest.similar_pairs``, face margin here, by
        ``suggest.least_sure_faces``, lone pair here, by ``suggest.similar_face_pairs``) for the
        next question of each kind (centroid similarity)."""
        person_of = np.array([self.links.get(int(f), -1) for f in self.face_ids], np.int64)
        linked = self.sharp & (person_of >= 0)
        ids, centroids = person_centroids(person_of[linked], self.x[linked])
        pair = similar_pairs(ids, centroids, 1, neighbours=50, exclude=self.asked_pairs)
        face = least_sure_faces(self.face_ids[linked], person_of[linked], self.x[linked], ids, centroids, 1,
                                exclude=self.asked_faces)
        loose = person_of < 0
        asked = [(a, b) for a, others in self.asked_face_pairs.items() for b in others]
        lone = similar_face_pairs(self.face_ids[loose], self.x[loose], 1, photos=self.photo[loose], neighbours=50,
                                  exclude=asked)
        mine_pair, mine_face, mine_lone = self.next_merge(), self.next_face(), self.next_pair()
        return (mine_pair.score if mine_pair else np.nan, pair[0][2] if pair else np.nan,
                mine_face.score if mine_face else np.nan, face[0][1] if face else np.nan,
                mine_lone.score if mine_lone else np.nan, lone[0][2] if lone else np.nan)


def open_library(url: str, images: Path, similarity: str = "centroid") -> tuple:
    engine = make_engine(url)
    migrate(engine)
    sessions = session_factory(engine)
    with sessions() as session:
        uid = store.get_or_create_user(session, "local").id
        rows = list(store.export_rows(session, uid))
        ids, x = store.user_embeddings(session, uid, include_blurry=True)
        sharp_ids, _ = store.user_embeddings(session, uid)
        photo_of = store.face_photo_ids(session, uid, ids)
    central = central_faces(rows, {r["face_id"] for r in rows}, images)
    truth = {face: photo.split("/")[0] for photo, face in central.items()}
    photos = np.array([photo_of[int(f)] for f in ids], np.int64)
    lib = Library(uid, ids, x, np.isin(ids, sharp_ids), photos, truth, len(rows), similarity)
    return engine, sessions, lib


# ------------------------------------------------------------------------------ the questions


@dataclass
class Question:
    kind: str                       # merge | face | loose
    a: int                          # merge: person; face/loose: face
    b: int                          # merge: other person; face: its person; loose: proposed person
    score: float                    # merge/loose: similarity; face: margin


def choose(policy: str, step: int, lib: Library, history: dict[str, list[tuple[int, bool]]]) -> Question | None:
    """The next question under ``policy``; ``history`` holds, per kind, (step, whether the answer
    changed something: a merge "yes", a face "no", a loose face or lone pair "yes").

    - ``merges``, ``faces``: only that kind; ``loose``: loose face or lone pair, the more similar;
    - ``alternate``: merge, face, loose face, lone pair in turn (a kind with no candidate is skipped);
    - ``scored``: the candidates on one scale, how far each is past the line where the
      clustering's own decision sits: a similarity above 1 - cut (merge, loose face, lone pair),
      a face's margin below 0 (closer to another person than to the rest of its own);
    - ``adaptive``: the candidate of the kind whose last ``WINDOW`` answers changed the most
      (a kind not asked yet counts as one in two; ties to the kind asked longest ago): the
      user's own answers decide.
    """
    makers = {"merge": lib.next_merge, "face": lib.next_face, "loose": lib.next_loose, "pair": lib.next_pair}
    if policy == "merges":
        return lib.next_merge()
    if policy == "faces":
        return lib.next_face()
    if policy == "loose":
        return max((q for q in (lib.next_loose(), lib.next_pair()) if q is not None), key=lambda q: q.score,
                   default=None)
    if policy == "alternate":
        kinds = list(makers)
        for i in range(len(kinds)):
            q = makers[kinds[(step + i) % len(kinds)]]()
            if q is not None:
                return q
        return None
    candidates = [q for q in (m() for m in makers.values()) if q is not None]
    if policy == "scored":
        return max(candidates, key=lambda q: FACE_LINE - q.score if q.kind == "face" else q.score - LINE, default=None)
    if policy == "adaptive":
        def rate(kind: str) -> tuple[float, int]:
            recent = history.get(kind, [])[-WINDOW:]
            return (sum(ok for _, ok in recent) + 1) / (len(recent) + 2), -(recent[-1][0] if recent else -1)
        return max(candidates, key=lambda q: rate(q.kind), default=None)
    raise ValueError(f"unknown policy {policy}")


# ------------------------------------------------------------------------------ the user


@dataclass
class Check:
    """Something an answer settled, about two labelled faces: together (same) or apart."""

    kind: str
    face: int
    other: int
    same: bool


def together(links: dict[int, int], a: int, b: int) -> bool:
    return a in links and links.get(a) == links.get(b)


def answer(session, lib: Library, q: Question, checks: list[Check], merge_into: str = "larger") -> str:
    """The simulated user's answer to ``q``, and the edit it makes through the service.

    A merge goes into the person with more faces (``merge_into`` "smaller": the other way).
    """
    uid = lib.user_id
    if q.kind == "pair":
        lib.ask_face_pair(q.a, q.b)
        na, nb = lib.truth.get(q.a), lib.truth.get(q.b)
        if na is None or nb is None:
            return "unknown"
        if na != nb:
            checks.append(Check("pair-no", q.a, q.b, False))
            return "no"
        service.split_faces(session, uid, [q.a, q.b])
        checks.append(Check("pair-yes", q.a, q.b, True))
        return "yes"
    if q.kind == "merge":
        lib.ask_pair(q.a, q.b)
        ia, ib = lib.identity(q.a), lib.identity(q.b)
        if ia is None or ib is None:
            return "unknown"
        wa, wb = lib.witness(q.a, ia), lib.witness(q.b, ib)
        if ia != ib:
            checks.append(Check("merge-no", wa, wb, False))
            return "no"
        into, other = sorted((q.a, q.b), key=lambda p: (-len(lib.members[p]), p))
        if merge_into == "smaller":
            into, other = other, into
        service.merge(session, uid, into, [other])
        checks.append(Check("merge-yes", wa, wb, True))
        return "yes"
    face = q.a
    if q.kind == "face":
        lib.asked_faces.add(face)
        lib.asked_loose.add((face, q.b))
        name, ip = lib.truth.get(face), lib.identity(q.b)
        if name is None or ip is None:
            return "unknown"
        w = lib.witness(q.b, ip, but=face)
        if name == ip:
            if w is not None:
                checks.append(Check("face-keep", face, w, True))
            return "yes"
        service.reject_face(session, uid, q.b, face)
        if w is not None:
            checks.append(Check("face-reject", face, w, False))
        return "no"
    lib.asked_loose.add((face, q.b))
    name, ip = lib.truth.get(face), lib.identity(q.b)
    if name is None or ip is None:
        return "unknown"
    w = lib.witness(q.b, ip)
    if name != ip:
        if w is not None:
            checks.append(Check("loose-no", face, w, False))
        return "no"
    service.move_faces(session, uid, [face], q.b)
    if w is not None:
        checks.append(Check("loose-yes", face, w, True))
    return "yes"


def broken(checks: list[Check], links: dict[int, int]) -> dict[str, int]:
    """How many settled answers the library contradicts now, by kind."""
    out = Counter({c.kind: 0 for c in checks})
    for c in checks:
        if together(links, c.face, c.other) != c.same:
            out[c.kind] += 1
    return dict(out)


# ------------------------------------------------------------------------------ scoring


def cli(*args: str) -> str:
    proc = subprocess.run([*FACECLUSTER, *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"facecluster {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def export_and_score(db: Path, prefix: Path, data: Path) -> dict:
    cli("export", "--db", f"sqlite:///{db}", "--out", f"{prefix}_faces.csv")
    scores = score_clusters(Path(f"{prefix}_faces.csv"), data)
    return {k: scores[k] for k in FIGURES}


def copy_db(src: Path, dst: Path) -> None:
    """A consistent copy of a SQLite database, WAL included."""
    for f in (dst, Path(f"{dst}-wal"), Path(f"{dst}-shm")):
        f.unlink(missing_ok=True)
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        b.close()
        a.close()


def links_of(db: Path) -> dict[int, int]:
    engine = make_engine(f"sqlite:///{db}")
    try:
        with session_factory(engine)() as session:
            uid = store.get_or_create_user(session, "local").id
            return persons_repo.face_links(session, uid)
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------ one run


def side_effects(session, lib: Library) -> int:
    """Links that changed outside the persons an answer was about (none should), then read all."""
    before = dict(lib.links)
    lib.refresh(session)
    return sum(before.get(f) != lib.links.get(f) for f in before.keys() | lib.links.keys())


def run_policy(policy: str, index: Path, out: Path, budgets: list[int], data: Path, *,
               similarity: str = "centroid", merge_into: str = "larger", check_every: int = 50) -> dict:
    """One trajectory of answers under ``policy``, scored at each budget (answers per 1,000 faces)."""
    name = policy + ("" if similarity == "centroid" else f"-{similarity}") + ("" if merge_into == "larger"
                                                                             else f"-into-{merge_into}")
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "library.db"
    copy_db(index, db)
    engine, sessions, lib = open_library(f"sqlite:///{db}", data / "images", similarity)
    targets = {b: round(b * lib.n_export / 1000) for b in budgets}
    checks: list[Check] = []
    log, results, agreement = [], [], []
    answers, step, seconds, elsewhere = 0, 0, 0.0, 0
    history: dict[str, list[tuple[int, bool]]] = {}
    counts: Counter = Counter()
    with sessions() as session:
        lib.refresh(session)
        for budget in budgets:
            t0 = time.perf_counter()
            while answers < targets[budget]:
                if similarity == "centroid" and step % check_every == 0:
                    agreement.append(lib.agree_with_suggest())
                q = choose(policy, step, lib, history)
                step += 1
                if q is None:
                    break
                persons = {"merge": (q.a, q.b), "pair": ()}.get(q.kind, (q.b,))
                faces = [f for p in persons for f in lib.members.get(p, ())]
                faces += {"merge": [], "pair": [q.a, q.b]}.get(q.kind, [q.a])
                reply = answer(session, lib, q, checks, merge_into)
                session.commit()
                answers += 1
                counts[(q.kind, reply)] += 1
                history.setdefault(q.kind, []).append((step, reply == ("no" if q.kind == "face" else "yes")))
                log.append({"n": answers, "kind": q.kind, "a": q.a, "b": q.b, "score": round(q.score, 4),
                            "answer": reply})
                lib.refresh(session, faces)
                if step % check_every == 0:
                    elsewhere += side_effects(session, lib)
            seconds += time.perf_counter() - t0
            elsewhere += side_effects(session, lib)
            snap = folder / f"b{budget}.db"
            copy_db(db, snap)
            row = {"run": name, "per_1000": budget, "answers": answers, "faces": lib.n_export,
                   "asked": {f"{k}-{r}": c for (k, r), c in sorted(counts.items())},
                   "after_answers": export_and_score(snap, folder / f"b{budget}_answers", data),
                   "broken_after_answers": broken(checks, lib.links), "links_changed_elsewhere": elsewhere}
            cli("cluster", "--db", f"sqlite:///{snap}")
            row["after_recluster"] = export_and_score(snap, folder / f"b{budget}_recluster", data)
            after = links_of(snap)
            row["broken_after_recluster"] = broken(checks, after)
            row["broken_examples"] = [[c.kind, c.face, c.other] for c in checks
                                      if together(after, c.face, c.other) != c.same][:20]
            row["answer_seconds"] = round(seconds, 1)
            results.append(row)
            print(json.dumps(row), flush=True)
    engine.dispose()
    (folder / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    agree = np.array(agreement, np.float64).reshape(-1, 6)
    same = lambda a, b: bool(np.all((np.isnan(a) & np.isnan(b)) | (np.abs(a - b) < 1e-4)))
    check = {"checked": len(agree), "merge_agrees": same(agree[:, 0], agree[:, 1]),
             "face_agrees": same(agree[:, 2], agree[:, 3]), "lone_pair_agrees": same(agree[:, 4], agree[:, 5])}
    print(json.dumps({"run": name, "suggest_check": check}), flush=True)
    return {"run": name, "rows": results, "suggest_check": check}


# ------------------------------------------------------------------------------ the plot


def svg_plot(runs: list[dict], path: Path, title: str) -> None:
    """BCubed F1 against answers per 1,000 faces: solid after the answers, dashed after re-clustering."""
    w, h, left, right, top, bottom = 640, 400, 70, 150, 40, 50
    xs = sorted({r["per_1000"] for run in runs for r in run["rows"]})
    ys = [r[k]["bcubed_f1"] for run in runs for r in run["rows"] for k in ("after_answers", "after_recluster")]
    y0, y1 = np.floor(min(ys) * 500) / 500, np.ceil(max(ys) * 500) / 500
    y1 = max(y1, y0 + 0.002)
    sx = lambda i: left + (w - left - right) * i / max(len(xs) - 1, 1)  # categorical: 0, 10, 50, 200
    sy = lambda v: top + (h - top - bottom) * (1 - (v - y0) / (y1 - y0))
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    ticks = np.linspace(y0, y1, 6)
    for v in ticks:
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.4f}</text>')
    for i, x in enumerate(xs):
        out.append(f'<text x="{sx(i):.1f}" y="{h - bottom + 18}" text-anchor="middle">{x}</text>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 10}" text-anchor="middle">answers per 1,000 faces (the budgets; not to scale)</text>')
    out.append(f'<text x="16" y="{(top + h - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(top + h - bottom) / 2})">BCubed F1</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" '
               f'fill="none" stroke="#444"/>')
    for j, run in enumerate(runs):
        c = colours[j % len(colours)]
        for k, dash in (("after_answers", ""), ("after_recluster", ' stroke-dasharray="5,4"')):
            pts = " ".join(f"{sx(xs.index(r['per_1000'])):.1f},{sy(r[k]['bcubed_f1']):.1f}" for r in run["rows"])
            out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
            for p in pts.split():
                px, py = p.split(",")
                out.append(f'<circle cx="{px}" cy="{py}" r="3" fill="{c}"/>')
        ly = top + 16 + 18 * j
        out.append(f'<line x1="{w - right + 10}" x2="{w - right + 30}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{w - right + 36}" y="{ly + 4}">{run["run"]}</text>')
    ly = top + 16 + 18 * len(runs) + 10
    out.append(f'<line x1="{w - right + 10}" x2="{w - right + 30}" y1="{ly}" y2="{ly}" stroke="#444" stroke-width="2"/>')
    out.append(f'<text x="{w - right + 36}" y="{ly + 4}">after answers</text>')
    out.append(f'<line x1="{w - right + 10}" x2="{w - right + 30}" y1="{ly + 18}" y2="{ly + 18}" stroke="#444" '
               f'stroke-width="2" stroke-dasharray="5,4"/>')
    out.append(f'<text x="{w - right + 36}" y="{ly + 22}">re-clustered</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def table(runs: list[dict]) -> str:
    lines = ["| policy | answers per 1,000 faces | answers | after answers P / R / **F1** | after re-cluster P / R / **F1** | pairwise F1 (answers / re-cluster) |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        for r in run["rows"]:
            a, c = r["after_answers"], r["after_recluster"]
            lines.append(f"| {run['run']} | {r['per_1000']} | {r['answers']} | "
                         f"{a['bcubed_precision']:.4f} / {a['bcubed_recall']:.4f} / **{a['bcubed_f1']:.4f}** | "
                         f"{c['bcubed_precision']:.4f} / {c['bcubed_recall']:.4f} / **{c['bcubed_f1']:.4f}** | "
                         f"{a['pairwise_f1']:.4f} / {c['pairwise_f1']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, help="SQLite file of an indexed and clustered LFW-dev (required to run)")
    ap.add_argument("--out", type=Path, default=Path("out/corrections"))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--policy", default="scored", help=f"comma-separated, of {', '.join(POLICIES)}")
    ap.add_argument("--budgets", default="0,10,50,200", help="answers per 1,000 faces")
    ap.add_argument("--similarity", default="centroid", choices=("centroid", "mean"),
                    help="how persons are compared: cosine of centroids (suggest, the product) or the mean "
                         "similarity of their faces (average linkage's measure)")
    ap.add_argument("--merge-into", default="larger", choices=("larger", "smaller"),
                    help="which of two persons a 'yes' keeps (the page would keep the larger)")
    ap.add_argument("--svg", type=Path, help="write the plot of BCubed F1 here")
    ap.add_argument("--from-json", type=Path, nargs="+", metavar="JSON",
                    help="run nothing: the table and plot of runs saved by earlier runs (OUT/corrections-*.json)")
    args = ap.parse_args()
    if args.from_json:
        runs = [run for path in args.from_json for run in json.loads(path.read_text())]
        print(table(runs))
        if args.svg:
            svg_plot(runs, args.svg, "LFW-dev: BCubed F1 after a user's answers")
        return
    if args.index is None:
        ap.error("--index is required to run")
    budgets = sorted(int(b) for b in args.budgets.split(","))
    args.out, args.index = args.out.resolve(), args.index.resolve()  # the CLI runs in the repository
    settings = load_settings()
    print(json.dumps({"cluster_settings": {"min_cluster_size": settings.min_cluster_size,
                                           "cluster_threshold": settings.cluster_threshold}}), flush=True)
    runs = [run_policy(p, args.index, args.out, budgets, args.data, similarity=args.similarity,
                       merge_into=args.merge_into) for p in args.policy.split(",")]
    (args.out / f"corrections-{'-'.join(r['run'] for r in runs)}.json").write_text(json.dumps(runs, indent=1))
    print(table(runs))
    if args.svg:
        svg_plot(runs, args.svg, "LFW-dev: BCubed F1 after a user's answers")


if __name__ == "__main__":
    main()
