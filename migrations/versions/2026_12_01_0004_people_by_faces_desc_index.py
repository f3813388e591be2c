"""people list by most faces: a (user_id, face_count DESC, id) index instead of (user_id, face_count, id)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 23:45:00+00:00

The people list's default order is most faces first, ties by id: face_count DESC, id ASC. An
ascending index read backwards gives id DESC within a count, so PostgreSQL sorted every tie
group it touched, and a deep page's keyset (count below the cursor's, or the same count and a
higher id) was no index range at all: page 200 of a 20,000-person library read and threw away
the 10,000 rows before it (36 ms against 0.1 ms for page 1, benchmarks/api_load.py). With the
index in the order of the list, each of the two parts of the keyset is one index range.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_persons_user_id_face_count_desc_id", "persons",
                    ["user_id", sa.text("face_count DESC"), "id"])
    op.drop_index(op.f("ix_persons_user_id_face_count_id"), table_name="persons")


def downgrade() -> None:
    op.create_index(op.f("ix_persons_user_id_face_count_id"), "persons", ["user_id", "face_count", "id"])
    op.drop_index("ix_persons_user_id_face_count_desc_id", table_name="persons")
