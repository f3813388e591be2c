"""Every SQL statement about persons: links, covers and counts, "not this person", the edit log,
and the pages the API reads. Rules (when to call what) live in ``service.py``; nothing here commits.

Every function takes the ``user_id`` it is asked for and filters by it, so another user's id is
treated exactly like one that does not exist (``NotFound``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from services.store.models import Face, FacePerson, FaceRejection, Person, PersonEdit, Photo
from services.store.repository import NotFound

_face_person = FacePerson.__table__

# What a person's row says apart from its faces: what an edit changes and an undo puts back.
PERSON_FIELDS = ("name", "hidden", "favorite", "user_confirmed", "cover_face_id")


# ------------------------------------------------------------------------------ persons


def get_person(session: Session, user_id: int, person_id: int, *, lock: bool = False) -> Person:
    """``lock`` holds the row until commit: edits that move links lock the persons they touch."""
    query = sa.select(Person).where(Person.id == person_id, Person.user_id == user_id)
    person = session.scalar(query.with_for_update() if lock else query)
    if person is None:
        raise NotFound(f"person {person_id}")
    return person


def get_persons(session: Session, user_id: int, person_ids: Collection[int], *, lock: bool = False
                ) -> dict[int, Person]:
    """The user's persons among ``person_ids``; NotFound names the first that is not theirs."""
    wanted = list(dict.fromkeys(int(p) for p in person_ids))
    query = sa.select(Person).where(Person.user_id == user_id, Person.id.in_(wanted)).order_by(Person.id)
    found = {p.id: p for p in session.scalars(query.with_for_update() if lock else query)}
    for person_id in wanted:
        if person_id not in found:
            raise NotFound(f"person {person_id}")
    return found


def confirmed_persons(session: Session, user_id: int, person_ids: Collection[int]) -> set[int]:
    """Those of ``person_ids`` the user confirmed (by a merge or a split)."""
    return set(session.scalars(sa.select(Person.id).where(Person.user_id == user_id, Person.user_confirmed.is_(True),
                                                          Person.id.in_(list(person_ids)))))


def named_persons(session: Session, user_id: int, person_ids: Collection[int]) -> set[int]:
    """Those of ``person_ids`` the user gave a name."""
    return set(session.scalars(sa.select(Person.id).where(Person.user_id == user_id, Person.name.is_not(None),
                                                          Person.id.in_(list(person_ids)))))


def new_person(session: Session, user_id: int, *, confirmed: bool = False) -> Person:
    person = Person(user_id=user_id, user_confirmed=confirmed)
    session.add(person)
    session.flush()
    return person


def new_persons(session: Session, user_id: int, n: int) -> list[int]:
    persons = [Person(user_id=user_id) for _ in range(n)]
    session.add_all(persons)
    session.flush()
    return [p.id for p in persons]


def person_rows(session: Session, user_id: int, person_ids: Collection[int]) -> list[dict]:
    """The fields of :data:`PERSON_FIELDS` (and id, created_at) of those persons that exist."""
    columns = [getattr(Person, f) for f in PERSON_FIELDS]
    rows = session.execute(sa.select(Person.id, Person.created_at, *columns)
                           .where(Person.user_id == user_id, Person.id.in_(list(person_ids))))
    return [{**row._asdict(), "created_at": row.created_at.isoformat() if row.created_at else None}
            for row in rows]


def restore_person(session: Session, user_id: int, row: Mapping) -> None:
    """Put a person's row back as ``row`` says, creating it under its old id if it is gone; a
    cover face deleted since is left out (``refresh_persons`` picks the best face left)."""
    values = {f: row[f] for f in PERSON_FIELDS}
    if values["cover_face_id"] is not None and session.scalar(sa.select(Face.id).where(
            Face.id == values["cover_face_id"], Face.user_id == user_id)) is None:
        values["cover_face_id"] = None
    if session.execute(sa.update(Person).where(Person.id == row["id"], Person.user_id == user_id)
                       .values(**values).execution_options(synchronize_session=False)).rowcount:
        return
    created = datetime.fromisoformat(row["created_at"]) if row.get("created_at") else None
    session.execute(sa.insert(Person).values(id=row["id"], user_id=user_id, **values,
                                             **({"created_at": created} if created else {})))


