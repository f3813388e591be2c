"""Stability of re-clustering through the rules layer: does a second run change nothing, do
named persons keep their faces when 10% more photos arrive, and does every decision of the
user survive?

    python benchmarks/stability.py --faces 20000 --json
    python benchmarks/stability.py --vectors out/scale/lfw_dev_sface.npz   # real SFace vectors

One user on a fresh SQLite library (the project's own store and migrations, nothing mocked):

1. 90% of the photos (a random 10% held out) are stored and re-clustered by the real batch job
   (``services.recluster.recluster_user``); then a simulated user, through the functions the API
   calls (``services.persons.service``), names every person of at least 3 faces (``--name-half``:
   a random half of them), hides some, marks some favourite with a cover of their choosing,
   confirms the faces the clustering is least sure of (a move into their own person, as the
   page's "yes, this is them" does), moves misplaced faces into the person of their true
   identity, rejects misplaced faces ("not this person"), merges persons the clustering split
   and splits faces of another identity out of a person (``--edits`` of each kind). Faces to
   correct are picked with the truth where it shows a mistake, at random otherwise (counted).
2. Re-clustering again must change nothing: the job's plan (persons created, deleted, merged,
   split, changed; faces moved), and the persons, links and rejections compared row by row.
3. The held-out photos are stored and the user re-clustered: for each named person, the share of
   the faces it had before that it still has (min, p1, median, how many below 99%), and the
   share of the user's decisions that survived (names, hidden and favourite flags, chosen
   covers, every face the user placed by a confirm, move, merge or split still where they put
   it, every rejection still recorded and honoured, merged persons still confirmed): must be 100%.
   An unnamed person the re-clustering empties goes with its rejections (the rules drop it); its
   rejection counts as kept when the face is in no person with any face that person had.

Each re-clustering is timed (the job's transaction, clustering included); ``peak_rss_mb`` is
the process's, the faces' vectors included. Synthetic faces come from benchmarks/synth_faces.py;
with ``--vectors`` (an .npz of ``synth_faces.py extract``) the real faces are used instead, the
truth being the LFW-dev identity of each photo's central face (other faces have none and are
never picked for a correction).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_faces import central_faces, generate  # noqa: E402

from facecore.types import FaceRecord, PhotoResult  # noqa: E402
from services.persons import repository as persons_repo  # noqa: E402
from services.persons import service as person_service  # noqa: E402
from services.recluster import Plan, recluster_user  # noqa: E402
from services.store import repository as repo  # noqa: E402
from services.store.db import make_engine, migrate, session_factory  # noqa: E402
from services.store.models import FaceRejection, Person  # noqa: E402

MODEL = "sface-2021dec"
USER = "stability"
KEEP = 0.99  # the share of its faces a named person must keep


# ------------------------------------------------------------------------------ the faces


@dataclass
class Faces:
    x: np.ndarray       # (n, d) unit float32
    truth: np.ndarray   # (n,) identity, -1 unknown
    photo: np.ndarray   # (n,) photo id


def synthetic(n: int, seed: int) -> Faces:
    g = generate(n, seed)
    return Faces(g.x, g.person, g.photo)


def real(npz: Path) -> Faces:
    """Every face of an ``extract``-ed .npz; the identity (the folder) only for the face nearest
    each 250x250 LFW image's centre, the one the folder names."""
    d = np.load(npz)
    best = central_faces(d)
    names = {name: k for k, name in enumerate(sorted({u.split("/")[0] for u in d["uri"]}))}
    truth = np.full(len(d["x"]), -1, np.int64)
    for u, i in best.items():
        truth[i] = names[u.split("/")[0]]
    return Faces(d["x"].astype(np.float32), truth, d["photo"].astype(np.int64))


def store_photos(sessions: sessionmaker[Session], faces: Faces, photos: np.ndarray) -> dict[int, int]:
    """Store these photos (ids of ``faces.photo``) with their faces, in one transaction;
    face id -> row of ``faces``."""
    rows: dict[int, int] = {}
    with sessions() as session:
        user = repo.get_or_create_user(session, USER)
        for p in photos:
            members = np.flatnonzero(faces.photo == p)
            key = f"photo-{int(p)}.jpg"
            result = PhotoResult(key=key, sha256=hashlib.sha256(key.encode()).hexdigest(), width=250, height=250,
                                 faces=[FaceRecord(index=k, box=np.array((60, 60, 190, 190), np.float32),
                                                   landmarks=np.zeros((5, 2), np.float32), det_score=0.99 - 1e-6 * r,
                                                   blur=0.5, blurry=False, trash_score=0.0, is_trash=False,
                                                   embedding=faces.x[r], model_version=MODEL)
                                        for k, r in enumerate(members)])
            saved = repo.save_photo_result(session, user.id, key, result)
            rows.update(zip(saved.face_ids, members.tolist()))
        session.commit()
    return rows


