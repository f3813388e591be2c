"""Every SQL statement of the services, as functions over a caller's Session.

Nothing here commits: the caller owns the transaction and commits at the edge (end of a request,
end of a batch), so one unit of work either happens completely or not at all.

Every function that takes an object id also takes the ``user_id`` it is being asked for and
filters by both; an id of another user is treated exactly like one that does not exist.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TypeVar

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from facecore.types import FaceRecord, PhotoResult
from services.store.models import PHOTO_STATUSES, ApiToken, Face, FacePerson, Person, Photo, User

T = TypeVar("T")

_face_person = FacePerson.__table__


class NotFound(LookupError):
    """No such object for this user (it may exist for another user; callers cannot tell)."""


def _insert_once(session: Session, obj: T, lookup: Callable[[], T | None]) -> T:
    """Insert ``obj``; if a concurrent writer inserted the same unique key first, return theirs."""
    try:
        with session.begin_nested():
            session.add(obj)
    except sa.exc.IntegrityError:
        existing = lookup()
        if existing is None:
            raise
        return existing
    return obj


# ------------------------------------------------------------------------------ users


def find_user(session: Session, name: str) -> User | None:
    return session.scalar(sa.select(User).where(User.name == name))


def get_or_create_user(session: Session, name: str) -> User:
    return find_user(session, name) or _insert_once(session, User(name=name), lambda: find_user(session, name))


def touch_clustering(session: Session, user_id: int) -> None:
    """Record that the user's faces, vectors or person links changed (``User.clustering_revision``).

    Every writer of those calls it except the incremental cluster worker, whose own changes
    are in its copy already.
    """
    session.execute(sa.update(User).where(User.id == user_id)
                    .values(clustering_revision=User.clustering_revision + 1)
                    .execution_options(synchronize_session=False))


def clustering_revisions(session: Session, names: Collection[str]) -> dict[str, int]:
    """user name -> ``clustering_revision`` for those of ``names`` that still exist."""
    return dict(session.execute(sa.select(User.name, User.clustering_revision).where(User.name.in_(list(names)))).all())


def delete_user(session: Session, user_id: int) -> None:
    """Delete the user; the schema cascades to photos, faces, embeddings, persons and tokens."""
    if session.execute(sa.delete(User).where(User.id == user_id)).rowcount == 0:
        raise NotFound(f"user {user_id}")


# ------------------------------------------------------------------------------ photos and faces


def missing_photo_sha256(uri: str) -> str:
    """Key of a photo whose bytes could not be read: the sha256 of ``"missing:" + uri``.

    The row still needs a value for UNIQUE(user_id, sha256); deriving it from the uri makes
    repeated failures of the same file update one row instead of piling up.
    """
    return hashlib.sha256(f"missing:{uri}".encode()).hexdigest()


def find_photo(session: Session, user_id: int, sha256: str) -> Photo | None:
    return session.scalar(sa.select(Photo).where(Photo.user_id == user_id, Photo.sha256 == sha256))


def indexed_photo_ids(session: Session, user_id: int, sha256s: Collection[str]) -> dict[str, int]:
    """sha256 -> photo id for those of ``sha256s`` this user already has indexed, in one query."""
    rows = session.execute(sa.select(Photo.sha256, Photo.id).where(
        Photo.user_id == user_id, Photo.sha256.in_(list(sha256s)), Photo.status == "indexed"))
    return {sha: pid for sha, pid in rows}


def _finite_or_none(value: float | None) -> float | None:
    # SQLite stores NaN as NULL while PostgreSQL keeps it; say "unknown" the same way on both.
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _face_row(photo_id: int, user_id: int, face: FaceRecord) -> dict:
    x1, y1, x2, y2 = np.asarray(face.box, dtype=np.float64).reshape(4).tolist()
    return dict(
        photo_id=photo_id,
        user_id=user_id,
        face_index=int(face.index),
        x1=x1, y1=y1, x2=x2, y2=y2,
        landmarks=np.asarray(face.landmarks, dtype=np.float64).reshape(10).tolist(),
        det_score=float(face.det_score),
        blur=float(face.blur),
        blurry=bool(face.blurry),
        **_embedder_columns(face),
    )


def _embedder_columns(face: FaceRecord) -> dict:
    """The columns the embedder decides: what a change of embedder rewrites."""
    row = dict(trash_score=_finite_or_none(face.trash_score), trash=bool(face.is_trash), embedding=None,
               embedding_dim=None, model_version=face.model_version, attributes=dict(face.attributes))
    if face.embedding is not None:
        # Explicit little-endian so the bytes mean the same on any host that reads them.
        embedding = np.ascontiguousarray(face.embedding, dtype="<f4").reshape(-1)
        row.update(embedding=embedding.tobytes(), embedding_dim=embedding.size)
    return row


def faces_of_other_models(session: Session, user_id: int, photo_ids: Collection[int],
                          model_version: str) -> dict[int, list[tuple[int, np.ndarray]]]:
    """photo id -> [(face id, (5, 2) landmarks)] in face order, for each of ``photo_ids`` that
    has a face made by another model version than ``model_version``."""
    rows = session.execute(
        sa.select(Face.photo_id, Face.id, Face.landmarks, Face.model_version)
        .where(Face.user_id == user_id, Face.photo_id.in_(list(photo_ids)))
        .order_by(Face.photo_id, Face.face_index)).all()
    stale = {r.photo_id for r in rows if r.model_version != model_version}
    out: dict[int, list[tuple[int, np.ndarray]]] = {}
    for r in rows:
        if r.photo_id in stale:
            out.setdefault(r.photo_id, []).append((r.id, np.asarray(r.landmarks, np.float32).reshape(5, 2)))
    return out


def users_with_other_models(session: Session, model_version: str) -> list[str]:
    """Names of the users who have a face made by another model version than ``model_version``."""
    return list(session.scalars(
        sa.select(User.name).where(sa.exists().where(Face.user_id == User.id, Face.model_version != model_version))
        .order_by(User.name)))


def photos_of_other_models(session: Session, user_id: int, model_version: str, *, after_id: int = 0,
                           limit: int | None = None) -> list[tuple[int, str, str]]:
    """(photo id, uri, sha256) of the user's photos with a face made by another model version
    than ``model_version``, by id from ``after_id`` on: pages that a long job walks through."""
    query = (sa.select(Photo.id, Photo.uri, Photo.sha256)
             .where(Photo.user_id == user_id, Photo.id > after_id,
                    sa.exists().where(Face.photo_id == Photo.id, Face.model_version != model_version))
             .order_by(Photo.id).limit(limit))
    return [tuple(r) for r in session.execute(query)]


def update_face_vectors(session: Session, user_id: int, face_ids: Sequence[int], faces: Sequence[FaceRecord]) -> int:
    """Rewrite what the embedder decides (embedding, version, trash verdict, attributes) of
    stored faces, keeping the faces themselves and every link to them; returns how many of
    them were still there to rewrite."""
    rewritten = sum(session.execute(sa.update(Face).where(Face.id == face_id, Face.user_id == user_id)
                                    .values(**_embedder_columns(face))).rowcount
                    for face_id, face in zip(face_ids, faces, strict=True))
    if rewritten:
        touch_clustering(session, user_id)
    return rewritten


@dataclass(frozen=True)
class SavedPhoto:
    """What a stored photo became: its row's id, uri, key and status, and its face ids in face order."""

    id: int
    uri: str
    sha256: str
    status: str
    error: str | None
    face_ids: list[int]