def update_person(session: Session, person: Person, **values) -> None:
    for field, value in values.items():
        setattr(person, field, value)
    session.flush()


def delete_persons(session: Session, user_id: int, person_ids: Collection[int]) -> None:
    session.execute(sa.delete(Person).where(Person.user_id == user_id, Person.id.in_(list(person_ids)))
                    .execution_options(synchronize_session=False))


def drop_empty_auto_persons(session: Session, user_id: int, person_ids: Collection[int] | None = None) -> None:
    """Delete the persons (of ``person_ids``, or all) nobody named or confirmed that have no faces."""
    query = sa.delete(Person).where(
        Person.user_id == user_id, Person.name.is_(None), Person.user_confirmed.is_(False),
        ~sa.exists().where(FacePerson.person_id == Person.id))
    if person_ids is not None:
        query = query.where(Person.id.in_(list(person_ids)))
    session.execute(query.execution_options(synchronize_session=False))


def refresh_persons(session: Session, user_id: int, person_ids: Collection[int] | None = None) -> None:
    """Recount the faces of the persons (of ``person_ids``, or all of the user's) and give each
    whose cover face is gone or no longer theirs their best face instead."""
    best = (sa.select(FacePerson.face_id).join(Face, Face.id == FacePerson.face_id)
            .where(FacePerson.person_id == Person.id)
            .order_by(Face.trash, Face.blurry, Face.det_score.desc(), Face.id).limit(1).scalar_subquery())
    cover_is_member = sa.exists().where(FacePerson.face_id == Person.cover_face_id,
                                        FacePerson.person_id == Person.id)
    count = sa.select(sa.func.count()).where(FacePerson.person_id == Person.id).scalar_subquery()
    scope = [Person.user_id == user_id]
    if person_ids is not None:
        ids = list({int(p) for p in person_ids})
        if not ids:
            return
        scope.append(Person.id.in_(ids))
    # Lock the rows first, in id order, so the recount is a statement of its own: under READ
    # COMMITTED it then sees the links of every transaction that held one of these persons (the
    # cluster worker's FOR SHARE, an edit) and committed while this one waited. Counted within
    # the UPDATE, whose snapshot predates the wait (PostgreSQL re-reads only the updated row, not
    # the subqueries), such links are missed and face_count drifts from the real count.
    session.execute(sa.select(Person.id).where(*scope).order_by(Person.id).with_for_update(key_share=True))
    session.execute(sa.update(Person).where(*scope).values(
        face_count=count,
        cover_face_id=sa.case((cover_is_member, Person.cover_face_id), else_=best),
    ).execution_options(synchronize_session=False))
    session.expire_all()


# ------------------------------------------------------------------------------ faces and links


def owned_faces(session: Session, user_id: int, face_ids: Collection[int]) -> list[int]:
    """``face_ids`` in order, once each; NotFound unless every one is the user's."""
    wanted = list(dict.fromkeys(int(f) for f in face_ids))
    if not wanted:
        raise ValueError("no faces given")
    found = set(session.scalars(sa.select(Face.id).where(Face.id.in_(wanted), Face.user_id == user_id)))
    missing = [f for f in wanted if f not in found]
    if missing:
        raise NotFound(f"face {missing[0]}")
    return wanted


def links_of(session: Session, user_id: int, face_ids: Collection[int]) -> dict[int, tuple[int, str]]:
    """face id -> (person id, source) for those of ``face_ids`` that belong to a person."""
    face_ids = list(face_ids)
    if not face_ids:  # an edit of a person's fields alone (a rename) snapshots no links
        return {}
    rows = session.execute(sa.select(FacePerson.face_id, FacePerson.person_id, FacePerson.source)
                           .join(Face, Face.id == FacePerson.face_id)
                           .where(Face.user_id == user_id, FacePerson.face_id.in_(face_ids)))
    return {f: (p, s) for f, p, s in rows}


