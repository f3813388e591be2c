"""initial schema: users, tokens, photos, faces, persons, face links, jobs

Revision ID: 0001
Revises:
Create Date: 2026-11-23 14:35:29+00:00

Written to match services/store/models.py as of this revision. Migrations never import the
models: those keep changing after this file is frozen.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)


def _now(name: str) -> sa.Column:
    return sa.Column(name, Timestamp, server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", Id, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        _now("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )

    op.create_table(
        "api_tokens",
        sa.Column("id", Id, nullable=False),
        sa.Column("user_id", Id, nullable=False),
        sa.Column("token_sha256", sa.CHAR(64), nullable=False),
        _now("created_at"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_api_tokens_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_api_tokens_token_sha256")),
    )
    op.create_index(op.f("ix_api_tokens_user_id"), "api_tokens", ["user_id"])

    op.create_table(
        "photos",
        sa.Column("id", Id, nullable=False),
        sa.Column("user_id", Id, nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("sha256", sa.CHAR(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        _now("created_at"),
        sa.Column("indexed_at", Timestamp, nullable=True),
        sa.CheckConstraint("status IN ('pending', 'indexed', 'failed')", name=op.f("ck_photos_status")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_photos_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_photos")),
        sa.UniqueConstraint("user_id", "sha256", name=op.f("uq_photos_user_id_sha256")),
    )
    op.create_index(op.f("ix_photos_user_id_status"), "photos", ["user_id", "status"])

    op.create_table(
        "faces",
        sa.Column("id", Id, nullable=False),
        sa.Column("photo_id", Id, nullable=False),
        sa.Column("user_id", Id, nullable=False),
        sa.Column("face_index", sa.Integer(), nullable=False),
        sa.Column("x1", sa.Float(), nullable=False),
        sa.Column("y1", sa.Float(), nullable=False),
        sa.Column("x2", sa.Float(), nullable=False),
        sa.Column("y2", sa.Float(), nullable=False),
        sa.Column("landmarks", Json, nullable=False),
        sa.Column("det_score", sa.Float(), nullable=False),
        sa.Column("blur", sa.Float(), nullable=False),
        sa.Column("blurry", sa.Boolean(), nullable=False),
        sa.Column("trash_score", sa.Float(), nullable=True),
        sa.Column("trash", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("quality", sa.Float(), nullable=True),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("embedding_dim", sa.Integer(), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("attributes", Json, nullable=False),
        _now("created_at"),
        sa.ForeignKeyConstraint(["photo_id"], ["photos.id"], name=op.f("fk_faces_photo_id_photos"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_faces_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_faces")),
        sa.UniqueConstraint("photo_id", "face_index", name=op.f("uq_faces_photo_id_face_index")),
    )
    op.create_index(op.f("ix_faces_user_id_model_version"), "faces", ["user_id", "model_version"])

    op.create_table(
        "persons",
        sa.Column("id", Id, nullable=False),
        sa.Column("user_id", Id, nullable=False),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("hidden", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("cover_face_id", Id, nullable=True),
        sa.Column("user_confirmed", sa.Boolean(), server_default=sa.false(), nullable=False),
        _now("created_at"),
        _now("updated_at"),
        sa.ForeignKeyConstraint(["cover_face_id"], ["faces.id"], name=op.f("fk_persons_cover_face_id_faces"),
                                ondelete="SET NULL"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_persons_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_persons")),
    )
    op.create_index(op.f("ix_persons_user_id"), "persons", ["user_id"])
    op.create_index(op.f("ix_persons_cover_face_id"), "persons", ["cover_face_id"])

    op.create_table(
        "face_person",
        sa.Column("face_id", Id, nullable=False),
        sa.Column("person_id", Id, nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        _now("assigned_at"),
        sa.CheckConstraint("source IN ('auto', 'user')", name=op.f("ck_face_person_source")),
        sa.ForeignKeyConstraint(["face_id"], ["faces.id"], name=op.f("fk_face_person_face_id_faces"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["person_id"], ["persons.id"], name=op.f("fk_face_person_person_id_persons"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("face_id", name=op.f("pk_face_person")),
    )
    op.create_index(op.f("ix_face_person_person_id"), "face_person", ["person_id"])

    op.create_table(
        "jobs",
        sa.Column("id", Id, nullable=False),
        sa.Column("user_id", Id, nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float(), server_default="0", nullable=False),
        _now("started_at"),
        sa.Column("finished_at", Timestamp, nullable=True),
        sa.Column("summary", Json, nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_jobs_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_user_id"), "jobs", ["user_id"])


def downgrade() -> None:
    # Dropping a table drops its indexes; children go before the tables they reference.
    for table in ("jobs", "face_person", "persons", "faces", "photos", "api_tokens", "users"):
        op.drop_table(table)
