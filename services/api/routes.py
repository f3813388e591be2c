"""The /api/v1 endpoints: thin edges that check input, call the rules layer and commit.

Every id is looked up together with the caller's user id, so another user's id is a 404 exactly
like a missing one (the rules layer raises NotFound for both).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Annotated, Literal, TypeVar

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from sqlalchemy.orm import Session

from .. import thumbnails
from ..persons import repository as persons_repo
from ..persons import service as person_service
from ..store import repository as store
from ..store.models import Face, Person, Photo
from . import schemas as s
from .deps import Caller, decode_cursor, encode_cursor, get_caller, get_session

log = logging.getLogger("facecluster.api")

ERRORS = {400: {"model": s.Problem, "description": "the body is not JSON (or a cursor is not one this API gave out)"},
          401: {"model": s.Problem, "description": "no valid bearer token"},
          404: {"model": s.Problem, "description": "no such object for the caller (or another user's)"},
          422: {"model": s.Problem, "description": "the request is malformed"}}
router = APIRouter(prefix="/api/v1", responses=ERRORS)

PersonId = Annotated[int, Path(ge=1, le=s.MAX_ID)]
FaceId = Annotated[int, Path(ge=1, le=s.MAX_ID)]
PhotoId = Annotated[int, Path(ge=1, le=s.MAX_ID)]
Limit = Annotated[int, Query(ge=1, le=500)]
Cursor = Annotated[str | None, Query(max_length=512, description="next_cursor of the previous page")]
CallerDep = Annotated[Caller, Depends(get_caller)]
SessionDep = Annotated[Session, Depends(get_session)]
CONFLICT = {409: {"model": s.Problem, "description": "the request conflicts with the current state"}}
BAD_CURSOR = {400: {"model": s.Problem, "description": "the cursor is not a next_cursor this API gave out"}}
JPEG = {200: {"content": {"image/jpeg": {}}, "description": "JPEG"},
        304: {"description": "not modified (If-None-Match matched the ETag)"}}


T = TypeVar("T")
# PostgreSQL aborts one of two transactions that wait for each other (deadlock_detected: an edit
# and the cluster worker, or two edits, locking persons and links in different orders) or that
# lost a race (serialization_failure); run again from the start, the same request succeeds.
RETRY_SQLSTATES = {"40P01", "40001"}
WRITE_ATTEMPTS = 5


def _write(session: Session, change: Callable[[], T]) -> T:
    """``change()`` (calls of the rules layer) committed; run again from the start, up to
    WRITE_ATTEMPTS times, when the database aborted it for a deadlock or a serialization
    failure, so a client never gets a 500 for a race it cannot see."""
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            result = change()
            session.commit()
            return result
        except sa.exc.DBAPIError as e:
            if getattr(e.orig, "pgcode", None) not in RETRY_SQLSTATES or attempt == WRITE_ATTEMPTS:
                raise
            session.rollback()
            log.info("write aborted by the database (%s); trying again (%d)", e.orig.pgcode, attempt)
            time.sleep(random.uniform(0, 0.02 * attempt))
    raise AssertionError("unreachable")


def person_out(p: Person) -> s.PersonOut:
    return s.PersonOut(id=p.id, name=p.name, hidden=p.hidden, favorite=p.favorite, confirmed=p.user_confirmed,
                       face_count=p.face_count, cover_face_id=p.cover_face_id, created_at=p.created_at)


def face_out(f: Face, person_id: int | None) -> s.FaceOut:
    return s.FaceOut(id=f.id, photo_id=f.photo_id, person_id=person_id, box=[f.x1, f.y1, f.x2, f.y2],
                     det_score=f.det_score, blur=f.blur, blurry=f.blurry, trash=f.trash)


def photo_out(p: Photo) -> s.PhotoOut:
    return s.PhotoOut(id=p.id, uri=p.uri, status=p.status, width=p.width, height=p.height, created_at=p.created_at)


# ------------------------------------------------------------------------------ people

ORDER_KEYS = {"faces": (int, int), "name": ((str, type(None)), int), "newest": (int,)}


@router.get("/people", response_model=s.PersonPage, responses=BAD_CURSOR, tags=["people"])
def list_people(caller: CallerDep, session: SessionDep, limit: Limit = 50, cursor: Cursor = None,
                hidden: Literal["false", "true", "all"] = "false", favorite: bool = False,
                min_faces: Annotated[int, Query(ge=0, le=2**31 - 1)] = 1,
                q: Annotated[str | None, Query(max_length=255, pattern=r"^[^\x00-\x1f\x7f]*$")] = None,
                order: Literal["faces", "name", "newest"] = "faces"):
    """The caller's people, a page at a time (keyset pagination: deep pages cost what the first does)."""
    after = decode_cursor(cursor, ORDER_KEYS[order])
    rows = persons_repo.people_page(session, caller.user_id, hidden={"false": False, "true": True, "all": None}[hidden],
                                    favorite=favorite, min_faces=min_faces, q=q, order=order, after=after,
                                    limit=limit + 1)
    more, rows = len(rows) > limit, rows[:limit]
    nxt = None
    if more:
        last = rows[-1]
        nxt = encode_cursor({"faces": [last.face_count, last.id], "name": [last.name, last.id],
                             "newest": [last.id]}[order])
    return s.PersonPage(items=[person_out(p) for p in rows], next_cursor=nxt)