def user_links(session: Session, user_id: int) -> dict[int, tuple[int, str]]:
    """face id -> (person id, source) for every linked face of the user."""
    rows = session.execute(sa.select(FacePerson.face_id, FacePerson.person_id, FacePerson.source)
                           .join(Person, Person.id == FacePerson.person_id).where(Person.user_id == user_id))
    return {f: (p, s) for f, p, s in rows}


def face_links(session: Session, user_id: int) -> dict[int, int]:
    """face id -> person id for every face of the user that belongs to a person."""
    return dict(session.execute(
        sa.select(FacePerson.face_id, FacePerson.person_id)
        .join(Person, Person.id == FacePerson.person_id).where(Person.user_id == user_id)).all())


def faces_of_persons(session: Session, person_ids: Collection[int]) -> list[int]:
    return list(session.scalars(sa.select(FacePerson.face_id).where(FacePerson.person_id.in_(list(person_ids)))
                                .order_by(FacePerson.face_id)))


def _upsert_dialect(session: Session):
    name = session.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def set_links(session: Session, links: Mapping[int, int], source: str) -> None:
    """face id -> person id, replacing whatever link each face had (callers checked ownership);
    an upsert, so a link the cluster worker adds meanwhile is overwritten rather than a conflict."""
    if not links:
        return
    stmt = _upsert_dialect(session)(FacePerson.__table__)
    stmt = stmt.on_conflict_do_update(index_elements=["face_id"], set_={
        "person_id": stmt.excluded.person_id, "source": stmt.excluded.source, "assigned_at": sa.func.now()})
    session.execute(stmt, [{"face_id": f, "person_id": p, "source": source} for f, p in links.items()])


def restore_links(session: Session, links: Iterable[tuple[int, int | None, str | None]]) -> None:
    """Put each face's link back to (person, source), or none, skipping faces or persons that are gone.
    An upsert, like :func:`set_links`: a link the cluster worker made meanwhile gives way."""
    links = list(links)
    if not links:
        return
    faces = [f for f, _, _ in links]
    session.execute(_face_person.delete().where(_face_person.c.face_id.in_(faces)))
    alive_faces = set(session.scalars(sa.select(Face.id).where(Face.id.in_(faces))))
    alive_persons = set(session.scalars(sa.select(Person.id).where(
        Person.id.in_([p for _, p, _ in links if p is not None]))))
    rows = [{"face_id": f, "person_id": p, "source": s} for f, p, s in links
            if p is not None and f in alive_faces and p in alive_persons]
    if rows:
        stmt = _upsert_dialect(session)(FacePerson.__table__)
        stmt = stmt.on_conflict_do_update(index_elements=["face_id"], set_={
            "person_id": stmt.excluded.person_id, "source": stmt.excluded.source, "assigned_at": sa.func.now()})
        session.execute(stmt, rows)


def unlink(session: Session, face_ids: Collection[int]) -> None:
    session.execute(_face_person.delete().where(_face_person.c.face_id.in_(list(face_ids))))


def move_person_links(session: Session, from_ids: Collection[int], to_id: int) -> None:
    """Every link of ``from_ids`` now points at ``to_id`` as the user's own."""
    session.execute(sa.update(FacePerson).where(FacePerson.person_id.in_(list(from_ids)))
                    .values(person_id=to_id, source="user", assigned_at=sa.func.now())
                    .execution_options(synchronize_session=False))


def apply_link_changes(session: Session, removed: Sequence[int], moved: Mapping[int, int],
                       added: Mapping[int, int]) -> None:
    """A re-clustering's changes to automatic links, in three executemany statements. Each
    touches automatic links only and adds a link only where none is, so a link a user made
    after the re-clustering read the links survives it."""
    auto = _face_person.c.source == "auto"
    if removed:
        session.execute(_face_person.delete().where(_face_person.c.face_id == sa.bindparam("face"), auto),
                        [{"face": f} for f in removed])
    if moved:
        session.execute(_face_person.update().where(_face_person.c.face_id == sa.bindparam("face"), auto)
                        .values(person_id=sa.bindparam("person"), assigned_at=sa.func.now()),
                        [{"face": f, "person": p} for f, p in moved.items()])
    if added:
        session.execute(_upsert_dialect(session)(FacePerson.__table__).on_conflict_do_nothing(),
                        [{"face_id": f, "person_id": p, "source": "auto"} for f, p in added.items()])


