"""Request and response bodies of the API; the OpenAPI document is generated from them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# Ids are 64-bit in the database; anything outside is refused before it reaches SQL.
MAX_ID = 2**63 - 1
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
# Printable text only: PostgreSQL refuses NUL bytes, and control characters have no place in a name.
Text = Annotated[str, Field(max_length=255, pattern=r"^[^\x00-\x1f\x7f]*$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PersonOut(BaseModel):
    id: int
    name: str | None
    hidden: bool
    favorite: bool
    confirmed: bool
    face_count: int
    cover_face_id: int | None
    created_at: datetime


class PersonPage(BaseModel):
    items: list[PersonOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class PersonPatch(_In):
    name: Text | None = Field(None, description="null or blank clears the name")
    hidden: bool | None = None
    favorite: bool | None = None
    cover_face_id: Id | None = Field(None, description="one of the person's own faces")


class FaceIds(_In):
    face_ids: list[Id] = Field(min_length=1, max_length=1000)


class PersonIds(_In):
    person_ids: list[Id] = Field(min_length=1, max_length=100)


class MergeResult(BaseModel):
    person_id: int
    merged: bool
    faces: int = Field(description="faces that joined the target from this person")


class MergeOut(BaseModel):
    person: PersonOut
    results: list[MergeResult]


class FaceOut(BaseModel):
    id: int
    photo_id: int
    person_id: int | None
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in the photo's pixels")
    det_score: float
    blur: float
    blurry: bool
    trash: bool


class FacePage(BaseModel):
    items: list[FaceOut]
    next_cursor: str | None


class PhotoOut(BaseModel):
    id: int
    uri: str
    status: str
    width: int | None
    height: int | None
    created_at: datetime


class PhotoWithFaces(PhotoOut):
    faces: list[FaceOut]


class PhotoPage(BaseModel):
    items: list[PhotoOut]
    next_cursor: str | None


class Suggestion(BaseModel):
    person: PersonOut
    similarity: float = Field(description="cosine of the two persons' face centroids")


class UncertainFace(BaseModel):
    face: FaceOut
    person_id: int
    margin: float = Field(description="how much closer the face is to its person than to the next one; low = unsure")


class EditOut(BaseModel):
    id: int
    kind: str
    summary: str
    created_at: datetime
    undone: bool


class MeOut(BaseModel):
    user: str
    photos: dict[str, int]
    faces: int
    embedded: int
    blurry: int
    trash: int
    persons: int
    named_persons: int
    hidden_persons: int
    assigned_faces: int


class Problem(BaseModel):
    detail: str | list = Field(description="what went wrong and what to do")
