"""persons.id never reused on SQLite (AUTOINCREMENT)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 00:05:00+00:00

Undo puts a merged person back under its old id. A SQLite rowid without AUTOINCREMENT hands the
largest deleted id to the next new row, so a person made meanwhile (by anyone) could hold it,
and the undo would collide with it. PostgreSQL's sequences never hand an id out twice, so only
SQLite's table is rebuilt.
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _rebuild(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("persons", recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}):
        pass


def upgrade() -> None:
    _rebuild(True)


def downgrade() -> None:
    _rebuild(False)