def unlinked_faces(session: Session, user_id: int, face_ids: Collection[int]) -> set[int]:
    return set(session.scalars(sa.select(Face.id).where(
        Face.user_id == user_id, Face.id.in_(list(face_ids)), ~sa.exists().where(FacePerson.face_id == Face.id))))


def existing_persons(session: Session, user_id: int, person_ids: Collection[int], *, lock: bool = False
                     ) -> set[int]:
    """Those of ``person_ids`` that are the user's; ``lock`` holds them (FOR SHARE on PostgreSQL)
    until commit, so a concurrent merge cannot delete one under links about to point at it."""
    query = sa.select(Person.id).where(Person.user_id == user_id, Person.id.in_(list(person_ids)))
    return set(session.scalars(query.with_for_update(read=True) if lock else query))


def add_auto_links(session: Session, links: Mapping[int, int]) -> set[int]:
    """Automatic links for faces still in no person; returns the faces linked (a face a user
    linked meanwhile keeps the user's link)."""
    if not links:
        return set()
    stmt = _upsert_dialect(session)(FacePerson.__table__).on_conflict_do_nothing().returning(FacePerson.face_id)
    return set(session.scalars(stmt, [{"face_id": f, "person_id": p, "source": "auto"} for f, p in links.items()]))


# ------------------------------------------------------------------------------ "not this person"


def add_rejections(session: Session, user_id: int, pairs: Iterable[tuple[int, int]]) -> None:
    rows = [{"face_id": f, "person_id": p, "user_id": user_id} for f, p in dict.fromkeys(pairs)]
    if not rows:
        return
    existing = set(session.execute(sa.select(FaceRejection.face_id, FaceRejection.person_id).where(
        FaceRejection.face_id.in_([r["face_id"] for r in rows]))).all())
    rows = [r for r in rows if (r["face_id"], r["person_id"]) not in existing]
    if rows:
        session.execute(sa.insert(FaceRejection), rows)


def rejections(session: Session, user_id: int, *, face_ids: Collection[int] = (),
               person_ids: Collection[int] = ()) -> list[tuple[int, int]]:
    """(face, person) rejections that name one of ``face_ids`` or ``person_ids``."""
    rows = session.execute(sa.select(FaceRejection.face_id, FaceRejection.person_id).where(
        FaceRejection.user_id == user_id,
        sa.or_(FaceRejection.face_id.in_(list(face_ids)), FaceRejection.person_id.in_(list(person_ids)))))
    return [tuple(r) for r in rows]


def delete_rejections(session: Session, user_id: int, *, face_ids: Collection[int] = (),
                      person_ids: Collection[int] = ()) -> None:
    session.execute(sa.delete(FaceRejection).where(
        FaceRejection.user_id == user_id,
        sa.or_(FaceRejection.face_id.in_(list(face_ids)), FaceRejection.person_id.in_(list(person_ids)))))


def delete_rejection_pairs(session: Session, user_id: int, pairs: Iterable[tuple[int, int]]) -> None:
    for face_id, person_id in pairs:
        session.execute(sa.delete(FaceRejection).where(FaceRejection.user_id == user_id,
                                                       FaceRejection.face_id == face_id,
                                                       FaceRejection.person_id == person_id))


def rejected_persons(session: Session, user_id: int, face_ids: Collection[int] | None = None
                     ) -> dict[int, set[int]]:
    """face id -> the persons it must never be put into automatically (all of the user's faces
    when ``face_ids`` is None)."""
    query = sa.select(FaceRejection.face_id, FaceRejection.person_id).where(FaceRejection.user_id == user_id)
    if face_ids is not None:
        query = query.where(FaceRejection.face_id.in_(list(face_ids)))
    out: dict[int, set[int]] = {}
    for face_id, person_id in session.execute(query):
        out.setdefault(face_id, set()).add(person_id)
    return out


