"""Relational schema shared by the embedded SQLite database and the cloud PostgreSQL.

The schema only changes through dated Alembic migrations in ``migrations/``; a test checks that
the migrated database and these models never drift apart.

Every table that holds faces, embeddings or anything derived from them reaches ``users`` through
``ON DELETE CASCADE`` foreign keys, so deleting a user or a photo removes its biometric data in
the database itself, whatever code path issued the delete.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Constraint names are spelled out so that later migrations can drop or alter them by name on
# both backends (SQLite batch mode needs names to find constraints again).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# 64-bit ids on PostgreSQL (a cloud library outgrows 2^31 faces); SQLite only auto-increments
# a column declared exactly INTEGER, which is 64-bit there anyway.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# JSONB on PostgreSQL so attributes can be queried and indexed later.
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)

PHOTO_STATUSES = ("pending", "indexed", "failed")
LINK_SOURCES = ("auto", "user")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


def _user_fk(nullable: bool = False) -> Mapped[int]:
    return mapped_column(Id, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=nullable, index=True)


def _created_at() -> Mapped[datetime]:
    return mapped_column(Timestamp, nullable=False, server_default=sa.func.now())


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(255), nullable=False, unique=True)
    created_at: Mapped[datetime] = _created_at()
    # Goes up whenever the user's faces, vectors or person links change by any hand other than
    # the incremental cluster worker's, which keeps a copy of them and reads it again on a change.
    clustering_revision: Mapped[int] = mapped_column(sa.BigInteger, nullable=False, server_default="0")
    # Folder an embedded library was indexed from (photo uris are relative to it); None in the
    # cloud, where photos are read from the object store by sha256.
    library_root: Mapped[str | None] = mapped_column(sa.Text)


class ApiToken(Base):
    """Only the token's sha256 is kept, so a leaked database does not leak usable tokens."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    user_id: Mapped[int] = _user_fk()
    token_sha256: Mapped[str] = mapped_column(sa.CHAR(64), nullable=False, unique=True)
    label: Mapped[str | None] = mapped_column(sa.String(255))
    created_at: Mapped[datetime] = _created_at()


