"""Drift monitoring: what the input gate and the model made of each reported study (its
gate score, whether it abstained, the findings its draft states with a box) and the gate
calibrations that scored them.

Studies reported before this revision have no observation; the drift figures start with the
first study reported after the upgrade.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "gate_references",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("percentile", sa.Float(), nullable=False),
        sa.Column("calibration_images", sa.Integer(), nullable=False),
        sa.Column("quantiles", sa.Text(), nullable=True),
        sa.Column("recorded_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "observed_findings",
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("finding", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("study_instance_uid", "finding"),
    )
    op.create_table(
        "study_observations",
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("observed_at", sa.Float(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("gate_reference", sa.String(length=16), nullable=True),
        sa.Column("gate_score", sa.Float(), nullable=True),
        sa.Column("abstained", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("study_instance_uid"),
    )
    with op.batch_alter_table("study_observations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_study_observations_model",
            ["model_name", "model_version", "observed_at"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_study_observations_observed_at"), ["observed_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("study_observations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_observations_observed_at"))
        batch_op.drop_index("ix_study_observations_model")
    op.drop_table("study_observations")
    op.drop_table("observed_findings")
    op.drop_table("gate_references")