def _insert_ignoring_conflicts(name: str, entity):
    """INSERT ... ON CONFLICT DO NOTHING for the dialects the project runs on (by name).

    Unlike an INSERT in a savepoint that may fail, it costs one statement, and on
    PostgreSQL it waits for a concurrent writer of the same key and then yields to it.
    """
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise NotImplementedError(f"no conflict-ignoring insert for {name}")
    return insert(entity).on_conflict_do_nothing()


# The statements of storing a new photo are built once: building them per photo cost more
# CPU than running them (docs/BENCHMARKS.md).
@lru_cache(maxsize=None)
def _new_photo_statement(dialect: str, ok: bool):
    """INSERT of a photo row that yields to an existing one."""
    stmt = _insert_ignoring_conflicts(dialect, Photo.__table__)
    return (stmt.values(indexed_at=sa.func.now()) if ok else stmt).returning(Photo.id)


_DROP_FAILED_URI = sa.delete(Photo.__table__).where(
    Photo.user_id == sa.bindparam("user_id"), Photo.sha256 == sa.bindparam("sha256"), Photo.status == "failed",
    Photo.id != sa.bindparam("photo_id"))
_INSERT_FACES = sa.insert(Face.__table__).returning(Face.id, sort_by_parameter_order=True)


def save_photo_result(session: Session, user_id: int, uri: str, result: PhotoResult) -> SavedPhoto:
    """Store what the pipeline made of one photo; safe to call again for the same bytes.

    A photo already indexed for this user (same sha256) is left alone and returned, whatever its
    uri, so a copy or a re-run costs nothing. A pending or failed row is overwritten: its old
    faces (and their person links) are replaced. A failed result without a sha256 (unreadable
    file) is keyed by :func:`missing_photo_sha256` of the uri; that row goes away once the file
    at the uri is indexed.

    A new photo, the common case, costs three statements: the row, the clean-up of an earlier
    failure of its uri, and its faces (ids returned, in face order).
    """
    sha256 = result.sha256 or missing_photo_sha256(uri)
    status, error = ("indexed", None) if result.ok else ("failed", result.error)
    values = dict(uri=uri, status=status, error=error, width=result.width or None, height=result.height or None)
    conn = session.connection()  # Core statements: the ORM layer costs more than the SQL here
    photo_id = conn.scalar(_new_photo_statement(session.get_bind().dialect.name, result.ok),
                           dict(user_id=user_id, sha256=sha256, **values))
    if photo_id is None:  # the key is taken: by this photo indexed before, or by an earlier failure
        photo = find_photo(session, user_id, sha256)
        if photo.status == "indexed":
            return SavedPhoto(photo.id, photo.uri, sha256, "indexed", None,
                              photo_face_ids(session, user_id, photo.id))
        if session.execute(sa.delete(Face).where(Face.photo_id == photo.id)).rowcount:
            touch_clustering(session, user_id)
        session.execute(sa.update(Photo).where(Photo.id == photo.id)
                        .values(**values, indexed_at=sa.func.now() if result.ok else None))
        photo_id = photo.id
    face_ids: list[int] = []
    if result.ok:
        conn.execute(_DROP_FAILED_URI, dict(user_id=user_id, sha256=missing_photo_sha256(uri), photo_id=photo_id))
        if result.faces:
            rows = [_face_row(photo_id, user_id, face) for face in result.faces]
            face_ids = list(conn.scalars(_INSERT_FACES, rows))
    return SavedPhoto(photo_id, uri, sha256, status, error, face_ids)