@router.post("/people", response_model=s.PersonOut, status_code=201, tags=["people"])
def split_into_new_person(body: s.FaceIds, caller: CallerDep, session: SessionDep):
    """A new person of these faces, taken out of wherever they were (a split)."""
    person = _write(session, lambda: person_service.split_faces(session, caller.user_id, body.face_ids))
    return person_out(person)


@router.get("/people/{person_id}", response_model=s.PersonOut, tags=["people"])
def get_person(person_id: PersonId, caller: CallerDep, session: SessionDep):
    return person_out(persons_repo.get_person(session, caller.user_id, person_id))


@router.patch("/people/{person_id}", response_model=s.PersonOut, responses=CONFLICT, tags=["people"])
def update_person(person_id: PersonId, body: s.PersonPatch, caller: CallerDep, session: SessionDep):
    """Rename (null or "" clears), hide or show, favourite, or set the cover face; one undoable edit."""
    given = body.model_fields_set
    changes = {k: getattr(body, k) for k in ("hidden", "favorite", "cover_face_id")
               if k in given and getattr(body, k) is not None}
    if "name" in given:
        changes["name"] = body.name
    person = _write(session, lambda: person_service.update_person(session, caller.user_id, person_id, **changes))
    return person_out(person)


@router.post("/people/{person_id}/merge", response_model=s.MergeOut, responses=CONFLICT, tags=["people"])
def merge_people(person_id: PersonId, body: s.PersonIds, caller: CallerDep, session: SessionDep):
    """The faces of ``person_ids`` join this person and those persons are deleted; undoable."""
    person, results = _write(session, lambda: person_service.merge(session, caller.user_id, person_id,
                                                                   body.person_ids))
    return s.MergeOut(person=person_out(person), results=[s.MergeResult(**r) for r in results])


@router.post("/people/{person_id}/faces", response_model=s.PersonOut, tags=["people"])
def move_faces(person_id: PersonId, body: s.FaceIds, caller: CallerDep, session: SessionDep):
    """Move faces into this person (kept by every later re-clustering)."""
    person = _write(session, lambda: person_service.move_faces(session, caller.user_id, body.face_ids, person_id))
    return person_out(person)


@router.delete("/people/{person_id}/faces/{face_id}", response_model=s.PersonOut, tags=["people"])
def not_this_person(person_id: PersonId, face_id: FaceId, caller: CallerDep, session: SessionDep):
    """"Not this person": the face leaves the person, and no later assignment or re-clustering
    puts it back into it."""
    person = _write(session, lambda: person_service.reject_face(session, caller.user_id, person_id, face_id))
    return person_out(person)


