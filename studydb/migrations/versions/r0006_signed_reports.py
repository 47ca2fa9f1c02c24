"""Signed reports coming back from the RIS: each instance's AccessionNumber (to match them),
the signed reports (one row per study and version), every report message received, and the
scores of the drafts against the signed reports.

Instances recorded before this revision have no accession number; their studies are matched
by the Study Instance UID a message carries.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("accession_number", sa.String(length=64), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_instances_accession_number"), ["accession_number"], unique=False
        )
    op.create_table(
        "signed_reports",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("result_status", sa.String(length=1), nullable=False),
        sa.Column("report_text", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=255), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("message_control_id", sa.String(length=64), nullable=False),
        sa.Column("superseded_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_instance_uid", "version", name="uq_signed_reports_version"),
    )
    with op.batch_alter_table("signed_reports", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_signed_reports_study_instance_uid"),
            ["study_instance_uid"],
            unique=False,
        )
    op.create_table(
        "report_messages",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("message_control_id", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=255), nullable=False),
        sa.Column("result_status", sa.String(length=8), nullable=False),
        sa.Column("accession_number", sa.String(length=64), nullable=True),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("ack_code", sa.String(length=2), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("report_text", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("report_messages", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_report_messages_received_at"), ["received_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_report_messages_study_instance_uid"),
            ["study_instance_uid"],
            unique=False,
        )
    op.create_table(
        "report_scores",
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("scored_at", sa.Float(), nullable=False),
        sa.Column("abstained", sa.Boolean(), nullable=False),
        sa.Column("draft_labels", sa.Text(), nullable=False),
        sa.Column("signed_labels", sa.Text(), nullable=False),
        sa.Column("labeler", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("study_instance_uid", "version"),
    )


def downgrade() -> None:
    op.drop_table("report_scores")
    op.drop_table("report_messages")
    op.drop_table("signed_reports")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_accession_number"))
        batch_op.drop_column("accession_number")