# ------------------------------------------------------------------------------ the edit log

EDIT_LOCK = 0x70656473  # the first key of the per-user advisory lock of edits


def lock_edits(session: Session, user_id: int) -> None:
    """Hold the user's edit lock until commit, so one user's edits and undos run one at a time:
    each edit's snapshot is the state the previous one left, and an undo reverts the newest
    committed edit. A transaction advisory lock on PostgreSQL (the cluster workers' writes meet
    edits in row locks, not here); SQLite has a single writer anyway."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.select(sa.func.pg_advisory_xact_lock(EDIT_LOCK, user_id & 0x7FFFFFFF)))


def add_edit(session: Session, user_id: int, kind: str, summary: str, undo: dict) -> PersonEdit:
    edit = PersonEdit(user_id=user_id, kind=kind, summary=summary, undo=undo)
    session.add(edit)
    session.flush()
    return edit


def last_open_edit(session: Session, user_id: int) -> PersonEdit | None:
    """The newest edit not undone yet, locked against a concurrent undo of the same edit."""
    return session.scalar(sa.select(PersonEdit).where(PersonEdit.user_id == user_id,
                                                      PersonEdit.undone_at.is_(None))
                          .order_by(PersonEdit.id.desc()).limit(1).with_for_update())


def edits(session: Session, user_id: int, limit: int) -> list[PersonEdit]:
    return list(session.scalars(sa.select(PersonEdit).where(PersonEdit.user_id == user_id)
                                .order_by(PersonEdit.id.desc()).limit(limit)))


def mark_undone(session: Session, edit: PersonEdit) -> None:
    edit.undone_at = sa.func.now()
    session.flush()


# ------------------------------------------------------------------------------ pages


def people_page(session: Session, user_id: int, *, hidden: bool | None, favorite: bool | None, min_faces: int,
                q: str | None, order: str, after: tuple | None, limit: int) -> list[Person]:
    """One keyset page of the user's persons in ``order`` (faces | name | newest), after the
    sort key ``after`` of the previous page's last row."""
    query = sa.select(Person).where(Person.user_id == user_id, Person.face_count >= min_faces)
    if hidden is not None:
        query = query.where(Person.hidden.is_(hidden))
    if favorite:
        query = query.where(Person.favorite.is_(True))
    if q:
        escaped = q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(sa.func.lower(Person.name).like(f"%{escaped}%", escape="\\"))
    if order == "faces":
        query = query.order_by(Person.face_count.desc(), Person.id)
        if after:
            # The rest of the cursor's tie group, then (once it runs out) the smaller counts: two
            # exact ranges of the (user_id, face_count DESC, id) index, so page 200 reads about as
            # many rows as page 1. (One OR of the two is no index range: it read every row before
            # the cursor.)
            count, pid = after
            rows = list(session.scalars(query.where(Person.face_count == count, Person.id > pid).limit(limit)))
            if len(rows) < limit:
                rows += session.scalars(query.where(Person.face_count < count).limit(limit - len(rows)))
            return rows
    elif order == "name":
        # Named persons by (name, id), then the unnamed ones by id. Each part is one range of the
        # (user_id, name, id) index, read in turn until the page is full, so a deep page costs
        # what the first does (ORDER BY name IS NULL, ... would sort every person per page).
        name, pid = after if after else (None, None)
        named, unnamed = query.where(Person.name.is_not(None)), query.where(Person.name.is_(None))
        if after and name is None:
            parts = [unnamed.where(Person.id > pid).order_by(Person.id)]
        else:
            by_name = named.order_by(Person.name, Person.id)
            parts = ([by_name.where(Person.name == name, Person.id > pid), by_name.where(Person.name > name)]
                     if after else [by_name])
            parts.append(unnamed.order_by(Person.id))
        rows: list[Person] = []
        for part in parts:
            if len(rows) == limit:
                break
            rows += session.scalars(part.limit(limit - len(rows)))
        return rows
    else:  # newest
        if after:
            query = query.where(Person.id < after[0])
        query = query.order_by(Person.id.desc())
    return list(session.scalars(query.limit(limit)))


