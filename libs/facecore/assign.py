"""Filing new faces under a user's existing persons: the rule, and the index it searches.

The rule (``assign``): a new face looks at its ``KNN`` nearest assigned faces; for each person
among them, the mean similarity of that person's ``top_k`` nearest is its score; the face
joins the best-scoring person when the score exceeds ``1 - cut`` (the cut average linkage
uses in the batch job, calibrated per embedder, ``facecore.cluster``), and never a person it
was rejected from ("not this person": the best of the others may take it). Of faces of one
photo that pick the same person only the closest joins (``one_per_photo``). The cluster
worker files faces by it; benchmarks measure it.

``FaceIndex`` holds a user's assigned faces with their persons. Up to ``EXACT_MAX_FACES`` it
is exact (IndexFlatIP, about 1 ms a face there on one core). Beyond, one face's exact search
grows with the library, so the faces also get 4-bit product-quantised codes (IndexPQFastScan,
32 bytes a face, codebooks trained on the faces held at that moment: all of them when a big
user is loaded, again each time they have grown ``RETRAIN_GROWTH``-fold); a search scans the
codes of all faces and re-ranks the best ``k * K_FACTOR`` by their exact vectors, so every
similarity it returns is exact and only a neighbour the scan ranked too low can be missed.
An inverted-file index (IVF) and HNSW were tried first: on synthetic faces shaped like
SFace's they missed a quarter of the neighbours above the cut at 5 % of the lists probed (IVF)
and 8 % at efSearch 256 (HNSW), and changed the person decision for 8-16 % of faces;
the scan misses 1 in 1,500 of those neighbours. docs/BENCHMARKS.md has the measurements.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import faiss
import numpy as np

from .cluster import KNN

TOP_K = 3  # nearest faces of a person whose mean similarity decides
# exact search up to this many faces, a PQ scan with exact re-ranking beyond
EXACT_MAX_FACES = 20_000
PQ_BYTES = 32  # 4-bit product quantiser of 64 sub-vectors: 32 bytes a face, scanned with SIMD
K_FACTOR = 16  # candidates re-ranked exactly: k * K_FACTOR
TRAIN_MAX = 65_536  # faces the codebooks are trained on
RETRAIN_GROWTH = 4  # trained again each time the faces have grown this much since


class FaceIndex:
    """A user's assigned faces (L2-normalised rows) and the person of each, searchable by
    inner product; row ``i`` of a search result refers to ``labels[i]``."""

    def __init__(self, d: int, *, exact_max: int = EXACT_MAX_FACES, k_factor: int = K_FACTOR, seed: int = 0):
        self.d, self.exact_max, self.k_factor, self.seed = d, exact_max, k_factor, seed
        self.index: faiss.Index = faiss.IndexFlatIP(d)
        self.labels = np.zeros(0, np.int64)
        self._trained_at = 0

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def approximate(self) -> bool:
        return isinstance(self.index, faiss.IndexRefineFlat)

    @property
    def nbytes(self) -> int:
        """Memory held: the vectors and labels, and when approximate the PQ codes."""
        n = self.ntotal * self.d * 4 + self.labels.nbytes
        if self.approximate:
            n += self.ntotal * PQ_BYTES + self.d * 16 * 4  # codes + codebooks
        return n

    def add(self, x: np.ndarray, labels: np.ndarray) -> None:
        """Append faces ``x`` (n, d) of persons ``labels`` (n,)."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, self.d)
        labels = np.asarray(labels, np.int64).reshape(-1)
        if len(x) != len(labels):
            raise ValueError(f"{len(x)} vectors but {len(labels)} labels")
        if not len(x):
            return
        total = self.ntotal + len(x)
        if total > self.exact_max and (not self.approximate or total >= RETRAIN_GROWTH * self._trained_at):
            self._rebuild(np.concatenate([self.vectors(), x]) if self.ntotal else x)
        else:
            self.index.add(x)
        self.labels = np.concatenate([self.labels, labels])

    def vectors(self) -> np.ndarray:
        """A copy of the stored vectors in row order."""
        flat = faiss.downcast_index(self.index.refine_index) if self.approximate else self.index
        return faiss.rev_swig_ptr(flat.get_xb(), self.ntotal * self.d).reshape(self.ntotal, self.d).copy()

    def _rebuild(self, x: np.ndarray) -> None:
        pq = faiss.IndexPQFastScan(self.d, PQ_BYTES * 2, 4, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexRefineFlat(pq)
        rng = np.random.default_rng(self.seed)
        index.train(x[np.sort(rng.choice(len(x), min(len(x), TRAIN_MAX), replace=False))])
        index.add(x)
        index.k_factor = self.k_factor
        self.index, self._trained_at = index, len(x)

    def search(self, x: np.ndarray, k: int = KNN) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, row indices), nearest first, each (len(x), min(k, ntotal)); -1 where
        the search found fewer. Approximate: exact similarities of the PQ scan's best
        ``k * k_factor`` candidates."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, self.d)
        k = min(k, self.ntotal)
        if not k or not len(x):
            return np.zeros((len(x), k), np.float32), np.full((len(x), k), -1, np.int64)
        return self.index.search(x, k)


