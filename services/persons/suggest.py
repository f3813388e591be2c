"""Which question to put to the user next: pure functions over a user's face vectors.

The clustering is right for almost every face (BCubed F1 0.992 on LFW-dev); what is left are
persons split in two (a merge fixes them) and faces in the wrong person (a "not this person"
fixes them). A user answers few questions, so each question should be the one most likely to
be about an error. Persons are compared by their centroid, the normalised mean of their
faces' vectors: averaging cancels the pose and light of single photos, and one vector per
person keeps every query an (m, d) product or a faiss search, whatever the library's size.

Inputs are the arrays the store gives (``repository.user_embeddings``, ``face_links``): face
ids, each face's person id (-1 for a face in no person) and L2-normalised float32 vectors.
Nothing here reads or writes the database; ``services.persons.service`` does.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import faiss
import numpy as np

NO_PERSON = -1


def _sums(person_of: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(person ids ascending, (m, d) sums of their faces' vectors, (m,) face counts)."""
    person_of = np.asarray(person_of, np.int64)
    x = np.asarray(x, np.float32)
    if person_of.shape != (len(x),):
        raise ValueError(f"person_of has shape {person_of.shape}, x has {len(x)} rows")
    keep = np.flatnonzero(person_of != NO_PERSON)
    keep = keep[np.argsort(person_of[keep], kind="stable")]  # each person's faces side by side
    ids, starts, counts = np.unique(person_of[keep], return_index=True, return_counts=True)
    if len(ids) == 0:
        return ids, np.zeros((0, x.shape[1] if x.ndim == 2 else 0), np.float64), counts
    return ids, np.add.reduceat(x[keep].astype(np.float64), starts, axis=0), counts


def _normalise(v: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.where(norms > 0, norms, 1)).astype(np.float32)