# What a page of faces shows; not the embedding, landmarks or attributes a Face row also holds.
FACE_PAGE_COLUMNS = (Face.id, Face.photo_id, Face.x1, Face.y1, Face.x2, Face.y2, Face.det_score, Face.blur,
                     Face.blurry, Face.trash)


def person_faces_page(session: Session, user_id: int, person_id: int, after: int, limit: int) -> list[sa.Row]:
    """Rows of :data:`FACE_PAGE_COLUMNS` (attributes named like a Face's), by face id after ``after``."""
    return list(session.execute(
        sa.select(*FACE_PAGE_COLUMNS).join(FacePerson, FacePerson.face_id == Face.id)
        .where(FacePerson.person_id == person_id, Face.user_id == user_id, Face.id > after)
        .order_by(Face.id).limit(limit)))


def person_photos_page(session: Session, user_id: int, person_id: int, after: int, limit: int) -> list[Photo]:
    photo_ids = (sa.select(Face.photo_id).join(FacePerson, FacePerson.face_id == Face.id)
                 .where(FacePerson.person_id == person_id, Face.user_id == user_id))
    return list(session.scalars(sa.select(Photo).where(Photo.user_id == user_id, Photo.id.in_(photo_ids),
                                                       Photo.id > after).order_by(Photo.id).limit(limit)))


def get_face(session: Session, user_id: int, face_id: int) -> tuple[Face, int | None]:
    """The face and the person it belongs to (None if none)."""
    row = session.execute(sa.select(Face, FacePerson.person_id).outerjoin(FacePerson, FacePerson.face_id == Face.id)
                          .where(Face.id == face_id, Face.user_id == user_id)).first()
    if row is None:
        raise NotFound(f"face {face_id}")
    return row[0], row[1]


def get_photo(session: Session, user_id: int, photo_id: int) -> Photo:
    photo = session.scalar(sa.select(Photo).where(Photo.id == photo_id, Photo.user_id == user_id))
    if photo is None:
        raise NotFound(f"photo {photo_id}")
    return photo


def photo_faces(session: Session, user_id: int, photo_id: int) -> list[tuple[Face, int | None]]:
    rows = session.execute(sa.select(Face, FacePerson.person_id).outerjoin(FacePerson, FacePerson.face_id == Face.id)
                           .where(Face.photo_id == photo_id, Face.user_id == user_id).order_by(Face.face_index))
    return [(face, person) for face, person in rows]


def face_source(session: Session, user_id: int, face_id: int) -> tuple[str, str, str | None, tuple]:
    """(photo uri, photo sha256, library root, box) of a face: what its thumbnail is cut from."""
    from services.store.models import User

    row = session.execute(sa.select(Photo.uri, Photo.sha256, User.library_root, Face.x1, Face.y1, Face.x2, Face.y2)
                          .join(Photo, Photo.id == Face.photo_id).join(User, User.id == Face.user_id)
                          .where(Face.id == face_id, Face.user_id == user_id)).first()
    if row is None:
        raise NotFound(f"face {face_id}")
    return row.uri, row.sha256, row.library_root, (row.x1, row.y1, row.x2, row.y2)


def persons_overview(session: Session, user_id: int, *, hidden: bool = True) -> list[dict]:
    """One dict per person of the user (id, name, hidden, confirmed, faces, photos), most faces
    first; ``hidden=False`` leaves hidden persons out."""
    faces = sa.func.count(FacePerson.face_id)
    query = (sa.select(Person.id, Person.name, Person.hidden, Person.user_confirmed.label("confirmed"),
                       faces.label("faces"), sa.func.count(sa.distinct(Face.photo_id)).label("photos"))
             .outerjoin(FacePerson, FacePerson.person_id == Person.id)
             .outerjoin(Face, Face.id == FacePerson.face_id)
             .where(Person.user_id == user_id)
             .group_by(Person.id, Person.name, Person.hidden, Person.user_confirmed)
             .order_by(faces.desc(), Person.id))
    if not hidden:
        query = query.where(Person.hidden.is_(False))
    return [row._asdict() for row in session.execute(query)]
