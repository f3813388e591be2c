"""person albums as a service: favourites, face counts, "not this person", the edit log, token labels

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 23:20:00+00:00

- persons.favorite, persons.face_count (kept by the rules layer so a people page of 20,000
  persons never counts a million links per request) with keyset indexes for its orders;
- face_rejections: "not this person" decisions that no assignment or re-clustering undoes;
- person_edits: each user's edit log, what undo reads;
- api_tokens.label, users.library_root (where an embedded library's files are, for thumbnails);
- face_person (person_id, face_id) for paging a person's faces, replacing (person_id).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("persons") as batch:
        batch.add_column(sa.Column("favorite", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column("face_count", sa.Integer(), server_default="0", nullable=False))
    op.execute("UPDATE persons SET face_count = "
               "(SELECT count(*) FROM face_person WHERE face_person.person_id = persons.id)")
    op.create_index(op.f("ix_persons_user_id_face_count_id"), "persons", ["user_id", "face_count", "id"])
    op.create_index(op.f("ix_persons_user_id_name_id"), "persons", ["user_id", "name", "id"])

    op.add_column("users", sa.Column("library_root", sa.Text(), nullable=True))
    op.add_column("api_tokens", sa.Column("label", sa.String(255), nullable=True))

    op.drop_index(op.f("ix_face_person_person_id"), table_name="face_person")
    op.create_index(op.f("ix_face_person_person_id_face_id"), "face_person", ["person_id", "face_id"])

    op.create_table(
        "face_rejections",
        sa.Column("face_id", Id, nullable=False),
        sa.Column("person_id", Id, nullable=False),
        sa.Column("user_id", Id, nullable=False),
        sa.Column("created_at", Timestamp, server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["face_id"], ["faces.id"], name=op.f("fk_face_rejections_face_id_faces"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["person_id"], ["persons.id"], name=op.f("fk_face_rejections_person_id_persons"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_face_rejections_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("face_id", "person_id", name=op.f("pk_face_rejections")),
    )
    op.create_index(op.f("ix_face_rejections_person_id"), "face_rejections", ["person_id"])
    op.create_index(op.f("ix_face_rejections_user_id"), "face_rejections", ["user_id"])

    op.create_table(
        "person_edits",
        sa.Column("id", Id, nullable=False),
        sa.Column("user_id", Id, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("undo", Json, nullable=False),
        sa.Column("created_at", Timestamp, server_default=sa.func.now(), nullable=False),
        sa.Column("undone_at", Timestamp, nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_person_edits_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_person_edits")),
    )
    op.create_index(op.f("ix_person_edits_user_id_id"), "person_edits", ["user_id", "id"])


def downgrade() -> None:
    op.drop_table("person_edits")
    op.drop_table("face_rejections")
    op.drop_index(op.f("ix_face_person_person_id_face_id"), table_name="face_person")
    op.create_index(op.f("ix_face_person_person_id"), "face_person", ["person_id"])
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("label")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("library_root")
    op.drop_index(op.f("ix_persons_user_id_name_id"), table_name="persons")
    op.drop_index(op.f("ix_persons_user_id_face_count_id"), table_name="persons")
    with op.batch_alter_table("persons") as batch:
        batch.drop_column("face_count")
        batch.drop_column("favorite")
