"""Several active nodes on one database: node heartbeats, which node holds which association,
duty leases, and the node that received each instance.

``nodes`` records each node's heartbeat; ``node_associations`` counts, per node and study, the
associations still open (so a surviving node can expire those of a node that died); ``duties``
holds the leases of work one node does at a time (retention, the spool check);
``instances.received_by`` names the node whose receiver recorded the instance. The node was
stopped to upgrade, so no association is open: the per-study counters start again at 0.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("received_by", sa.String(length=64), nullable=True))
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(length=64), primary_key=True),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "node_associations",
        sa.Column("node", sa.String(length=64), primary_key=True),
        sa.Column("study_instance_uid", sa.String(length=64), primary_key=True),
        sa.Column("open", sa.Integer(), nullable=False),
    )
    op.create_table(
        "duties",
        sa.Column("name", sa.String(length=32), primary_key=True),
        sa.Column("holder", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )
    op.execute("UPDATE studies SET open_associations = 0")


def downgrade() -> None:
    op.drop_table("duties")
    op.drop_table("node_associations")
    op.drop_table("nodes")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("received_by")