def photo_keys(session: Session, user_id: int) -> list[tuple[int, str, str]]:
    """(id, uri, sha256) of every photo row of the user, failed ones included."""
    return [tuple(r) for r in session.execute(
        sa.select(Photo.id, Photo.uri, Photo.sha256).where(Photo.user_id == user_id).order_by(Photo.id))]


def move_photo(session: Session, user_id: int, photo_id: int, uri: str) -> None:
    """The photo's file is now at ``uri`` (renamed or moved); faces and links stay."""
    if session.execute(sa.update(Photo).where(Photo.id == photo_id, Photo.user_id == user_id)
                       .values(uri=uri)).rowcount == 0:
        raise NotFound(f"photo {photo_id}")


def delete_photo(session: Session, user_id: int, photo_id: int) -> None:
    """Delete a photo with its faces, embeddings and person links (schema cascade); the rules
    around it (revision, persons left empty) are ``services.persons.service.delete_photo``'s."""
    deleted = session.execute(sa.delete(Photo).where(Photo.id == photo_id, Photo.user_id == user_id))
    if deleted.rowcount == 0:
        raise NotFound(f"photo {photo_id}")


def user_embeddings(
    session: Session, user_id: int, model_version: str | None = None, include_blurry: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(face ids int64 (n,), embeddings float32 (n, d)) of the user's faces worth clustering.

    Trash faces are never included, blurry ones only on request. Embeddings of different models
    live in different spaces, so without ``model_version`` the user's faces must all come from
    one model (ValueError otherwise).
    """
    query = (
        sa.select(Face.id, Face.model_version, Face.embedding)
        .where(Face.user_id == user_id, Face.embedding.is_not(None), Face.trash.is_(False))
        .order_by(Face.id)
    )
    if not include_blurry:
        query = query.where(Face.blurry.is_(False))
    if model_version is not None:
        query = query.where(Face.model_version == model_version)
    rows = session.execute(query).all()

    versions = {row.model_version for row in rows}
    if len(versions) > 1:
        raise ValueError(f"faces of user {user_id} come from several models {sorted(versions)}; "
                         "pass model_version")
    sizes = {len(row.embedding) for row in rows}
    if len(sizes) > 1:
        raise ValueError(f"embeddings of user {user_id} have different sizes: {sorted(sizes)}")
    ids = np.array([row.id for row in rows], dtype=np.int64)
    if not rows:
        return ids, np.zeros((0, 0), dtype=np.float32)
    matrix = np.frombuffer(b"".join(row.embedding for row in rows), dtype="<f4")
    return ids, matrix.reshape(len(rows), -1).astype(np.float32)


def main_model_version(session: Session, user_id: int) -> str | None:
    """The model version most of the user's embedded faces have (the one worth comparing)."""
    return session.scalar(sa.select(Face.model_version).where(Face.user_id == user_id, Face.embedding.is_not(None))
                          .group_by(Face.model_version).order_by(sa.func.count().desc()).limit(1))


def set_library_root(session: Session, user_id: int, root: str) -> None:
    session.execute(sa.update(User).where(User.id == user_id).values(library_root=root))


def export_rows(session: Session, user_id: int, trash: bool = False) -> Iterator[dict]:
    """One dict per face for CSV export, ordered by photo and face; trash faces (non-faces)
    only when ``trash`` is set, and then only they.

    ``person`` is the person id (stable across re-clustering), None if unassigned. Streams, so
    iterate while the session is open.
    """
    query = (
        sa.select(Photo.uri, Face.id, Face.face_index, Face.x1, Face.y1, Face.x2, Face.y2, Face.det_score,
                  Face.blur, Face.blurry, FacePerson.person_id, Person.name.label("person_name"),
                  Person.hidden.label("person_hidden"), Face.attributes)
        .join(Photo, Photo.id == Face.photo_id)
        .outerjoin(FacePerson, FacePerson.face_id == Face.id)
        .outerjoin(Person, Person.id == FacePerson.person_id)
        .where(Face.user_id == user_id, Face.trash.is_(trash))
        .order_by(Photo.uri, Face.face_index)
        .execution_options(yield_per=1000)
    )
    for row in session.execute(query):
        yield {
            "photo": row.uri, "face": row.face_index,
            "x1": row.x1, "y1": row.y1, "x2": row.x2, "y2": row.y2,
            "score": row.det_score, "blur": row.blur,
            "person": row.person_id, "gender": row.attributes.get("gender"),
            "face_id": row.id, "blurry": row.blurry, "person_name": row.person_name,
            "person_hidden": bool(row.person_hidden),
        }


def failed_photos(session: Session, user_id: int) -> list[tuple[str, str | None]]:
    """(uri, reason) of every photo of the user that could not be indexed."""
    return [tuple(r) for r in session.execute(
        sa.select(Photo.uri, Photo.error).where(Photo.user_id == user_id, Photo.status == "failed")
        .order_by(Photo.uri))]


def user_summary(session: Session, user_id: int) -> dict:
    """Counts for a status page: photos by status, faces by quality, persons."""
    photos = dict.fromkeys(PHOTO_STATUSES, 0)
    photos.update(session.execute(
        sa.select(Photo.status, sa.func.count()).where(Photo.user_id == user_id).group_by(Photo.status)
    ).all())
    faces = session.execute(
        sa.select(
            sa.func.count().label("faces"),
            sa.func.count(Face.embedding).label("embedded"),
            sa.func.count().filter(Face.blurry.is_(True)).label("blurry"),
            sa.func.count().filter(Face.trash.is_(True)).label("trash"),
        ).where(Face.user_id == user_id)
    ).one()
    persons = session.execute(
        sa.select(
            sa.func.count().label("persons"),
            sa.func.count(Person.name).label("named_persons"),
            sa.func.count().filter(Person.hidden.is_(True)).label("hidden_persons"),
        ).where(Person.user_id == user_id)
    ).one()
    assigned = session.scalar(
        sa.select(sa.func.count()).select_from(FacePerson)
        .join(Person, Person.id == FacePerson.person_id).where(Person.user_id == user_id)
    )
    return {"photos": photos, **faces._asdict(), **persons._asdict(), "assigned_faces": assigned}


# ------------------------------------------------------------------------------ cloud workers


def face_photo_ids(session: Session, user_id: int, face_ids: Collection[int]) -> dict[int, int]:
    """face id -> photo id for those of ``face_ids`` that are the user's (clustering keeps
    two faces of one photo apart)."""
    ids = [int(i) for i in face_ids]
    rows = session.execute(sa.select(Face.id, Face.photo_id).where(Face.user_id == user_id, Face.id.in_(ids)))
    return {int(f): int(p) for f, p in rows}


def photo_face_ids(session: Session, user_id: int, photo_id: int) -> list[int]:
    """Ids of the photo's faces in face order (what the ingest worker announces on the bus)."""
    return list(session.scalars(
        sa.select(Face.id).where(Face.photo_id == photo_id, Face.user_id == user_id).order_by(Face.face_index)))


def face_embeddings(session: Session, user_id: int, face_ids: Collection[int]
                    ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(ids, model versions, float32 embeddings) of those of ``face_ids`` worth clustering.

    The same faces :func:`user_embeddings` would give (embedded, not trash, not blurry), but only
    the named ones, so an incremental clusterer reads just what is new.
    """
    rows = session.execute(
        sa.select(Face.id, Face.model_version, Face.embedding)
        .where(Face.user_id == user_id, Face.id.in_(list(face_ids)), Face.embedding.is_not(None),
               Face.trash.is_(False), Face.blurry.is_(False))
        .order_by(Face.id)
    ).all()
    ids = np.array([row.id for row in rows], dtype=np.int64)
    vectors = [np.frombuffer(row.embedding, dtype="<f4").astype(np.float32) for row in rows]
    if len({len(v) for v in vectors}) > 1:
        raise ValueError(f"embeddings of user {user_id} have different sizes")
    matrix = np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
    return ids, [row.model_version for row in rows], matrix


# ------------------------------------------------------------------------------ API tokens


def add_token(session: Session, user_id: int, token_sha256: str, label: str | None) -> ApiToken:
    token = ApiToken(user_id=user_id, token_sha256=token_sha256, label=label)
    session.add(token)
    session.flush()
    return token


def token_owner(session: Session, token_sha256: str) -> tuple[int, str, str] | None:
    """(user id, user name, stored sha256) of the token with this sha256, if any."""
    row = session.execute(sa.select(User.id, User.name, ApiToken.token_sha256).join(ApiToken, ApiToken.user_id == User.id)
                          .where(ApiToken.token_sha256 == token_sha256)).first()
    return tuple(row) if row else None


def tokens(session: Session, user_id: int | None = None) -> list[tuple[int, str, str | None, object]]:
    """(token id, user name, label, created at) of every token (of one user)."""
    query = (sa.select(ApiToken.id, User.name, ApiToken.label, ApiToken.created_at)
             .join(User, User.id == ApiToken.user_id).order_by(ApiToken.id))
    if user_id is not None:
        query = query.where(ApiToken.user_id == user_id)
    return [tuple(r) for r in session.execute(query)]


def delete_token(session: Session, token_id: int) -> None:
    if session.execute(sa.delete(ApiToken).where(ApiToken.id == token_id)).rowcount == 0:
        raise NotFound(f"token {token_id}")