@router.get("/people/{person_id}/faces", response_model=s.FacePage, responses=BAD_CURSOR, tags=["people"])
def person_faces(person_id: PersonId, caller: CallerDep, session: SessionDep, limit: Limit = 100,
                 cursor: Cursor = None):
    persons_repo.get_person(session, caller.user_id, person_id)
    after = decode_cursor(cursor, (int,))
    rows = persons_repo.person_faces_page(session, caller.user_id, person_id, after[0] if after else 0, limit + 1)
    nxt = encode_cursor([rows[limit - 1].id]) if len(rows) > limit else None
    return s.FacePage(items=[face_out(f, person_id) for f in rows[:limit]], next_cursor=nxt)


@router.get("/people/{person_id}/photos", response_model=s.PhotoPage, responses=BAD_CURSOR, tags=["people"])
def person_photos(person_id: PersonId, caller: CallerDep, session: SessionDep, limit: Limit = 100,
                  cursor: Cursor = None):
    persons_repo.get_person(session, caller.user_id, person_id)
    after = decode_cursor(cursor, (int,))
    rows = persons_repo.person_photos_page(session, caller.user_id, person_id, after[0] if after else 0, limit + 1)
    nxt = encode_cursor([rows[limit - 1].id]) if len(rows) > limit else None
    return s.PhotoPage(items=[photo_out(p) for p in rows[:limit]], next_cursor=nxt)


@router.get("/people/{person_id}/suggestions", response_model=list[s.Suggestion], tags=["people"])
def merge_suggestions(person_id: PersonId, caller: CallerDep, session: SessionDep,
                      limit: Annotated[int, Query(ge=1, le=100)] = 10):
    """Other people ordered by how alike their faces are to this person's: merge candidates."""
    return [s.Suggestion(person=person_out(p), similarity=sim)
            for p, sim in person_service.suggestions(session, caller.user_id, person_id, limit)]


@router.get("/people/{person_id}/cover", response_class=Response, responses=JPEG, tags=["images"])
def person_cover(person_id: PersonId, request: Request, caller: CallerDep, session: SessionDep,
                 size: Annotated[int, Query(ge=32, le=512)] = 160,
                 if_none_match: Annotated[str | None, Header(max_length=200)] = None):
    """The cover face's thumbnail (404 for a person without faces)."""
    person = persons_repo.get_person(session, caller.user_id, person_id)
    if person.cover_face_id is None:
        raise store.NotFound(f"cover of person {person_id} (the person has no faces)")
    return _thumbnail(request, session, caller, person.cover_face_id, size, if_none_match)


# ------------------------------------------------------------------------------ faces and photos


@router.get("/faces/uncertain", response_model=list[s.UncertainFace], tags=["faces"])
def uncertain_faces(caller: CallerDep, session: SessionDep, limit: Annotated[int, Query(ge=1, le=100)] = 10):
    """The faces the clustering is least sure belong to their person: what to ask the user about."""
    out = []
    for face_id, person_id, margin in person_service.uncertain_faces(session, caller.user_id, limit):
        face, owner = persons_repo.get_face(session, caller.user_id, face_id)
        out.append(s.UncertainFace(face=face_out(face, owner), person_id=person_id, margin=margin))
    return out


@router.get("/faces/{face_id}", response_model=s.FaceOut, tags=["faces"])
def get_face(face_id: FaceId, caller: CallerDep, session: SessionDep):
    return face_out(*persons_repo.get_face(session, caller.user_id, face_id))


@router.get("/faces/{face_id}/thumbnail", response_class=Response, responses=JPEG, tags=["images"])
def face_thumbnail(face_id: FaceId, request: Request, caller: CallerDep, session: SessionDep,
                   size: Annotated[int, Query(ge=32, le=512)] = 160,
                   if_none_match: Annotated[str | None, Header(max_length=200)] = None):
    """The face cut from its photo with a margin, at most ``size`` px; cached, with an ETag."""
    return _thumbnail(request, session, caller, face_id, size, if_none_match)