def person_centroids(person_of: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(person ids (m,) ascending, L2-normalised centroids (m, d)) of the persons in ``person_of``.

    Faces with person -1 belong to nobody and shape no centroid. The mean is normalised
    because everything downstream compares by cosine.
    """
    ids, sums, _ = _sums(person_of, x)
    return ids, _normalise(sums)


def _search(centroids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of ``queries`` among ``centroids``: (sims, rows), -1 rows pad."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    return index.search(np.ascontiguousarray(queries, np.float32), min(k, len(centroids)))


def similar_persons(person_ids: np.ndarray, centroids: np.ndarray, person_id: int, k: int, *,
                    exclude: Collection[int] = ()) -> list[tuple[int, float]]:
    """Up to ``k`` other persons by cosine of centroids, most similar first: merge suggestions.

    ``exclude`` holds persons not to offer (those the user already said are someone else).
    Ties go to the lower person id, so the same library always gets the same list.
    """
    person_ids = np.asarray(person_ids, np.int64)
    rows = np.flatnonzero(person_ids == person_id)
    if len(rows) == 0:
        raise KeyError(f"person {person_id} has no centroid")
    sims = np.asarray(centroids, np.float32) @ np.asarray(centroids, np.float32)[rows[0]]
    skip = np.isin(person_ids, np.fromiter((int(p) for p in exclude), np.int64, len(exclude)))
    skip[rows[0]] = True
    order = np.lexsort((person_ids, -sims))
    return [(int(person_ids[i]), float(sims[i])) for i in order if not skip[i]][:max(k, 0)]


def similar_pairs(person_ids: np.ndarray, centroids: np.ndarray, k: int, *, neighbours: int = 10,
                  exclude: Collection[tuple[int, int]] = ()) -> list[tuple[int, int, float]]:
    """The ``k`` most similar pairs of persons in the whole library: (a, b, cosine), a < b,
    most similar first; the merge question with the best odds of a "yes".

    Only each person's ``neighbours`` nearest persons are considered, so the cost grows like
    m log m, not m²; the top pairs are among them unless a person has that many closer ones.
    ``exclude`` holds pairs (either order) already answered "not the same".
    """
    person_ids = np.asarray(person_ids, np.int64)
    if len(person_ids) < 2 or k <= 0:
        return []
    sims, rows = _search(centroids, centroids, neighbours + 1)
    banned = {(min(a, b), max(a, b)) for a, b in exclude}
    best: dict[tuple[int, int], float] = {}
    for i, (srow, irow) in enumerate(zip(sims, rows)):
        for s, j in zip(srow, irow):
            if j < 0 or j == i:
                continue
            a, b = sorted((int(person_ids[i]), int(person_ids[j])))
            if (a, b) not in banned:
                best[(a, b)] = max(best.get((a, b), -2.0), float(s))
    pairs = sorted(best.items(), key=lambda item: (-item[1], item[0]))
    return [(a, b, s) for (a, b), s in pairs[:k]]


def face_margins(person_of: np.ndarray, x: np.ndarray, person_ids: np.ndarray, centroids: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each face: (margin, cosine to its own person without it, best other person) (n,) each.

    margin = cos(face, own centroid computed without the face) - max cos(face, any other
    person's centroid). Leaving the face out matters: in a small person a face pulls the
    centroid towards itself, and a stray face in a person of two would look sure of itself.
    The margin is NaN (not judged) for a face in no person and for the only face of a person,
    which has nothing to be compared with; whether such a person is someone else is a merge
    question (:func:`similar_persons`). The best other person is -1 when there is none.
    """
    person_of = np.asarray(person_of, np.int64)
    x = np.asarray(x, np.float32)
    person_ids = np.asarray(person_ids, np.int64)
    n = len(x)
    margin = np.full(n, np.nan)
    own = np.full(n, np.nan)
    other = np.full(n, NO_PERSON, np.int64)
    ids, sums, counts = _sums(person_of, x)
    judged = np.flatnonzero(person_of != NO_PERSON)
    if len(judged) == 0 or len(person_ids) == 0:
        return margin, own, other
    row = np.searchsorted(ids, person_of[judged])
    judged = judged[counts[row] > 1]
    row = row[counts[row] > 1]
    rest = sums[row] - x[judged]
    own[judged] = np.einsum("ij,ij->i", rest, x[judged]) / np.maximum(np.linalg.norm(rest, axis=1), 1e-12)
    # the best centroid that is not the face's own: among the top two one always is
    sims, rows = _search(centroids, x[judged], 2)
    nearest = np.where(rows >= 0, person_ids[np.maximum(rows, 0)], NO_PERSON)
    first_is_own = nearest[:, 0] == person_of[judged]
    pick = first_is_own.astype(np.int64) if sims.shape[1] > 1 else np.zeros(len(judged), np.int64)
    best_sim = sims[np.arange(len(judged)), pick]
    best_other = nearest[np.arange(len(judged)), pick]
    has_other = (best_other != NO_PERSON) & (best_other != person_of[judged])
    other[judged[has_other]] = best_other[has_other]
    # with no other person at all there is nothing to be confused with: the margin is own - (-1)
    margin[judged] = own[judged] - np.where(has_other, best_sim, -1.0)
    return margin, own, other


def least_sure_faces(face_ids: np.ndarray, person_of: np.ndarray, x: np.ndarray, person_ids: np.ndarray,
                     centroids: np.ndarray, k: int, *, exclude: Collection[int] = ()
                     ) -> list[tuple[int, float]]:
    """Up to ``k`` (face id, margin) of the faces least sure to belong to their person, least
    sure first: the "is this X?" questions. A negative margin means the face is closer to
    another person than to the rest of its own.

    ``centroids`` must be those of ``person_of`` (:func:`person_centroids`); faces in no person
    and only faces of a person are not ranked (see :func:`face_margins`). ``exclude`` holds
    faces the user already confirmed. Ties go to the lower face id.
    """
    face_ids = np.asarray(face_ids, np.int64)
    margin, _, _ = face_margins(person_of, x, person_ids, centroids)
    ok = ~np.isnan(margin) & ~np.isin(face_ids, np.fromiter((int(f) for f in exclude), np.int64, len(exclude)))
    rows = np.flatnonzero(ok)
    rows = rows[np.lexsort((face_ids[rows], margin[rows]))][:max(k, 0)]
    return [(int(face_ids[i]), float(margin[i])) for i in rows]


def nearest_persons(x: np.ndarray, person_ids: np.ndarray, centroids: np.ndarray, k: int = 1
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(person ids (n, k), cosines (n, k)), nearest first, of the persons whose centroid is
    closest to each row of ``x``: where a face in no person (too blurry to cluster, or sent
    away by the user) most likely belongs. Missing neighbours (fewer than k persons) are -1 / NaN.
    """
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    person_ids = np.asarray(person_ids, np.int64)
    if len(person_ids) == 0 or len(x) == 0:
        return np.full((len(x), k), NO_PERSON, np.int64), np.full((len(x), k), np.nan, np.float32)
    sims, rows = _search(centroids, x, k)
    ids = np.where(rows >= 0, person_ids[np.maximum(rows, 0)], NO_PERSON)
    sims = np.where(rows >= 0, sims, np.nan).astype(np.float32)
    pad = k - ids.shape[1]
    if pad > 0:
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=NO_PERSON)
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=np.nan)
    return ids, sims


def nearest_person(vector: np.ndarray, person_ids: np.ndarray, centroids: np.ndarray, *,
                   exclude: Iterable[int] = ()) -> tuple[int, float] | None:
    """(person id, cosine) of the person closest to one face's vector, skipping ``exclude``
    (persons the face was already said not to be); None when no person is left."""
    person_ids = np.asarray(person_ids, np.int64)
    skip = np.isin(person_ids, np.fromiter((int(p) for p in exclude), np.int64))
    if skip.all():
        return None
    sims = np.asarray(centroids, np.float32) @ np.asarray(vector, np.float32).reshape(-1)
    sims = np.where(skip, -np.inf, sims)
    i = int(np.lexsort((person_ids, -sims))[0])
    return int(person_ids[i]), float(sims[i])


def similar_face_pairs(face_ids: np.ndarray, x: np.ndarray, k: int, *, photos: np.ndarray | None = None,
                       neighbours: int = 10, exclude: Collection[tuple[int, int]] = ()
                       ) -> list[tuple[int, int, float]]:
    """The ``k`` most similar pairs among faces in no person: (a, b, cosine), a < b, most
    similar first; "are these two the same person?" (a yes makes them a person).

    A library clustered with a minimum person size leaves a person's only face in no person,
    and two such faces of one person have no person to be moved into; this is the question that
    joins them. Two faces of one photo (``photos``, the photo of each face) are never one person,
    so they are never paired. Only each face's ``neighbours`` nearest are considered, as in
    :func:`similar_pairs`; ``exclude`` holds pairs (either order) already answered.
    """
    face_ids = np.asarray(face_ids, np.int64)
    x = np.asarray(x, np.float32)
    if len(face_ids) < 2 or k <= 0:
        return []
    sims, rows = _search(x, x, neighbours + 1)
    banned = {(min(a, b), max(a, b)) for a, b in exclude}
    best: dict[tuple[int, int], float] = {}
    for i, (srow, irow) in enumerate(zip(sims, rows)):
        for s, j in zip(srow, irow):
            if j < 0 or j == i or (photos is not None and photos[i] == photos[j]):
                continue
            a, b = sorted((int(face_ids[i]), int(face_ids[j])))
            if (a, b) not in banned:
                best[(a, b)] = max(best.get((a, b), -2.0), float(s))
    pairs = sorted(best.items(), key=lambda item: (-item[1], item[0]))
    return [(a, b, s) for (a, b), s in pairs[:k]]
