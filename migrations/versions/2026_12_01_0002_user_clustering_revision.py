"""users.clustering_revision: a counter the cluster worker checks its cached copy of a user against

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 14:40:00+00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("clustering_revision", sa.BigInteger(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:  # SQLite drops a column by copying the table
        batch.drop_column("clustering_revision")
