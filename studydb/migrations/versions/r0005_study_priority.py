"""A study's priority (stat, urgent, routine, low), the priority its queued job was sent with,
and the priority each instance brought.

Existing studies are routine, as every study was before; the jobs of those queued or
processing were sent without a priority, which counts as routine.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("priority", sa.String(length=8), nullable=False, server_default="routine")
        )
        batch_op.add_column(sa.Column("queued_priority", sa.String(length=8), nullable=True))
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("priority", sa.String(length=8), nullable=True))
    # the jobs of studies in the queue (or claimed) were sent as routine
    op.execute(
        "UPDATE studies SET queued_priority = 'routine' WHERE state IN ('queued', 'processing')"
    )


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("priority")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("queued_priority")
        batch_op.drop_column("priority")