def assign(sims: np.ndarray, idx: np.ndarray, person_of: np.ndarray, cut: float, top_k: int = TOP_K,
           rejected: Sequence[Collection[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row of a kNN search (nearest first; ``idx`` into ``person_of``, -1 for none) ->
    (person, score): the person whose ``top_k`` nearest faces in the row have the highest
    mean similarity (ties to the person met first) and that mean; person -1 where that mean
    does not exceed ``1 - cut``, score -inf where the row has no candidate. ``rejected[r]``:
    persons row ``r``'s face must not join; they are left out before scoring."""
    sims, idx = np.asarray(sims), np.asarray(idx, np.int64)
    n, k = idx.shape
    person = np.full(n, -1, np.int64)
    score = np.full(n, -np.inf)
    ok = idx >= 0
    p = np.full((n, k), -1, np.int64)
    p[ok] = np.asarray(person_of, np.int64)[idx[ok]]
    for r, never in enumerate(rejected or ()):
        if never:
            ok[r] &= ~np.isin(p[r], np.fromiter(never, np.int64, len(never)))
    rows = np.broadcast_to(np.arange(n)[:, None], (n, k))[ok]
    pos = np.broadcast_to(np.arange(k)[None], (n, k))[ok]
    p, s = p[ok], sims[ok].astype(np.float64)
    if not len(p):
        return person, score
    order = np.lexsort((pos, p, rows))  # by row, then person, nearest first
    rows, pos, p, s = rows[order], pos[order], p[order], s[order]
    first = np.ones(len(p), bool)
    first[1:] = (rows[1:] != rows[:-1]) | (p[1:] != p[:-1])
    group = np.cumsum(first) - 1
    rank = np.arange(len(p)) - np.flatnonzero(first)[group]
    near = rank < top_k
    mean = np.bincount(group[near], s[near]) / np.bincount(group[near])
    g_row, g_pos, g_person = rows[first], pos[first], p[first]
    best = np.lexsort((g_pos, -mean, g_row))  # each row's best group comes first
    head = best[np.r_[True, g_row[best][1:] != g_row[best][:-1]]]
    score[g_row[head]] = mean[head]
    joins = mean[head] > 1.0 - cut
    person[g_row[head][joins]] = g_person[head][joins]
    return person, score


def one_per_photo(photos: np.ndarray, person: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Which faces join the person ``assign`` picked (bool mask): of faces of one photo that
    picked the same person, the one with the highest score (the first on ties); never a face
    that picked nobody (-1)."""
    photos, person, score = np.asarray(photos, np.int64), np.asarray(person, np.int64), np.asarray(score)
    keep = np.zeros(len(person), bool)
    cand = np.flatnonzero(person >= 0)
    if not len(cand):
        return keep
    order = cand[np.lexsort((cand, -score[cand], person[cand], photos[cand]))]
    lead = np.r_[True, (photos[order][1:] != photos[order][:-1]) | (person[order][1:] != person[order][:-1])]
    keep[order[lead]] = True
    return keep
