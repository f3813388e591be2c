"""The rules about persons, in one place: the CLI, the API, the batch cluster job, the cluster
worker and the re-embedding job all call these functions and never change persons otherwise.

- Person ids are stable: a re-clustering hands each cluster the existing person it overlaps most.
- What a user did is a decision later clustering obeys: a link the user made ('user' source) is
  never changed by clustering, a merged or split person is confirmed (kept when empty), and a
  face the user said is "not this person" is never put back into that person automatically.
- Every change of links bumps the user's clustering revision (the cluster worker's copy of the
  user is read again) and keeps each touched person's face count and cover right; persons that
  nobody named or confirmed go away once empty.
- Every edit by the user is logged with what undoing it needs; ``undo`` reverts the newest one.
  One user's edits and undos run one at a time (``repo.lock_edits``), so that holds under load.

Functions take a Session and the caller's user id, raise ``NotFound`` for ids that are not the
user's (exactly as for ids that do not exist), ``Refused`` for requests that cannot be done,
and never commit: the edge (request, command, batch) commits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session

from services.store import repository as store
from services.store.models import Person, PersonEdit
from services.store.repository import NotFound

from . import repository as repo

__all__ = ["NotFound", "Refused", "NothingToUndo", "apply_clustering", "merge", "move_faces", "split_faces", "reject_face",
           "update_person", "undo", "link_new_faces", "new_person", "delete_photo", "delete_user",
           "suggestions", "uncertain_faces"]

UNSET = object()
# Above this many (cluster, person) cells a group of overlapping clusters and persons is matched
# largest overlap first instead of exactly (the exact assignment costs O(n^3)).
MATCH_CELLS = 1_000_000


class Refused(ValueError):
    """A request the rules refuse in the current state (merging a person into itself, a cover
    that is not the person's face); the API answers 409 with the message."""


class NothingToUndo(Refused):
    """The user has no edit left to undo."""


# ------------------------------------------------------------------------------ helpers


def _after_link_change(session: Session, user_id: int, person_ids: Collection[int]) -> None:
    store.touch_clustering(session, user_id)
    repo.drop_empty_auto_persons(session, user_id, person_ids)
    repo.refresh_persons(session, user_id, person_ids)


def _snapshot(session: Session, user_id: int, person_ids: Collection[int], face_ids: Collection[int]) -> dict:
    """What undoing a change of these persons and faces needs: their rows, links and rejections."""
    links = repo.links_of(session, user_id, face_ids)
    return {
        "persons": repo.person_rows(session, user_id, person_ids),
        "person_ids": sorted({int(p) for p in person_ids}),
        "links": [[int(f), *links.get(int(f), (None, None))] for f in face_ids],
        "rejections": [list(r) for r in repo.rejections(session, user_id, face_ids=face_ids, person_ids=person_ids)],
    }


def _log(session: Session, user_id: int, kind: str, summary: str, snapshot: dict, *, created: Collection[int] = ()
         ) -> PersonEdit:
    return repo.add_edit(session, user_id, kind, summary, {**snapshot, "created": sorted(created)})


def _label(person: Person) -> str:
    return repr(person.name) if person.name else f"person {person.id}"


# ------------------------------------------------------------------------------ the user's edits


def update_person(session: Session, user_id: int, person_id: int, *, name=UNSET, hidden=UNSET, favorite=UNSET,
                  cover_face_id=UNSET) -> Person:
    """Rename (None or blank clears), hide or show, mark a favourite, or choose the cover face
    (one of the person's own faces); one logged edit, whatever the combination."""
    repo.lock_edits(session, user_id)
    person = repo.get_person(session, user_id, person_id)
    changes = {}
    if name is not UNSET:
        changes["name"] = (name or "").strip() or None
        if changes["name"] is not None and len(changes["name"]) > 255:
            raise Refused("a name has at most 255 characters")
    if hidden is not UNSET:
        changes["hidden"] = bool(hidden)
    if favorite is not UNSET:
        changes["favorite"] = bool(favorite)
    if cover_face_id is not UNSET:
        if cover_face_id is None:
            raise Refused("cover_face_id must be one of the person's faces")
        store_face, owner = repo.get_face(session, user_id, cover_face_id)
        if owner != person.id:
            raise Refused(f"face {cover_face_id} is not a face of person {person.id}")
        changes["cover_face_id"] = store_face.id
    changes = {k: v for k, v in changes.items() if getattr(person, k) != v}
    if not changes:
        return person
    snapshot = _snapshot(session, user_id, [person.id], [])
    words = {"name": lambda v: f"renamed to {v!r}" if v else "name cleared",
             "hidden": lambda v: "hidden" if v else "shown", "favorite": lambda v: "favourite" if v else "not favourite",
             "cover_face_id": lambda v: f"cover set to face {v}"}
    summary = f"{_label(person)}: " + ", ".join(words[k](v) for k, v in changes.items())
    repo.update_person(session, person, **changes)
    _log(session, user_id, "update", summary, snapshot)
    return person


def merge(session: Session, user_id: int, person_id: int, other_ids: Collection[int]) -> tuple[Person, list[dict]]:
    """Every face of ``other_ids`` joins ``person_id`` and the others are deleted; all the
    target's faces are then the user's own links, and the target is confirmed and keeps its
    name (or takes the first merged person's). Faces rejected from a merged person stay rejected
    from the target, and the target's faces, as after a move by hand, are no longer rejected
    from it, so no face ends up in a person it is rejected from. One result per id."""
    others = list(dict.fromkeys(int(p) for p in other_ids))
    if not others:
        raise Refused("no persons to merge given")
    if person_id in others:
        raise Refused("cannot merge a person into itself")
    repo.lock_edits(session, user_id)
    found = repo.get_persons(session, user_id, [person_id, *others], lock=True)
    target = found[person_id]
    members = repo.faces_of_persons(session, [person_id, *others])  # the target's, once merged
    snapshot = _snapshot(session, user_id, [person_id, *others], members)
    counts = Counter(p for _, p, _ in snapshot["links"])
    # The target's own faces become the user's links too: the user has said they are one person
    # with the merged ones, so no re-clustering may take them away (a cluster below the minimum
    # size, or one the embedder splits off, would otherwise leave the merged person).
    repo.move_person_links(session, [person_id, *others], person_id)
    rejected = [tuple(r) for r in snapshot["rejections"]]
    in_target = set(members)
    # a face the user has since put into the target (or into another merged person) is in it:
    # its rejection of a merged person is not carried over
    repo.add_rejections(session, user_id, [(f, person_id) for f, p in rejected
                                           if p in found and p != person_id and f not in in_target])
    repo.delete_rejection_pairs(session, user_id, [(f, p) for f, p in rejected if p == person_id and f in in_target])
    name = target.name or next((found[p].name for p in others if found[p].name), None)
    repo.update_person(session, target, name=name, user_confirmed=True)
    repo.delete_persons(session, user_id, others)
    store.touch_clustering(session, user_id)
    repo.refresh_persons(session, user_id, [person_id])  # confirmed: never dropped when empty
    merged = sum(counts[p] for p in others)
    _log(session, user_id, "merge", f"merged {len(others)} into {_label(target)} ({merged} faces)", snapshot)
    return target, [{"person_id": p, "merged": True, "faces": counts.get(p, 0)} for p in others]


def move_faces(session: Session, user_id: int, face_ids: Collection[int], person_id: int) -> Person:
    """Put faces into a person by hand: 'user' links, which clustering keeps; a rejection of
    these faces from that person is lifted (the user has now said they belong)."""
    repo.lock_edits(session, user_id)
    faces = repo.owned_faces(session, user_id, face_ids)
    target = repo.get_person(session, user_id, person_id, lock=True)
    before = {p for p, _ in repo.links_of(session, user_id, faces).values()}
    snapshot = _snapshot(session, user_id, before | {person_id}, faces)
    repo.set_links(session, dict.fromkeys(faces, person_id), "user")
    repo.delete_rejection_pairs(session, user_id, [(f, person_id) for f in faces])
    _after_link_change(session, user_id, before | {person_id})
    _log(session, user_id, "move", f"moved {len(faces)} faces to {_label(target)}", snapshot)
    return target


def split_faces(session: Session, user_id: int, face_ids: Collection[int]) -> Person:
    """Take faces out of wherever they are into a new person the user made (confirmed, so it
    stays when re-clustering leaves it empty)."""
    repo.lock_edits(session, user_id)
    faces = repo.owned_faces(session, user_id, face_ids)
    before = {p for p, _ in repo.links_of(session, user_id, faces).values()}
    snapshot = _snapshot(session, user_id, before, faces)
    person = repo.new_person(session, user_id, confirmed=True)
    repo.set_links(session, dict.fromkeys(faces, person.id), "user")
    _after_link_change(session, user_id, before | {person.id})
    _log(session, user_id, "split", f"split {len(faces)} faces into person {person.id}", snapshot,
         created=[person.id])
    return person


def reject_face(session: Session, user_id: int, person_id: int, face_id: int) -> Person:
    """"Not this person": the face leaves the person (it is then in no person) and no later
    assignment or re-clustering puts it back into it."""
    repo.lock_edits(session, user_id)
    person = repo.get_person(session, user_id, person_id, lock=True)
    face, owner = repo.get_face(session, user_id, face_id)
    if owner != person.id:
        raise NotFound(f"face {face_id} in person {person_id}")
    snapshot = _snapshot(session, user_id, [person.id], [face.id])
    label = _label(person)
    last = {k: getattr(person, k) for k in ("id", "user_id", "created_at", *repo.PERSON_FIELDS)}
    repo.unlink(session, [face.id])
    repo.add_rejections(session, user_id, [(face.id, person.id)])
    _after_link_change(session, user_id, [person.id])
    _log(session, user_id, "reject", f"face {face.id} is not {label}", snapshot)
    if not repo.existing_persons(session, user_id, [last["id"]]):
        # Its last face gone, an automatic person is deleted (undo brings it back): its last state.
        return Person(**{**last, "face_count": 0, "cover_face_id": None})
    return person


def undo(session: Session, user_id: int) -> PersonEdit:
    """Revert the user's newest edit not undone yet: persons, links and rejections it touched
    go back to how they were (faces deleted since stay deleted)."""
    repo.lock_edits(session, user_id)
    edit = repo.last_open_edit(session, user_id)
    if edit is None:
        raise NothingToUndo("nothing to undo")
    state = edit.undo
    persons = set(state["person_ids"]) | set(state.get("created", []))
    faces = [f for f, _, _ in state["links"]]
    now_in = {p for p, _ in repo.links_of(session, user_id, faces).values()}
    for row in state["persons"]:
        repo.restore_person(session, user_id, row)
    repo.restore_links(session, [tuple(link) for link in state["links"]])
    repo.delete_rejections(session, user_id, face_ids=faces, person_ids=persons)
    alive = repo.existing_persons(session, user_id, {p for _, p in state["rejections"]})
    kept = store.face_photo_ids(session, user_id, {f for f, _ in state["rejections"]})  # faces not deleted since
    repo.add_rejections(session, user_id, [(f, p) for f, p in state["rejections"] if p in alive and f in kept])
    created = [p for p in state.get("created", []) if not repo.faces_of_persons(session, [p])]
    repo.delete_persons(session, user_id, created)
    if faces:
        _after_link_change(session, user_id, persons | now_in)
    else:
        repo.refresh_persons(session, user_id, persons)
    repo.mark_undone(session, edit)
    return edit


def edits(session: Session, user_id: int, limit: int = 20) -> list[PersonEdit]:
    return repo.edits(session, user_id, limit)


# ------------------------------------------------------------------------------ clustering


def _best_matching(overlap: Mapping[tuple[int, int], int]) -> dict[int, int]:
    """label -> person, at most one each way, keeping the most faces in their person: the
    assignment of largest total overlap (the Hungarian method, per group of labels and persons
    connected by overlaps), ties to older persons. Greedy (largest overlap first) can lose:
    cluster X = 5 faces of person P + 4 of Q, cluster Y = the other 4 of P; greedy gives X to P
    and empties Q (8 faces change person), the best assignment gives X to Q and Y to P (5)."""
    from scipy.optimize import linear_sum_assignment

    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def root(node):
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for label, person_id in overlap:
        parent[root(("l", label))] = root(("p", person_id))
    groups: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for pair in overlap:
        groups.setdefault(root(("l", pair[0])), []).append(pair)
    chosen: dict[int, int] = {}
    for pairs in groups.values():
        labels = sorted({label for label, _ in pairs})
        persons = sorted({person_id for _, person_id in pairs})
        if len(pairs) == 1:
            chosen[labels[0]] = persons[0]
            continue
        if len(labels) * len(persons) > MATCH_CELLS:  # too big to solve exactly: largest overlap first
            taken: set[int] = set()
            for label, person_id in sorted(pairs, key=lambda pair: (-overlap[pair], pair[1], pair[0])):
                if label not in chosen and person_id not in taken:
                    chosen[label] = person_id
                    taken.add(person_id)
            continue
        row = {label: i for i, label in enumerate(labels)}
        col = {person_id: j for j, person_id in enumerate(persons)}
        # Overlaps scaled so that the tie-breaks (older persons weigh more) add up to less than one face.
        scale = len(labels) * len(persons) + 1
        weight = np.zeros((len(labels), len(persons)))
        for label, person_id in pairs:
            weight[row[label], col[person_id]] = overlap[label, person_id] * scale + len(persons) - col[person_id]
        rows, cols = linear_sum_assignment(weight, maximize=True)
        chosen.update({labels[i]: persons[j] for i, j in zip(rows, cols) if weight[i, j] > 0})
    return chosen


def apply_clustering(session: Session, user_id: int, labels: Mapping[int, int]) -> dict[int, int]:
    """Replace the user's automatic links with a new clustering (face id -> label; negative or
    missing = in no person). Returns label -> person id for every label that got a person.

    Clusters take over existing persons by the faces they share (user and auto links counted;
    one person per cluster): the assignment that keeps the most faces in the person they were in
    (``_best_matching``), ties to older persons, so ids, names and flags stay while most faces
    stay together; other clusters get new persons.
    A person the user confirmed (merged, split) takes every cluster whose faces are mostly its
    own: the user said those faces are one person, even where the embedder sees two clusters.
    'user' links are never touched, and no face goes into a person it was rejected from.
    A face of a person the user named that the new clustering leaves in no person stays in it:
    the user has vouched for that person, and a face near the cut that a few new photos push
    out of every cluster (a named person of 5 faces losing one on LFW-dev, benchmarks/stability.py)
    is not lost from it; a face the clustering puts into another person still moves.
    """
    unknown = set(labels) - set(store.face_photo_ids(session, user_id, labels))
    if unknown:
        raise NotFound(f"faces {sorted(unknown)[:10]}")
    links = repo.user_links(session, user_id)
    overlap = Counter((label, links[f][0]) for f, label in labels.items() if label >= 0 and f in links)
    ranked = sorted(overlap, key=lambda pair: (-overlap[pair], pair[1], pair[0]))
    mostly: dict[int, int] = {}  # label -> the person most of its linked faces are in
    for label, person_id in ranked:
        mostly.setdefault(label, person_id)
    confirmed = repo.confirmed_persons(session, user_id, set(mostly.values()))
    person_of = {label: person_id for label, person_id in mostly.items() if person_id in confirmed}
    taken = set(person_of.values())
    person_of.update(_best_matching({pair: n for pair, n in overlap.items()
                                     if pair[0] not in person_of and pair[1] not in taken}))

    placed = {f: label for f, label in labels.items() if label >= 0 and links.get(f, (None, "auto"))[1] == "auto"}
    new_labels = sorted(set(placed.values()) - person_of.keys())
    person_of.update(zip(new_labels, repo.new_persons(session, user_id, len(new_labels))))

    rejected = repo.rejected_persons(session, user_id)
    target = {f: person_of[label] for f, label in placed.items() if person_of[label] not in rejected.get(f, ())}
    auto = {f: p for f, (p, source) in links.items() if source == "auto"}
    named = repo.named_persons(session, user_id, set(auto.values()))
    stays = {f for f, p in auto.items() if p in named and labels.get(f, -1) < 0}
    repo.apply_link_changes(
        session,
        removed=[f for f in auto if f not in target and f not in stays],
        moved={f: target[f] for f in auto if f in target and target[f] != auto[f]},
        added={f: p for f, p in target.items() if f not in links})
    store.touch_clustering(session, user_id)
    repo.drop_empty_auto_persons(session, user_id)
    repo.refresh_persons(session, user_id)
    alive = repo.existing_persons(session, user_id, set(person_of.values()))
    return {label: p for label, p in person_of.items() if p in alive}


def link_new_faces(session: Session, user_id: int, links: Mapping[int, int]) -> dict[int, int]:
    """The cluster worker's automatic links face -> existing person; returns those made.

    Faces already in a person, persons gone or another user's, and persons a face was rejected
    from are skipped, so a replay is harmless and a stale worker cannot resurrect a merged person.
    It leaves the clustering revision alone: the worker's copy has these links already.
    """
    if not links:
        return {}
    persons = repo.existing_persons(session, user_id, set(links.values()), lock=True)
    free = repo.unlinked_faces(session, user_id, links.keys())
    rejected = repo.rejected_persons(session, user_id, links.keys())
    wanted = {f: p for f, p in links.items() if f in free and p in persons and p not in rejected.get(f, ())}
    linked = repo.add_auto_links(session, wanted)
    made = {f: p for f, p in wanted.items() if f in linked}
    repo.refresh_persons(session, user_id, set(made.values()))
    return made


def new_person(session: Session, user_id: int, face_ids: Collection[int]) -> tuple[int | None, set[int]]:
    """A new person (automatic) of those of ``face_ids`` that are the user's and in no person;
    (None, empty set) when none is free, so a replay never leaves an empty person behind."""
    free = repo.unlinked_faces(session, user_id, face_ids)
    if not free:
        return None, set()
    person = repo.new_person(session, user_id)
    linked = repo.add_auto_links(session, dict.fromkeys(sorted(free), person.id))
    if not linked:
        repo.delete_persons(session, user_id, [person.id])
        return None, set()
    repo.refresh_persons(session, user_id, [person.id])
    return person.id, linked


# ------------------------------------------------------------------------------ deletion


def delete_photo(session: Session, user_id: int, photo_id: int) -> list[int]:
    """Delete a photo with its faces, embeddings, links and rejections (schema cascade); returns
    the ids of the faces it had, for the callers' caches."""
    faces = store.photo_face_ids(session, user_id, photo_id)
    persons = {p for p, _ in repo.links_of(session, user_id, faces).values()} if faces else set()
    store.delete_photo(session, user_id, photo_id)
    _after_link_change(session, user_id, persons)
    return faces


def delete_user(session: Session, user_id: int) -> None:
    """Delete the user with every photo, face, embedding, person, token and edit (cascade)."""
    store.delete_user(session, user_id)


# ------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class _Vectors:
    face_ids: np.ndarray
    person_of: np.ndarray  # -1 = in no person
    x: np.ndarray


def _vectors(session: Session, user_id: int) -> _Vectors:
    ids, x = store.user_embeddings(session, user_id, model_version=store.main_model_version(session, user_id))
    links = repo.face_links(session, user_id)
    person_of = np.array([links.get(int(f), -1) for f in ids], np.int64)
    return _Vectors(ids, person_of, x)


def suggestions(session: Session, user_id: int, person_id: int, limit: int = 10) -> list[tuple[Person, float]]:
    """Other persons most like this one (cosine of face centroids): merge candidates."""
    from .suggest import person_centroids, similar_persons

    repo.get_person(session, user_id, person_id)
    v = _vectors(session, user_id)
    linked = v.person_of >= 0
    if not linked.any():
        return []
    person_ids, centroids = person_centroids(v.person_of[linked], v.x[linked])
    if person_id not in set(person_ids.tolist()):
        return []
    ranked = similar_persons(person_ids, centroids, person_id, limit)
    found = repo.get_persons(session, user_id, [p for p, _ in ranked]) if ranked else {}
    return [(found[p], float(s)) for p, s in ranked]


def uncertain_faces(session: Session, user_id: int, limit: int = 10) -> list[tuple[int, int, float]]:
    """(face id, person id, margin) of the faces the clustering is least sure of, least sure first."""
    from .suggest import least_sure_faces, person_centroids

    v = _vectors(session, user_id)
    linked = v.person_of >= 0
    if not linked.any():
        return []
    person_ids, centroids = person_centroids(v.person_of[linked], v.x[linked])
    ranked = least_sure_faces(v.face_ids[linked], v.person_of[linked], v.x[linked], person_ids, centroids, limit)
    person_of = dict(zip(v.face_ids.tolist(), v.person_of.tolist()))
    return [(int(f), int(person_of[int(f)]), float(m)) for f, m in ranked]