class Photo(Base):
    """One image of a user, keyed by its bytes so a copy or a rename is not indexed twice."""

    __tablename__ = "photos"
    __table_args__ = (
        sa.UniqueConstraint("user_id", "sha256"),
        sa.Index(None, "user_id", "status"),
        sa.CheckConstraint(_in("status", PHOTO_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    # Covered by the (user_id, sha256) unique index, so no index of its own.
    user_id: Mapped[int] = mapped_column(Id, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    # Path relative to the indexed folder with '/' separators, or an object-store key.
    uri: Mapped[str] = mapped_column(sa.Text, nullable=False)
    sha256: Mapped[str] = mapped_column(sa.CHAR(64), nullable=False)
    status: Mapped[str] = mapped_column(sa.String(16), nullable=False)
    error: Mapped[str | None] = mapped_column(sa.Text)
    width: Mapped[int | None] = mapped_column(sa.Integer)
    height: Mapped[int | None] = mapped_column(sa.Integer)
    created_at: Mapped[datetime] = _created_at()
    indexed_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Face(Base):
    """A detected face with its quality flags and embedding (float32 little-endian bytes)."""

    __tablename__ = "faces"
    __table_args__ = (
        sa.UniqueConstraint("photo_id", "face_index"),
        sa.Index(None, "user_id", "model_version"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    photo_id: Mapped[int] = mapped_column(Id, sa.ForeignKey("photos.id", ondelete="CASCADE"), nullable=False)
    # Denormalised from photos so per-user scans over faces need no join.
    user_id: Mapped[int] = mapped_column(Id, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    face_index: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    x1: Mapped[float] = mapped_column(sa.Float, nullable=False)
    y1: Mapped[float] = mapped_column(sa.Float, nullable=False)
    x2: Mapped[float] = mapped_column(sa.Float, nullable=False)
    y2: Mapped[float] = mapped_column(sa.Float, nullable=False)
    landmarks: Mapped[list[float]] = mapped_column(Json, nullable=False)  # 5 (x, y) points, flattened
    det_score: Mapped[float] = mapped_column(sa.Float, nullable=False)
    blur: Mapped[float] = mapped_column(sa.Float, nullable=False)
    blurry: Mapped[bool] = mapped_column(sa.Boolean, nullable=False)
    trash_score: Mapped[float | None] = mapped_column(sa.Float)
    # The pipeline's verdict at the threshold it ran with; kept because the threshold is config.
    trash: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, server_default=sa.false())
    quality: Mapped[float | None] = mapped_column(sa.Float)
    embedding: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    embedding_dim: Mapped[int | None] = mapped_column(sa.Integer)
    model_version: Mapped[str] = mapped_column(sa.String(64), nullable=False)
    attributes: Mapped[dict] = mapped_column(Json, nullable=False)
    created_at: Mapped[datetime] = _created_at()


class Person(Base):
    """A group of faces. Its id and name survive re-clustering (see repository)."""

    __tablename__ = "persons"
    __table_args__ = (
        # Keyset pages of the people list in each of its orders (most faces first: the index
        # ix_persons_user_id_face_count_desc_id below the class, which names the column).
        sa.Index(None, "user_id", "name", "id"),
        # Never hand a deleted person's id to a new one (undo restores persons under their ids).
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    user_id: Mapped[int] = _user_fk()
    name: Mapped[str | None] = mapped_column(sa.String(255))
    hidden: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, server_default=sa.false())
    cover_face_id: Mapped[int | None] = mapped_column(
        Id, sa.ForeignKey("faces.id", ondelete="SET NULL"), index=True)
    user_confirmed: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, server_default=sa.false())
    favorite: Mapped[bool] = mapped_column(sa.Boolean, nullable=False, server_default=sa.false())
    # Links to this person, kept by every writer of links (the people page sorts and filters on it).
    face_count: Mapped[int] = mapped_column(sa.Integer, nullable=False, server_default="0")
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(
        Timestamp, nullable=False, server_default=sa.func.now(), onupdate=sa.func.now())


# Most faces first, ties by id: the people list's default order, so a keyset page is an index range.
sa.Index("ix_persons_user_id_face_count_desc_id", Person.user_id, Person.face_count.desc(), Person.id)


class FacePerson(Base):
    """Which person a face belongs to; the face id as primary key allows one person per face.

    ``source`` is 'user' for links a person made by hand; re-clustering never touches those.
    """

    __tablename__ = "face_person"
    __table_args__ = (
        sa.CheckConstraint(_in("source", LINK_SOURCES), name="source"),
        sa.Index(None, "person_id", "face_id"),  # a person's faces, paged by id
    )

    face_id: Mapped[int] = mapped_column(Id, sa.ForeignKey("faces.id", ondelete="CASCADE"), primary_key=True)
    person_id: Mapped[int] = mapped_column(
        Id, sa.ForeignKey("persons.id", ondelete="CASCADE"), nullable=False)
    source: Mapped[str] = mapped_column(sa.String(8), nullable=False)
    assigned_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False, server_default=sa.func.now())


class FaceRejection(Base):
    """"Not this person": the face must never be put into the person again by the clustering.

    Only a user's hand (a move, a merge, an undo) can put it back.
    """

    __tablename__ = "face_rejections"

    face_id: Mapped[int] = mapped_column(Id, sa.ForeignKey("faces.id", ondelete="CASCADE"), primary_key=True)
    person_id: Mapped[int] = mapped_column(
        Id, sa.ForeignKey("persons.id", ondelete="CASCADE"), primary_key=True, index=True)
    user_id: Mapped[int] = _user_fk()
    created_at: Mapped[datetime] = _created_at()


class PersonEdit(Base):
    """One edit a user made to their albums, with what undoing it needs (``undo``)."""

    __tablename__ = "person_edits"
    __table_args__ = (sa.Index(None, "user_id", "id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    user_id: Mapped[int] = mapped_column(Id, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    kind: Mapped[str] = mapped_column(sa.String(32), nullable=False)
    summary: Mapped[str] = mapped_column(sa.Text, nullable=False)
    undo: Mapped[dict] = mapped_column(Json, nullable=False)
    created_at: Mapped[datetime] = _created_at()
    undone_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Job(Base):
    """A long-running task (indexing, clustering) and how far it got."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    user_id: Mapped[int | None] = _user_fk(nullable=True)
    kind: Mapped[str] = mapped_column(sa.String(32), nullable=False)
    status: Mapped[str] = mapped_column(sa.String(16), nullable=False)
    progress: Mapped[float] = mapped_column(sa.Float, nullable=False, server_default="0")
    started_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False, server_default=sa.func.now())
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    summary: Mapped[dict | None] = mapped_column(Json)
