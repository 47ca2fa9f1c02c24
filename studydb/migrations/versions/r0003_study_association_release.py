"""The early-completion rule: open associations of a study and when the last was released.

``open_associations`` counts the node's associations that brought an instance of the study and
are still open; ``released_at`` is when the last of them was released. A receiving study is
complete ``D2R_STUDY_RELEASE_GRACE_SECONDS`` after that release when no other association of it
is open. Studies already there start at 0 and NULL: they complete by their quiet period.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("open_associations", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("released_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("released_at")
        batch_op.drop_column("open_associations")
