"""Study attempts, the time a study entered its state, and the worker stage of its attempt.

``attempts`` counts the worker claims of the current generation (``D2R_MAX_ATTEMPTS``);
``state_changed_at`` feeds ``d2r status --stuck`` and the oldest-unfinished-study gauge, and is
filled from ``updated_at`` for the studies already there; ``stage`` names the worker stage of
the current or last attempt.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("state_changed_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("stage", sa.String(length=32), nullable=True))
    op.execute("UPDATE studies SET state_changed_at = updated_at WHERE state_changed_at IS NULL")


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("stage")
        batch_op.drop_column("state_changed_at")
        batch_op.drop_column("attempts")
