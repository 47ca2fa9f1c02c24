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
    # stat, urgent, routine or low: the highest any instance brought, or set by an operator
    sa.Column(
        "priority", sa.String(8), nullable=False, server_default="routine", default="routine"
    ),
    # the priority the study's current job message was sent with (a higher one re-sends it)
    sa.Column("queued_priority", sa.String(8), nullable=True),
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
    # the priority this instance brought (NULL: recorded without a decision)
    sa.Column("priority", sa.String(8), nullable=True),
    # the header's AccessionNumber (NULL: none, or recorded by an older release); signed
    # reports coming back from the RIS are matched to their study by it
    sa.Column("accession_number", sa.String(64), nullable=True, index=True),
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

signed_reports_table = sa.Table(
    "signed_reports",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
    # 1 for the first signed report of the study, one more for each correction
    sa.Column("version", sa.Integer, nullable=False),
    # the HL7 result status (OBR-25): F final, C corrected
    sa.Column("result_status", sa.String(1), nullable=False),
    sa.Column("report_text", sa.Text, nullable=False),
    # where it came from, e.g. "hl7:RIS^HOSPITAL" (MSH-3 and MSH-4)
    sa.Column("source", sa.String(255), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("message_control_id", sa.String(64), nullable=False),
    # when a later version replaced it (NULL: the study's current signed report)
    sa.Column("superseded_at", sa.Float, nullable=True),
    sa.UniqueConstraint("study_instance_uid", "version", name="uq_signed_reports_version"),
)

# every signed-report message received, whatever became of it (stored, repeated, preliminary,
# unmatched, rejected): the answer given and why
report_messages_table = sa.Table(
    "report_messages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("received_at", sa.Float, nullable=False, index=True),
    sa.Column("message_control_id", sa.String(64), nullable=False),
    sa.Column("source", sa.String(255), nullable=False),
    sa.Column("result_status", sa.String(8), nullable=False),
    sa.Column("accession_number", sa.String(64), nullable=True),
    # the matched study (NULL: none matched)
    sa.Column("study_instance_uid", sa.String(64), nullable=True, index=True),
    # stored, corrected, repeat, not-final, unmatched, ambiguous, rejected
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("ack_code", sa.String(2), nullable=False),
    sa.Column("note", sa.Text, nullable=False),
    # the report text of a message not stored as a signed report (kept for a later match)
    sa.Column("report_text", sa.Text, nullable=True),
)

# the draft scored against a signed report version: CheXpert-style labels of both texts
report_scores_table = sa.Table(
    "report_scores",
    metadata,
    sa.Column("study_instance_uid", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("scored_at", sa.Float, nullable=False),
    # the model abstained: its draft states no findings
    sa.Column("abstained", sa.Boolean, nullable=False),
    # JSON objects: observation -> 1 (positive), 0 (negative), -1 (uncertain) or null
    sa.Column("draft_labels", sa.Text, nullable=False),
    sa.Column("signed_labels", sa.Text, nullable=False),
    # the labeler's name and version
    sa.Column("labeler", sa.String(64), nullable=False),
)

# what the input gate and the model made of each reported study, for drift monitoring
# (studydb.drift): one row per study, replaced when the study is reported again
study_observations_table = sa.Table(
    "study_observations",
    metadata,
    sa.Column("study_instance_uid", sa.String(64), primary_key=True),
    # when the worker recorded the study as reported
    sa.Column("observed_at", sa.Float, nullable=False, index=True),
    sa.Column("model_name", sa.String(128), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    # the gate calibration that scored it (gate_references.id; NULL: the input gate was off)
    sa.Column("gate_reference", sa.String(16), nullable=True),
    # the input gate's out-of-distribution score (NULL: not scored, e.g. declined by a header
    # or pixel check, or the gate off)
    sa.Column("gate_score", sa.Float, nullable=True),
    # the input gate declined the study (an abstention SR was written)
    sa.Column("abstained", sa.Boolean, nullable=False),
    sa.Index("ix_study_observations_model", "model_name", "model_version", "observed_at"),
)

# each finding (d2r_core.classes.VINDR_CLASSES) a reported study's draft states with a box
observed_findings_table = sa.Table(
    "observed_findings",
    metadata,
    sa.Column("study_instance_uid", sa.String(64), primary_key=True),
    sa.Column("finding", sa.String(64), primary_key=True),
)

# the calibrations of the input gate that scored studies: the reference distribution of the score
gate_references_table = sa.Table(
    "gate_references",
    metadata,
    # a digest of the other columns (studydb.drift.GateReference.key)
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("percentile", sa.Float, nullable=False),
    sa.Column("calibration_images", sa.Integer, nullable=False),
    # JSON list: quantiles of the held-out scores at 0, 1/k, ..., 1 (NULL: the gate file has none)
    sa.Column("quantiles", sa.Text, nullable=True),
    sa.Column("recorded_at", sa.Float, nullable=False),
)