# ------------------------------------------------------------------------------ state and decisions


@dataclass(frozen=True)
class State:
    persons: dict[int, tuple]            # person id -> (name, hidden, favorite, confirmed, cover)
    links: dict[int, tuple[int, str]]    # face id -> (person id, source)
    rejections: frozenset                # (face id, person id)

    def members(self) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        for f, (p, _) in self.links.items():
            out.setdefault(p, set()).add(f)
        return out


def state(sessions: sessionmaker[Session], user_id: int) -> State:
    with sessions() as session:
        persons = {p.id: (p.name, p.hidden, p.favorite, p.user_confirmed, p.cover_face_id)
                   for p in session.scalars(sa.select(Person).where(Person.user_id == user_id))}
        rejections = frozenset(session.execute(sa.select(FaceRejection.face_id, FaceRejection.person_id)
                                               .where(FaceRejection.user_id == user_id)).all())
        return State(persons, persons_repo.user_links(session, user_id), rejections)


@dataclass
class Decisions:
    """What the simulated user decided, to be found again after every re-clustering."""
    names: dict[int, str] = field(default_factory=dict)
    hidden: set[int] = field(default_factory=set)
    favourite: set[int] = field(default_factory=set)
    covers: dict[int, int] = field(default_factory=dict)       # person -> face
    placed: dict[int, int] = field(default_factory=dict)       # face -> person (every 'user' link)
    rejected: dict[tuple[int, int], frozenset] = field(default_factory=dict)  # (face, person) -> its faces then
    merged: dict[int, list[int]] = field(default_factory=dict)  # target -> persons merged into it
    picked: dict[str, str] = field(default_factory=dict)        # how each kind's faces were chosen

    def count(self) -> dict[str, int]:
        return {"names": len(self.names), "hidden": len(self.hidden), "favourite": len(self.favourite),
                "covers": len(self.covers), "placed": len(self.placed), "rejected": len(self.rejected),
                "merged": len(self.merged)}


def survived(decisions: Decisions, now: State) -> dict[str, int]:
    """Per kind, how many of the decisions hold in ``now``."""
    p = now.persons
    return {
        "names": sum(p.get(q, (None,))[0] == n for q, n in decisions.names.items()),
        "hidden": sum(q in p and p[q][1] for q in decisions.hidden),
        "favourite": sum(q in p and p[q][2] for q in decisions.favourite),
        "covers": sum(q in p and p[q][4] == f for q, f in decisions.covers.items()),
        "placed": sum(now.links.get(f) == (q, "user") for f, q in decisions.placed.items()),
        "rejected": sum(_rejection_holds(f, q, then, now) for (f, q), then in decisions.rejected.items()),
        "merged": sum(q in p and p[q][3] and not any(o in p for o in others)
                      for q, others in decisions.merged.items()),
    }


def _rejection_holds(face: int, person: int, then: frozenset, now: State) -> bool:
    """Recorded and the face not in the person; or, where a re-clustering emptied the automatic
    person (dropped with its rejections; ids are never reused), the face is in no person with
    any face the person had when the user rejected it."""
    if person in now.persons:
        return (face, person) in now.rejections and now.links.get(face, (None,))[0] != person
    where = now.links.get(face, (None,))[0]
    return where is None or not any(now.links.get(f, (None,))[0] == where for f in then)


def dropped_rejections(decisions: Decisions, now: State) -> int:
    """Rejections whose (automatic) person a re-clustering emptied and dropped."""
    return sum(q not in now.persons for _, q in decisions.rejected)


# ------------------------------------------------------------------------------ the simulated user


def _majority(members: dict[int, set[int]], truth_of: Callable[[int], int]) -> dict[int, int]:
    """person -> the identity most of its known faces have (-1: none known)."""
    out = {}
    for p, fs in members.items():
        known = Counter(t for t in map(truth_of, fs) if t >= 0)
        out[p] = known.most_common(1)[0][0] if known else -1
    return out


