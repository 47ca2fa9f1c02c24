"""Study states and the records the study database reads and writes (no PHI: UIDs, header
codes, states and reasons)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from d2r_core.priority import Priority, PriorityDecision

__all__ = [
    "DELIVERY_FAILED",
    "DELIVERY_PENDING",
    "DELIVERY_SENT",
    "DONE",
    "FAILED",
    "PRIORITY_EVENT",
    "PROCESSING",
    "QUEUED",
    "RECEIVING",
    "RETAINED_STATES",
    "SENDING",
    "SKIPPED",
    "SPOOL_PURGED",
    "STUDY_STATES",
    "UNFINISHED_STATES",
    "Delivery",
    "Event",
    "InstanceRecord",
    "NodeView",
    "StudyView",
]

RECEIVING = "receiving"
QUEUED = "queued"
PROCESSING = "processing"
SENDING = "sending"
DONE = "done"
FAILED = "failed"
SKIPPED = "skipped"
STUDY_STATES = (RECEIVING, QUEUED, PROCESSING, SENDING, DONE, FAILED, SKIPPED)
#: states a study must leave on its own; one that stays in them is stuck
UNFINISHED_STATES = (RECEIVING, QUEUED, PROCESSING, SENDING)

#: states whose spooled files the retention period removes
RETAINED_STATES = (DONE, SKIPPED)
#: event kind recorded when a study's files leave the spool
SPOOL_PURGED = "spool-purged"
#: event kind recorded when a study's priority is decided or changes, with its source
PRIORITY_EVENT = "priority"

DELIVERY_PENDING = "pending"
DELIVERY_SENT = "sent"
DELIVERY_FAILED = "failed"


@dataclass(frozen=True)
class InstanceRecord:
    """One instance as received and spooled; header values only, no PHI."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    body_part_examined: str
    view_position: str
    series_description: str
    path: str
    size: int
    sha256: str
    calling_ae_title: str
    received_at: datetime
    #: the node whose receiver recorded it (``D2R_NODE_NAME``; empty when not known)
    received_by: str = ""
    #: the priority the receiver decided for it, and why (None: no decision; the study keeps
    #: its own); the source goes to the study's events, the priority to the row
    priority: PriorityDecision | None = None
    #: the header's AccessionNumber (empty when absent): an order identifier, stored to match
    #: signed reports by it, never logged
    accession_number: str = ""

    def to_row(self) -> dict[str, Any]:
        row = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "priority"}
        row["received_at"] = self.received_at.timestamp()
        row["received_by"] = self.received_by or None
        row["accession_number"] = self.accession_number or None
        row["priority"] = None if self.priority is None else str(self.priority.priority)
        return row

    @classmethod
    def from_row(cls, row: Any) -> InstanceRecord:
        m = row._mapping
        special = ("received_at", "received_by", "priority", "accession_number")
        priority = m.get("priority")
        return cls(
            **{f: m[f] for f in cls.__dataclass_fields__ if f not in special},
            received_at=datetime.fromtimestamp(m["received_at"], UTC),
            received_by=m["received_by"] or "",
            accession_number=m.get("accession_number") or "",
            priority=None
            if not priority
            else PriorityDecision(Priority.parse(priority), "recorded"),
        )


@dataclass(frozen=True)
class Delivery:
    destination: str
    state: str
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    sent_at: float | None


@dataclass(frozen=True)
class NodeView:
    """One node of the study database, as ``d2r status`` shows it."""

    name: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    open_associations: int


@dataclass(frozen=True)
class Event:
    at: float
    kind: str
    detail: str


@dataclass(frozen=True)
class StudyView:
    """What ``d2r status`` and the status page show of one study."""

    study_instance_uid: str
    state: str
    reason: str | None
    generation: int
    first_received_at: float
    last_received_at: float
    queued_at: float | None
    processed_at: float | None
    finished_at: float | None
    model_name: str | None
    model_version: str | None
    findings: str | None
    impression: str | None
    lesion_count: int | None
    result_paths: tuple[str, ...]
    instance_count: int
    deliveries: tuple[Delivery, ...]
    #: worker attempts of the current generation
    attempts: int = 0
    #: worker stage of the current or last attempt
    stage: str | None = None
    #: when the study entered its state (falls back to the last update on older rows)
    state_since: float | None = None
    #: (node, instances) for each node that received instances of the study
    received_by: tuple[tuple[str, int], ...] = ()
    #: stat, urgent, routine or low
    priority: str = "routine"