def _thumbnail(request: Request, session: Session, caller: Caller, face_id: int, size: int,
               if_none_match: str | None) -> Response:
    uri, sha256, root, box = persons_repo.face_source(session, caller.user_id, face_id)
    tag = thumbnails.etag(sha256, box, size)
    headers = {"ETag": f'"{tag}"', "Cache-Control": "private, max-age=86400"}
    if if_none_match and tag in {t.strip().removeprefix("W/").strip('"') for t in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    cache: thumbnails.ThumbnailCache = request.app.state.thumbnails
    data = cache.get(caller.user_id, face_id, size, tag)
    if data is None:
        path = thumbnails.photo_path(request.app.state.object_store, root, uri, sha256)
        data = thumbnails.crop_jpeg(path, box, size)
        cache.put(caller.user_id, face_id, size, tag, data)
    return Response(content=data, media_type="image/jpeg", headers=headers)


@router.get("/photos/{photo_id}", response_model=s.PhotoWithFaces, tags=["photos"])
def get_photo(photo_id: PhotoId, caller: CallerDep, session: SessionDep):
    """The photo with its faces: boxes and the person each is in."""
    photo = persons_repo.get_photo(session, caller.user_id, photo_id)
    faces = [face_out(f, p) for f, p in persons_repo.photo_faces(session, caller.user_id, photo_id)]
    return s.PhotoWithFaces(**photo_out(photo).model_dump(), faces=faces)


@router.delete("/photos/{photo_id}", status_code=204, response_class=Response, tags=["photos"])
def delete_photo(photo_id: PhotoId, request: Request, caller: CallerDep, session: SessionDep):
    """Delete the photo with its faces, embeddings, links and cached thumbnails."""
    faces = _write(session, lambda: person_service.delete_photo(session, caller.user_id, photo_id))
    request.app.state.thumbnails.forget_faces(caller.user_id, faces)
    log.info("user %d deleted photo %d (%d faces)", caller.user_id, photo_id, len(faces))
    return Response(status_code=204)


# ------------------------------------------------------------------------------ edits and the account


def edit_out(e) -> s.EditOut:
    return s.EditOut(id=e.id, kind=e.kind, summary=e.summary, created_at=e.created_at, undone=e.undone_at is not None)


@router.get("/edits", response_model=list[s.EditOut], tags=["edits"])
def list_edits(caller: CallerDep, session: SessionDep, limit: Annotated[int, Query(ge=1, le=200)] = 20):
    """The caller's recent edits, newest first."""
    return [edit_out(e) for e in person_service.edits(session, caller.user_id, limit)]


@router.post("/edits/undo", response_model=s.EditOut, responses=CONFLICT, tags=["edits"])
def undo(caller: CallerDep, session: SessionDep):
    """Undo the newest edit not undone yet (409 when there is none)."""
    edit = _write(session, lambda: person_service.undo(session, caller.user_id))
    log.info("user %d undid edit %d (%s)", caller.user_id, edit.id, edit.kind)
    return edit_out(edit)


@router.get("/me", response_model=s.MeOut, tags=["account"])
def me(caller: CallerDep, session: SessionDep):
    """The caller's name and statistics."""
    return s.MeOut(user=caller.name, **store.user_summary(session, caller.user_id))


@router.delete("/me", status_code=204, response_class=Response, tags=["account"])
def delete_me(request: Request, caller: CallerDep, session: SessionDep):
    """Delete the caller with every photo, face, embedding, person, token and cached image."""
    _write(session, lambda: person_service.delete_user(session, caller.user_id))
    request.app.state.thumbnails.forget_user(caller.user_id)
    log.info("user %d deleted themselves", caller.user_id)
    return Response(status_code=204)
