"""The study database's tables (SQLAlchemy Core); the migrations in :mod:`studydb.migrations`
create them, and every change to them is a new migration."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

studies_table = sa.Table(
    "studies",
    metadata,
    sa.Column("study_instance_uid", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("generation", sa.Integer, nullable=False, default=0),
    sa.Column("first_received_at", sa.Float, nullable=False),
    sa.Column("last_received_at", sa.Float, nullable=False),
    sa.Column("queued_at", sa.Float, nullable=True),
    sa.Column("owner", sa.String(255), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    sa.Column("processed_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("model_name", sa.String(128), nullable=True),
    sa.Column("model_version", sa.String(64), nullable=True),
    sa.Column("findings", sa.Text, nullable=True),
    sa.Column("impression", sa.Text, nullable=True),
    sa.Column("lesion_count", sa.Integer, nullable=True),
    sa.Column("result_paths", sa.Text, nullable=True),  # JSON list of SR files in the spool
    # claims of the current generation (each worker attempt); bounded by D2R_MAX_ATTEMPTS
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0", default=0),
    # when the study entered its current state (NULL on rows written before it existed)
    sa.Column("state_changed_at", sa.Float, nullable=True),
    # the worker stage of the current or last attempt (spool-read ... send)
    sa.Column("stage", sa.String(32), nullable=True),
    # associations of this node that brought an instance of the study and are still open
    sa.Column("open_associations", sa.Integer, nullable=False, server_default="0", default=0),
    # when the last of those associations was released (the early-completion rule)
    sa.Column("released_at", sa.Float, nullable=True),
)

instances_table = sa.Table(
    "instances",
    metadata,
    sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("series_instance_uid", sa.String(64), nullable=False),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
    sa.Column("modality", sa.String(16), nullable=False),
    sa.Column("body_part_examined", sa.String(64), nullable=False),
    sa.Column("view_position", sa.String(16), nullable=False),
    sa.Column("series_description", sa.String(128), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("calling_ae_title", sa.String(16), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("duplicates", sa.Integer, nullable=False, default=0),
    sa.Column("conflicts", sa.Integer, nullable=False, default=0),
    # the node (D2R_NODE_NAME) whose receiver recorded the instance
    sa.Column("received_by", sa.String(64), nullable=True),
)

nodes_table = sa.Table(
    "nodes",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
)

node_associations_table = sa.Table(
    "node_associations",
    metadata,
    sa.Column("node", sa.String(64), primary_key=True),
    sa.Column("study_instance_uid", sa.String(64), primary_key=True),
    # associations of this node that brought an instance of the study and are still open
    sa.Column("open", sa.Integer, nullable=False),
)

duties_table = sa.Table(
    "duties",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("holder", sa.String(64), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
)

deliveries_table = sa.Table(
    "deliveries",
    metadata,
    sa.Column("study_instance_uid", sa.String(64), primary_key=True),
    sa.Column("destination", sa.String(128), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, nullable=True),
    sa.Column("enqueued_at", sa.Float, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("sent_at", sa.Float, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
)

events_table = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=True, index=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
)

rejections_table = sa.Table(
    "rejections",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sop_instance_uid", sa.String(64), nullable=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=True),
    sa.Column("calling_ae_title", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)