def simulate_user(sessions: sessionmaker[Session], user_id: int, truth_of: Callable[[int], int], *, edits: int,
                  name_half: bool, seed: int) -> Decisions:
    """The edits of step 1, each through ``persons.service`` and committed as the API does."""
    rng = np.random.default_rng(seed)
    d = Decisions()

    def edit(fn: Callable[[Session], object]) -> None:
        with sessions() as session:
            fn(session)
            session.commit()

    def pick(items: list, k: int) -> list:
        return [items[i] for i in sorted(rng.choice(len(items), min(k, len(items)), replace=False))] if items else []

    now = state(sessions, user_id)
    members = now.members()
    big = sorted(p for p, fs in members.items() if len(fs) >= 3)
    named = pick(big, (len(big) + 1) // 2) if name_half else big
    for k, q in enumerate(named):
        edit(lambda s, q=q, k=k: person_service.update_person(s, user_id, q, name=f"Person {k}"))
    for q in pick(named, edits):
        edit(lambda s, q=q: person_service.update_person(s, user_id, q, hidden=True))
    for q in pick([q for q in named if len(members[q]) >= 2], edits):
        cover = max(members[q])  # not the automatic cover, the best-scored (oldest) face
        edit(lambda s, q=q, f=cover: person_service.update_person(s, user_id, q, favorite=True, cover_face_id=f))

    # Merges: persons whose faces are mostly one identity that another person holds too.
    majority = _majority(members, truth_of)
    by_identity: dict[int, list[int]] = {}
    for q in sorted(members):
        if majority[q] >= 0:
            by_identity.setdefault(majority[q], []).append(q)
    pairs = [ps[:2] for ps in by_identity.values() if len(ps) >= 2]
    true_pairs = len(pairs)
    pairs = pick(pairs, edits)
    if len(pairs) < edits:  # the clustering split too few: merge random persons, as a user might
        rest = pick([q for q in sorted(members) if not any(q in pair for pair in pairs)], 2 * (edits - len(pairs)))
        pairs += [rest[i:i + 2] for i in range(0, len(rest) - 1, 2)]
    d.picked["merge"] = f"{min(true_pairs, len(pairs))} of {len(pairs)} pairs one identity split by the clustering"
    for a, b in pairs:
        edit(lambda s, a=a, b=b: person_service.merge(s, user_id, a, [b]))

    # Faces in a person of another identity: split out (several of one identity), moved to the
    # person of their identity, or rejected.
    now = state(sessions, user_id)
    members = now.members()
    majority = _majority(members, truth_of)
    # identity -> its largest person (the later, larger ones overwrite)
    home = {t: q for q, t in sorted(majority.items(), key=lambda item: (len(members[item[0]]), -item[0])) if t >= 0}
    wrong = [(f, q) for q in sorted(members) for f in sorted(members[q])
             if majority[q] >= 0 and 0 <= truth_of(f) != majority[q] and now.links[f][1] == "auto"]

    groups: dict[tuple[int, int], list[int]] = {}
    for f, q in wrong:
        groups.setdefault((q, truth_of(f)), []).append(f)
    splits = [fs for fs in groups.values() if len(fs) >= 2]
    n_true = min(len(splits), edits)
    splits = pick(splits, edits)
    if len(splits) < edits:
        autos = [q for q in sorted(members) if sum(now.links[f][1] == "auto" for f in members[q]) >= 6]
        splits += [sorted(f for f in members[q] if now.links[f][1] == "auto")[:2] for q in pick(autos, edits - len(splits))]
    d.picked["split"] = f"{n_true} of {len(splits)} splits faces of another identity"
    for fs in splits:
        edit(lambda s, fs=fs: person_service.split_faces(s, user_id, fs))

    taken = {f for fs in splits for f in fs}
    wrong = [(f, q) for f, q in wrong if f not in taken]
    movable = [(f, home[truth_of(f)]) for f, q in wrong if truth_of(f) in home and home[truth_of(f)] != q]
    moves = pick(movable, edits)
    n_true = len(moves)
    if len(moves) < edits:
        now = state(sessions, user_id)
        autos = sorted(f for f, (q, src) in now.links.items() if src == "auto" and f not in taken)
        targets = sorted(now.persons)
        for f in pick(autos, edits - len(moves)):
            moves.append((f, next(q for q in pick(targets, 2) if q != now.links[f][0])))
    d.picked["move"] = f"{n_true} of {len(moves)} moves a misplaced face into its identity's person"
    for f, q in moves:
        edit(lambda s, f=f, q=q: person_service.move_faces(s, user_id, [f], q))

    taken |= {f for f, _ in moves}
    now = state(sessions, user_id)
    rejects = pick([(f, q) for f, q in wrong if f not in taken and now.links.get(f) == (q, "auto")], edits)
    n_true = len(rejects)
    if len(rejects) < edits:
        autos = sorted(f for f, (q, src) in now.links.items() if src == "auto" and f not in taken)
        rejects += [(f, now.links[f][0]) for f in pick(autos, edits - len(rejects))]
    d.picked["reject"] = f"{n_true} of {len(rejects)} rejections of a face of another identity"
    for f, q in rejects:
        edit(lambda s, f=f, q=q: person_service.reject_face(s, user_id, q, f))

    with sessions() as session:
        unsure = person_service.uncertain_faces(session, user_id, limit=edits)
    d.picked["confirm"] = f"{len(unsure)} least sure faces confirmed in their person"
    for f, q, _ in unsure:
        edit(lambda s, f=f, q=q: person_service.move_faces(s, user_id, [f], q))

    # The decisions, as the rules layer holds them now that the user is done.
    now = state(sessions, user_id)
    d.names = {q: v[0] for q, v in now.persons.items() if v[0]}
    d.hidden = {q for q, v in now.persons.items() if v[1]}
    d.favourite = {q for q, v in now.persons.items() if v[2]}
    d.covers = {q: now.persons[q][4] for q in d.favourite}
    d.placed = {f: q for f, (q, src) in now.links.items() if src == "user"}
    members = now.members()
    d.rejected = {(f, q): frozenset(members.get(q, ())) for f, q in now.rejections}
    d.merged = {a: [b] for a, b in pairs if a in now.persons}
    return d


# ------------------------------------------------------------------------------ the run


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _quantiles(shares: list[float]) -> dict:
    a = np.array(shares) if shares else np.ones(1)
    return {"min": round(float(a.min()), 4), "p1": round(float(np.percentile(a, 1)), 4),
            "median": round(float(np.median(a)), 4), "below_99": int((a < KEEP).sum())}


def _timed(sessions: sessionmaker[Session]) -> tuple[Plan, float]:
    t = time.perf_counter()
    plan = recluster_user(sessions, USER)
    return plan, time.perf_counter() - t


def run(sessions: sessionmaker[Session], faces: Faces, *, held_out: float = 0.1, edits: int = 10,
        name_half: bool = False, seed: int = 0, log: Callable[[str], None] = lambda _: None) -> dict:
    """Steps 1-3 on ``sessions`` (a migrated, empty library); the result as a dict."""
    rng = np.random.default_rng(seed)
    photos = np.unique(faces.photo)
    later = np.sort(rng.choice(photos, int(round(held_out * len(photos))), replace=False))
    first = np.setdiff1d(photos, later)

    rows = store_photos(sessions, faces, first)
    with sessions() as session:
        user_id = repo.find_user(session, USER).id
    plan1, t1 = _timed(sessions)
    log(f"1. {len(rows)} faces of {len(first)} photos clustered in {t1:.1f}s: {plan1.line()}")
    decisions = simulate_user(sessions, user_id, lambda f: int(faces.truth[rows[f]]), edits=edits,
                              name_half=name_half, seed=seed)
    before = state(sessions, user_id)
    named = {q: before.members().get(q, set()) for q in decisions.names}
    log(f"   the user: {decisions.count()}; " + "; ".join(decisions.picked.values()))

    plan2, t2 = _timed(sessions)
    again = state(sessions, user_id)
    kept2 = survived(decisions, again)
    log(f"2. again in {t2:.1f}s: {plan2.line()}")

    new_rows = store_photos(sessions, faces, later)
    plan3, t3 = _timed(sessions)
    after = state(sessions, user_id)
    kept3 = survived(decisions, after)
    members = after.members()
    shares = [len(fs & members.get(q, set())) / len(fs) for q, fs in named.items() if fs]
    lost = sorted(((len(fs & members.get(q, set())) / len(fs), q, len(fs)) for q, fs in named.items() if fs))[:5]
    log(f"3. {len(new_rows)} faces of {len(later)} photos added, re-clustered in {t3:.1f}s: {plan3.line()}")
    total = decisions.count()
    return {
        "faces": len(rows), "photos": len(first), "added_faces": len(new_rows), "added_photos": len(later),
        "persons": plan1.counts()["created"], "named": len(named), "name_half": name_half,
        "decisions": total, "picked": decisions.picked,
        "second": {"plan": plan2.counts(), "rows_changed": _changed(before, again),
                   "decisions_kept": round(sum(kept2.values()) / max(1, sum(total.values())), 6)},
        "added": {"plan": plan3.counts(), "named_keep": _quantiles(shares),
                  "worst_named": [{"person": q, "faces": n, "kept": round(s, 4)} for s, q, n in lost],
                  "decisions_kept": round(sum(kept3.values()) / max(1, sum(total.values())), 6),
                  "decisions_lost": {k: total[k] - kept3[k] for k in total if kept3[k] != total[k]},
                  "rejections_of_dropped_persons": dropped_rejections(decisions, after)},
        "seconds": {"first": round(t1, 2), "second": round(t2, 2), "added": round(t3, 2)},
        "peak_rss_mb": round(rss_peak_mb()),
    }


def _changed(a: State, b: State) -> dict[str, int]:
    """Rows that differ between two states: persons (any field), links, rejections."""
    return {"persons": sum(a.persons.get(q) != b.persons.get(q) for q in set(a.persons) | set(b.persons)),
            "links": sum(a.links.get(f) != b.links.get(f) for f in set(a.links) | set(b.links)),
            "rejections": len(a.rejections ^ b.rejections)}


def table(r: dict) -> str:
    s, a = r["second"], r["added"]
    lines = [
        f"{r['faces']} faces in {r['photos']} photos, {r['persons']} persons, {r['named']} named"
        f" ({'a random half' if r['name_half'] else 'all'} of those with >= 3 faces)",
        "decisions: " + ", ".join(f"{k} {v}" for k, v in r["decisions"].items()),
        *(f"  {k}: {v}" for k, v in r["picked"].items()),
        f"{'step':<28}{'seconds':>9}  result",
        f"{'1. first clustering':<28}{r['seconds']['first']:>9.2f}",
        f"{'2. re-clustered again':<28}{r['seconds']['second']:>9.2f}  plan {s['plan']}, rows changed "
        f"{s['rows_changed']}, decisions kept {s['decisions_kept']:.2%}",
        f"{'3. +' + str(r['added_faces']) + ' faces, re-clustered':<28}{r['seconds']['added']:>9.2f}  plan {a['plan']}",
        f"   named persons keeping their faces: min {a['named_keep']['min']:.2%}, p1 {a['named_keep']['p1']:.2%},"
        f" median {a['named_keep']['median']:.2%}, {a['named_keep']['below_99']} below 99%",
        f"   decisions kept {a['decisions_kept']:.2%}" + (f", lost {a['decisions_lost']}" if a["decisions_lost"] else "")
        + f" ({a['rejections_of_dropped_persons']} rejections of automatic persons the re-clustering emptied)",
        f"peak RSS {r['peak_rss_mb']} MB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=20_000, help="synthetic faces (all photos, the held-out ones included)")
    ap.add_argument("--vectors", type=Path, help="real vectors (.npz of synth_faces.py extract) instead of synthetic")
    ap.add_argument("--held-out", type=float, default=0.1, help="share of photos added in step 3")
    ap.add_argument("--edits", type=int, default=10, help="edits of each kind the simulated user makes")
    ap.add_argument("--name-half", action="store_true", help="name a random half of the persons of >= 3 faces")
    ap.add_argument("--threads", type=int, default=0, help="faiss threads (0: faiss's default)")
    ap.add_argument("--db", type=Path, help="SQLite file (default: a temporary one; an old one is removed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    args = ap.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    faces = real(args.vectors) if args.vectors else synthetic(args.faces, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "library.db"
        for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            f.unlink(missing_ok=True)
        engine = make_engine(f"sqlite:///{db}")
        migrate(engine)
        result = run(session_factory(engine), faces, held_out=args.held_out, edits=args.edits,
                     name_half=args.name_half, seed=args.seed,
                     log=(lambda _: None) if args.json else (lambda line: print(line, file=sys.stderr)))
        engine.dispose()
    result["source"] = str(args.vectors.name) if args.vectors else f"synthetic seed {args.seed}"
    print(json.dumps(result) if args.json else table(result))


if __name__ == "__main__":
    main()
