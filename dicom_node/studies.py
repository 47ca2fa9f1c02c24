"""Durable study state: the single source of truth for what still needs doing.

A SQLite file by default, any SQLAlchemy PostgreSQL URL for several replicas. The broker only
carries messages; this database decides which studies are complete, queued, processing, sent,
failed or skipped, and the reconciler (:mod:`dicom_node.assembler`) re-queues whatever a restart
or a lost message left behind.

States of a study::

    receiving --quiet period / force timeout--> queued --claimed by a worker--> processing
    processing --SRs written--> sending --every destination acknowledged--> done
    receiving --nothing eligible--> skipped (reason recorded)
    processing / sending --error or retries exhausted--> failed (reason recorded; ``d2r retry``)
    processing --unexpected error, attempts left--> queued (``attempt-failed`` event)
    processing --claim expired (worker killed or hung)--> queued, or failed after the last attempt

Each claim counts one attempt of the study's current generation (``attempts``); a worker renews
its claim's short lease while it works, so the reconciler re-queues the study of a dead worker
within one lease. ``state_changed_at`` records when the study entered its state (``d2r status
--stuck``).

A study's ``generation`` increases each time it is queued. A job carries the generation it was
queued with, so a stale message (the study re-opened by a late instance, or already handled) is
recognised and dropped by :meth:`StudyStore.claim`.

Late instances: an instance arriving while the study is ``receiving`` or ``queued`` (not yet
claimed) joins it and restarts the quiet period. One arriving after a worker claimed the study
is stored and recorded with an event, but does not start a second, different report; ``d2r retry
--reprocess`` re-runs the study on purpose.

Completion: a receiving study is complete once no instance arrived for the quiet period, or once
the force timeout passed since its first instance, or -- the early rule -- a short grace period
after the association that brought its last instance was released while no other association
that brought an instance of it is still open (``open_associations``, ``released_at``; see
:meth:`StudyStore.open_association` and :meth:`StudyStore.close_association`). The counters live
in this database, so a node restarted between the release and the completion still completes the
study on time. An association cut by a crash of the node is never counted as released: its
studies fall back to the quiet period.

Times are stored as UTC seconds since the epoch (floats), so SQLite and PostgreSQL behave the
same."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from dicom_node import schema

logger = logging.getLogger(__name__)

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

DELIVERY_PENDING = "pending"
DELIVERY_SENT = "sent"
DELIVERY_FAILED = "failed"

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

    def to_row(self) -> dict[str, Any]:
        row = {f: getattr(self, f) for f in self.__dataclass_fields__}
        row["received_at"] = self.received_at.timestamp()
        return row

    @classmethod
    def from_row(cls, row: Any) -> InstanceRecord:
        m = row._mapping
        return cls(
            **{f: m[f] for f in cls.__dataclass_fields__ if f != "received_at"},
            received_at=datetime.fromtimestamp(m["received_at"], UTC),
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


def _now() -> float:
    return time.time()


class StudyStore:
    """Study, instance, delivery and event records in a SQLAlchemy database.

    Parameters
    ----------
    url : str
        SQLAlchemy URL, e.g. ``sqlite:////var/lib/d2r/d2r.db`` or
        ``postgresql+psycopg://d2r@db/d2r``. An empty database is created by the migrations.
    auto_upgrade : bool
        Upgrade a database at an older schema revision instead of refusing it
        (:func:`dicom_node.schema.prepare`, which raises a :class:`~dicom_node.errors.SchemaError`).
    """

    def __init__(self, url: str, *, auto_upgrade: bool = False) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError("url must be a non-empty SQLAlchemy URL")
        self.url = url
        self.engine: Engine = make_engine(url)
        try:
            schema.prepare(self.engine, auto_upgrade=auto_upgrade)
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # ----------------------------------------------------------------- events
    def _event(self, conn: Connection, study_uid: str | None, kind: str, detail: str) -> None:
        conn.execute(
            events_table.insert().values(
                study_instance_uid=study_uid, at=_now(), kind=kind, detail=detail
            )
        )

    def add_event(self, study_uid: str | None, kind: str, detail: str) -> None:
        """Append one event (no PHI: UIDs, states and reasons only)."""
        with self._tx() as conn:
            self._event(conn, study_uid, kind, detail)

    def events(self, study_uid: str) -> list[Event]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(events_table.c.at, events_table.c.kind, events_table.c.detail)
                .where(events_table.c.study_instance_uid == study_uid)
                .order_by(events_table.c.id)
            ).all()
        return [Event(at=r.at, kind=r.kind, detail=r.detail) for r in rows]

    # -------------------------------------------------------------- node side
    def record_instance(self, record: InstanceRecord, *, outcome: str) -> None:
        """Record a durably spooled instance (``outcome``: stored, duplicate or conflict)."""
        if outcome not in ("stored", "duplicate", "conflict"):
            raise ValueError(f"outcome must be stored, duplicate or conflict, not {outcome!r}")
        for attempt in range(3):
            try:
                self._record_instance(record, outcome)
                return
            except sa.exc.IntegrityError:
                # Two associations delivered the first instances of one study at once, or the
                # same instance twice: the loser re-reads and takes the other branch.
                if attempt == 2:
                    raise
                if outcome == "stored" and self._has_instance(record.sop_instance_uid):
                    outcome = "duplicate"

    def _has_instance(self, sop_uid: str) -> bool:
        with self._tx() as conn:
            row = conn.execute(
                sa.select(instances_table.c.sop_instance_uid).where(
                    instances_table.c.sop_instance_uid == sop_uid
                )
            ).first()
        return row is not None

    def _record_instance(self, record: InstanceRecord, outcome: str) -> None:
        now = record.received_at.timestamp()
        study_uid = record.study_instance_uid
        with self._tx() as conn:
            if outcome == "stored":
                conn.execute(instances_table.insert().values(**record.to_row()))
            else:
                column = "duplicates" if outcome == "duplicate" else "conflicts"
                conn.execute(
                    instances_table.update()
                    .where(instances_table.c.sop_instance_uid == record.sop_instance_uid)
                    .values({column: instances_table.c[column] + 1})
                )
                self._event(
                    conn,
                    study_uid,
                    outcome,
                    f"instance {record.sop_instance_uid}: "
                    + (
                        "same bytes received again; kept one copy"
                        if outcome == "duplicate"
                        else f"different bytes under the same SOP Instance UID; first copy kept, "
                        f"new copy quarantined at {record.path}"
                    ),
                )
                return
            study = conn.execute(
                sa.select(studies_table)
                .where(studies_table.c.study_instance_uid == study_uid)
                .with_for_update()
            ).first()
            if study is None:
                conn.execute(
                    studies_table.insert().values(
                        study_instance_uid=study_uid,
                        state=RECEIVING,
                        generation=0,
                        first_received_at=now,
                        last_received_at=now,
                        updated_at=now,
                        state_changed_at=now,
                    )
                )
                self._event(conn, study_uid, "received", "first instance received")
                return
            values: dict[str, Any] = {
                "last_received_at": max(now, study.last_received_at),
                "updated_at": _now(),
            }
            if study.state in (QUEUED, SKIPPED):
                values.update(state=RECEIVING, reason=None, queued_at=None, state_changed_at=_now())
                self._event(
                    conn,
                    study_uid,
                    "reopened",
                    f"instance {record.sop_instance_uid} arrived while {study.state}; "
                    "quiet period restarted",
                )
            elif study.state != RECEIVING:
                self._event(
                    conn,
                    study_uid,
                    "late-instance",
                    f"instance {record.sop_instance_uid} arrived while {study.state}; stored, "
                    "not added to the report (use d2r retry --reprocess)",
                )
            conn.execute(
                studies_table.update()
                .where(studies_table.c.study_instance_uid == study_uid)
                .values(**values)
            )

    def record_rejection(
        self,
        *,
        sop_instance_uid: str | None,
        study_instance_uid: str | None,
        reason: str,
        calling_ae_title: str,
    ) -> None:
        """Record an instance that was refused with a failure status."""
        with self._tx() as conn:
            conn.execute(
                rejections_table.insert().values(
                    sop_instance_uid=sop_instance_uid,
                    study_instance_uid=study_instance_uid,
                    calling_ae_title=calling_ae_title,
                    reason=reason,
                    at=_now(),
                )
            )

    def rejections(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(rejections_table).order_by(rejections_table.c.id.desc()).limit(limit)
            ).all()
        return [dict(r._mapping) for r in rows]

    def instances(self, study_uid: str) -> list[InstanceRecord]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(instances_table)
                .where(instances_table.c.study_instance_uid == study_uid)
                .order_by(instances_table.c.received_at)
            ).all()
        return [InstanceRecord.from_row(r) for r in rows]

    def open_association(self, study_uid: str) -> None:
        """An association brought its first instance of ``study_uid`` (after it was recorded)."""
        s = studies_table.c
        with self._tx() as conn:
            conn.execute(
                studies_table.update()
                .where(s.study_instance_uid == study_uid)
                .values(open_associations=s.open_associations + 1)
            )

    def close_association(self, study_uids: Sequence[str], *, released: bool) -> None:
        """An association that brought instances of ``study_uids`` ended.

        ``released``: it ended with an A-RELEASE. Then each study whose last open association
        this was records ``released_at`` (the early-completion rule); an aborted association
        only stops counting, leaving its studies to the quiet period.
        """
        if not study_uids:
            return
        s = studies_table.c
        now = _now()
        with self._tx() as conn:
            for uid in study_uids:
                values: dict[str, Any] = {
                    "open_associations": sa.case(
                        (s.open_associations > 0, s.open_associations - 1), else_=0
                    )
                }
                if released:
                    values["released_at"] = sa.case(
                        (s.open_associations <= 1, now), else_=s.released_at
                    )
                conn.execute(
                    studies_table.update().where(s.study_instance_uid == uid).values(**values)
                )

    def due_for_completion(
        self,
        *,
        quiet_seconds: float,
        force_seconds: float,
        release_grace_seconds: float | None = None,
        now: float | None = None,
    ) -> list[str]:
        """The StudyInstanceUIDs of :meth:`completion_due`."""
        return [
            uid
            for uid, _ in self.completion_due(
                quiet_seconds=quiet_seconds,
                force_seconds=force_seconds,
                release_grace_seconds=release_grace_seconds,
                now=now,
            )
        ]

    def completion_due(
        self,
        *,
        quiet_seconds: float,
        force_seconds: float,
        release_grace_seconds: float | None = None,
        now: float | None = None,
    ) -> list[tuple[str, str]]:
        """Studies still receiving that are complete, each with why.

        Why is ``quiet period``, ``force timeout`` or, with ``release_grace_seconds``,
        ``association released``: the association that brought the last instance was released
        that long ago and no other association of the study is open.
        """
        now = _now() if now is None else now
        s = studies_table.c
        quiet = s.last_received_at <= now - quiet_seconds
        forced = s.first_received_at <= now - force_seconds
        conditions = [quiet, forced]
        if release_grace_seconds is not None:
            released = sa.and_(
                s.open_associations == 0,
                s.released_at.is_not(None),
                s.released_at >= s.last_received_at,
                s.released_at <= now - release_grace_seconds,
            )
            conditions.append(released)
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(
                    s.study_instance_uid,
                    sa.case(
                        (quiet, "quiet period"),
                        (forced, "force timeout"),
                        else_="association released",
                    ).label("why"),
                ).where(s.state == RECEIVING, sa.or_(*conditions))
            ).all()
        return [(str(r.study_instance_uid), str(r.why)) for r in rows]

    def force_complete(self, study_uid: str) -> bool:
        """Make a receiving study due now (manual force-complete)."""
        with self._tx() as conn:
            res = conn.execute(
                studies_table.update()
                .where(
                    studies_table.c.study_instance_uid == study_uid,
                    studies_table.c.state == RECEIVING,
                )
                .values(last_received_at=0.0, updated_at=_now())
            )
            if res.rowcount:
                self._event(conn, study_uid, "force-complete", "completed by operator")
        return bool(res.rowcount)

    def mark_queued(self, study_uid: str, *, reason: str = "study complete") -> int:
        """receiving -> queued; returns the new generation (0 if the study was not receiving)."""
        s = studies_table.c
        with self._tx() as conn:
            row = conn.execute(
                sa.select(s.generation, s.state).where(s.study_instance_uid == study_uid)
            ).first()
            if row is None or row.state != RECEIVING:
                return 0
            generation = row.generation + 1
            res = conn.execute(
                studies_table.update()
                .where(s.study_instance_uid == study_uid, s.state == RECEIVING)
                .values(
                    state=QUEUED,
                    generation=generation,
                    queued_at=_now(),
                    reason=None,
                    attempts=0,
                    updated_at=_now(),
                    state_changed_at=_now(),
                )
            )
            if not res.rowcount:
                return 0
            self._event(conn, study_uid, "queued", f"{reason}; generation {generation}")
        return int(generation)

    def mark_skipped(self, study_uid: str, reason: str) -> None:
        self._set_state(study_uid, SKIPPED, reason, from_states=(RECEIVING,))

    def requeue_candidates(
        self,
        *,
        requeue_after: float,
        max_attempts: int | None = None,
        now: float | None = None,
    ) -> list[tuple[str, int]]:
        """Queued studies whose message may be lost, and processing studies whose lease expired.

        With ``max_attempts``, an expired claim is a candidate only while the study has
        attempts left (:meth:`fail_exhausted` ends the others). With ``requeue_after`` set to
        infinity only expired claims are returned. Returns (StudyInstanceUID, generation)
        pairs; the caller re-sends the job and calls :meth:`touch_queued`.
        """
        now = _now() if now is None else now
        s = studies_table.c
        expired = sa.and_(s.state == PROCESSING, s.lease_expires_at <= now)
        if max_attempts is not None:
            expired = sa.and_(expired, s.attempts < max_attempts)
        conditions = [expired]
        if requeue_after != float("inf"):
            conditions.append(sa.and_(s.state == QUEUED, s.queued_at <= now - requeue_after))
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(s.study_instance_uid, s.generation).where(sa.or_(*conditions))
            ).all()
        return [(r.study_instance_uid, r.generation) for r in rows]

    def fail_exhausted(self, *, max_attempts: int, now: float | None = None) -> list[str]:
        """Fail processing studies whose claim expired after their last allowed attempt.

        A worker killed (or hung past its time limit) on every attempt leaves the lease to
        expire; such a study is failed with the reason instead of being queued again.
        """
        now = _now() if now is None else now
        s = studies_table.c
        failed = []
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(s.study_instance_uid, s.attempts, s.stage).where(
                    s.state == PROCESSING, s.lease_expires_at <= now, s.attempts >= max_attempts
                )
            ).all()
            for r in rows:
                reason = (
                    f"{r.stage or 'processing'}: WorkerLost: the claim expired without a result "
                    f"on attempt {r.attempts} of {max_attempts} (worker killed or hung)"
                )
                res = conn.execute(
                    studies_table.update()
                    .where(
                        s.study_instance_uid == r.study_instance_uid,
                        s.state == PROCESSING,
                        s.lease_expires_at <= now,
                    )
                    .values(
                        state=FAILED,
                        reason=reason,
                        owner=None,
                        lease_expires_at=None,
                        finished_at=now,
                        updated_at=now,
                        state_changed_at=now,
                    )
                )
                if res.rowcount:
                    self._event(conn, r.study_instance_uid, FAILED, reason)
                    failed.append(str(r.study_instance_uid))
        return failed

    def touch_queued(self, study_uid: str, *, detail: str) -> None:
        """Record a re-send of a study's job; expired processing leases go back to queued."""
        s = studies_table.c
        now = _now()
        with self._tx() as conn:
            conn.execute(
                studies_table.update()
                .where(s.study_instance_uid == study_uid, s.state == PROCESSING)
                .values(state_changed_at=now)
            )
            conn.execute(
                studies_table.update()
                .where(s.study_instance_uid == study_uid, s.state.in_((QUEUED, PROCESSING)))
                .values(state=QUEUED, queued_at=now, owner=None, lease_expires_at=None)
            )
            self._event(conn, study_uid, "requeued", detail)

    # ------------------------------------------------------------ worker side
    def queued_studies(
        self,
        *,
        limit: int,
        exclude: Collection[str] = (),
        max_attempts: int | None = None,
    ) -> list[tuple[str, int]]:
        """The longest-queued studies, (StudyInstanceUID, generation), oldest first.

        A worker filling a batch claims them with :meth:`claim`, which alone decides: a study
        another worker claims first is simply not claimed here, and its own job message finds
        it claimed and is dropped.
        """
        if limit <= 0:
            return []
        s = studies_table.c
        cond = [s.state == QUEUED]
        if exclude:
            cond.append(s.study_instance_uid.not_in(list(exclude)))
        if max_attempts is not None:
            cond.append(s.attempts < max_attempts)
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(s.study_instance_uid, s.generation)
                .where(*cond)
                .order_by(s.queued_at, s.study_instance_uid)
                .limit(limit)
            ).all()
        return [(str(r.study_instance_uid), int(r.generation)) for r in rows]

    def claim(
        self,
        study_uid: str,
        *,
        generation: int,
        owner: str,
        lease_seconds: float,
        max_attempts: int | None = None,
    ) -> bool:
        """Atomically take a study for processing; each claim counts one attempt.

        Succeeds for a queued study of the same generation, or for a study already processing
        under the same owner (a redelivered message) or with an expired lease, while it has
        attempts left (``max_attempts``; None: unbounded). The claim holds for
        ``lease_seconds``; the worker renews it with :meth:`renew_lease` while it works.
        """
        now = _now()
        s = studies_table.c
        cond = [
            s.study_instance_uid == study_uid,
            s.generation == generation,
            sa.or_(
                s.state == QUEUED,
                sa.and_(
                    s.state == PROCESSING,
                    sa.or_(s.owner == owner, s.lease_expires_at <= now),
                ),
            ),
        ]
        if max_attempts is not None:
            cond.append(s.attempts < max_attempts)
        with self._tx() as conn:
            res = conn.execute(
                studies_table.update()
                .where(*cond)
                .values(
                    state=PROCESSING,
                    owner=owner,
                    lease_expires_at=now + lease_seconds,
                    attempts=s.attempts + 1,
                    stage=None,
                    updated_at=now,
                    state_changed_at=now,
                )
            )
            if res.rowcount:
                attempts = conn.execute(
                    sa.select(s.attempts).where(s.study_instance_uid == study_uid)
                ).scalar_one()
                of = "" if max_attempts is None else f" of {max_attempts}"
                self._event(
                    conn,
                    study_uid,
                    "processing",
                    f"claimed by task {owner} (attempt {attempts}{of})",
                )
        return bool(res.rowcount)

    def renew_lease(
        self,
        study_uid: str,
        *,
        owner: str,
        lease_seconds: float,
        not_after: float,
        stage: str | None = None,
    ) -> bool:
        """Extend a held claim to ``now + lease_seconds``, never beyond ``not_after``.

        ``not_after`` is the claim time plus the task time limit: a hung worker that keeps
        renewing still lets its claim expire. Records the worker's current ``stage``.
        Returns False once the claim is no longer this owner's.
        """
        now = _now()
        s = studies_table.c
        values: dict[str, Any] = {"lease_expires_at": min(now + lease_seconds, not_after)}
        if stage is not None:
            values["stage"] = stage
        with self._tx() as conn:
            res = conn.execute(
                studies_table.update()
                .where(s.study_instance_uid == study_uid, s.state == PROCESSING, s.owner == owner)
                .values(**values)
            )
        return bool(res.rowcount)

    def record_failed_attempt(
        self, study_uid: str, *, owner: str, stage: str, reason: str, max_attempts: int
    ) -> str:
        """An unexpected error ended this owner's attempt: queue the study again or fail it.

        Returns the new state: ``queued`` while attempts are left (the caller re-sends the
        job), ``failed`` after ``max_attempts`` (the reason is recorded), or the unchanged
        state when the claim is no longer this owner's.
        """
        now = _now()
        s = studies_table.c
        with self._tx() as conn:
            row = conn.execute(
                sa.select(s.state, s.owner, s.attempts).where(s.study_instance_uid == study_uid)
            ).first()
            if row is None:
                return "unknown"
            if row.state != PROCESSING or row.owner != owner:
                return str(row.state)
            detail = f"attempt {row.attempts} of {max_attempts} failed at {reason}"
            if row.attempts >= max_attempts:
                new, values = (
                    FAILED,
                    {"reason": reason, "finished_at": now, "owner": None},
                )
            else:
                new, values = QUEUED, {"queued_at": now, "owner": None}
            conn.execute(
                studies_table.update()
                .where(s.study_instance_uid == study_uid, s.owner == owner)
                .values(
                    state=new,
                    stage=stage,
                    lease_expires_at=None,
                    updated_at=now,
                    state_changed_at=now,
                    **values,
                )
            )
            self._event(conn, study_uid, "attempt-failed", detail)
            if new == FAILED:
                self._event(conn, study_uid, FAILED, reason)
        return new

    def mark_reported(
        self,
        study_uid: str,
        *,
        owner: str,
        result_paths: Sequence[str],
        model_name: str,
        model_version: str,
        findings: str,
        impression: str,
        lesion_count: int,
        destinations: Sequence[str],
        outcome: str | None = None,
    ) -> bool:
        """processing -> sending (or done without destinations); creates pending deliveries.

        ``outcome`` (e.g. ``"abstained: <why>"`` when the model's input gate declined the study)
        is kept in ``reason`` through ``done``, so status, the status page and the audit show it.
        """
        now = _now()
        s = studies_table.c
        with self._tx() as conn:
            res = conn.execute(
                studies_table.update()
                .where(s.study_instance_uid == study_uid, s.state == PROCESSING, s.owner == owner)
                .values(
                    state=SENDING if destinations else DONE,
                    processed_at=now,
                    finished_at=None if destinations else now,
                    model_name=model_name,
                    model_version=model_version,
                    findings=findings,
                    impression=impression,
                    lesion_count=lesion_count,
                    result_paths=json.dumps(list(result_paths)),
                    lease_expires_at=None,
                    reason=outcome,
                    updated_at=now,
                    state_changed_at=now,
                )
            )
            if not res.rowcount:
                return False
            conn.execute(
                deliveries_table.delete().where(deliveries_table.c.study_instance_uid == study_uid)
            )
            for dest in destinations:
                conn.execute(
                    deliveries_table.insert().values(
                        study_instance_uid=study_uid,
                        destination=dest,
                        state=DELIVERY_PENDING,
                        attempts=0,
                        next_attempt_at=now,
                        enqueued_at=now,
                        updated_at=now,
                    )
                )
            self._event(
                conn,
                study_uid,
                "reported",
                f"{model_name} {model_version}: {lesion_count} lesion(s), "
                f"{len(result_paths)} SR object(s)"
                + ("" if destinations else "; no destinations configured")
                + (f"; {outcome}" if outcome else ""),
            )
        return True

    def due_deliveries(
        self, *, requeue_after: float, now: float | None = None
    ) -> list[tuple[str, str]]:
        """Pending deliveries whose next attempt is due and that are not in flight."""
        now = _now() if now is None else now
        d = deliveries_table.c
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(d.study_instance_uid, d.destination).where(
                    d.state == DELIVERY_PENDING,
                    d.next_attempt_at <= now,
                    sa.or_(d.enqueued_at.is_(None), d.enqueued_at <= now - requeue_after),
                )
            ).all()
        return [(r.study_instance_uid, r.destination) for r in rows]

    def mark_delivery_enqueued(self, study_uid: str, destination: str) -> None:
        with self._tx() as conn:
            conn.execute(
                deliveries_table.update()
                .where(
                    deliveries_table.c.study_instance_uid == study_uid,
                    deliveries_table.c.destination == destination,
                )
                .values(enqueued_at=_now())
            )

    def delivery(self, study_uid: str, destination: str) -> Delivery | None:
        with self._tx() as conn:
            row = conn.execute(
                sa.select(deliveries_table).where(
                    deliveries_table.c.study_instance_uid == study_uid,
                    deliveries_table.c.destination == destination,
                )
            ).first()
        return None if row is None else _delivery(row)

    def record_delivery_attempt(
        self,
        study_uid: str,
        destination: str,
        *,
        ok: bool,
        error: str | None,
        max_attempts: int,
        retry_delay: float,
    ) -> str:
        """Record one send attempt; returns the delivery's new state.

        A failed attempt is retried after ``retry_delay * 2**(attempts-1)`` seconds until
        ``max_attempts`` attempts were made; then the delivery, and the study, are failed.
        """
        now = _now()
        d = deliveries_table.c
        with self._tx() as conn:
            row = conn.execute(
                sa.select(deliveries_table).where(
                    d.study_instance_uid == study_uid, d.destination == destination
                )
            ).first()
            if row is None or row.state != DELIVERY_PENDING:
                return "unknown" if row is None else str(row.state)
            attempts = row.attempts + 1
            values: dict[str, Any] = {"attempts": attempts, "updated_at": now, "enqueued_at": None}
            if ok:
                values.update(state=DELIVERY_SENT, sent_at=now, last_error=None)
                self._event(conn, study_uid, "sent", f"{destination}: attempt {attempts} succeeded")
            elif attempts >= max_attempts:
                values.update(state=DELIVERY_FAILED, last_error=error)
                self._event(
                    conn, study_uid, "send-failed", f"{destination}: attempt {attempts}: {error}"
                )
            else:
                delay = retry_delay * 2 ** (attempts - 1)
                values.update(next_attempt_at=now + delay, last_error=error)
                self._event(
                    conn,
                    study_uid,
                    "send-retry",
                    f"{destination}: attempt {attempts} failed ({error}); retry in {delay:g} s",
                )
            conn.execute(
                deliveries_table.update()
                .where(d.study_instance_uid == study_uid, d.destination == destination)
                .values(**values)
            )
            self._settle(conn, study_uid)
            return str(values.get("state", DELIVERY_PENDING))

    def _settle(self, conn: Connection, study_uid: str) -> None:
        """sending -> done when every delivery is sent, -> failed once any has failed for good."""
        states = [
            r.state
            for r in conn.execute(
                sa.select(deliveries_table.c.state).where(
                    deliveries_table.c.study_instance_uid == study_uid
                )
            ).all()
        ]
        if any(st == DELIVERY_PENDING for st in states):
            return
        s = studies_table.c
        ended: dict[str, Any] = {}  # done keeps the report's outcome (an abstention) as reason
        if all(st == DELIVERY_SENT for st in states):
            new, reason = DONE, None
        else:
            failed = [st for st in states if st == DELIVERY_FAILED]
            new, reason = FAILED, f"delivery failed to {len(failed)} destination(s)"
            ended["reason"] = reason
        res = conn.execute(
            studies_table.update()
            .where(s.study_instance_uid == study_uid, s.state == SENDING)
            .values(
                state=new,
                **ended,
                finished_at=_now(),
                updated_at=_now(),
                state_changed_at=_now(),
            )
        )
        if res.rowcount:
            self._event(conn, study_uid, new, reason or "every destination acknowledged")

    def mark_failed(self, study_uid: str, reason: str, *, owner: str | None = None) -> None:
        """processing -> failed with a reason (input rejected, model error)."""
        s = studies_table.c
        with self._tx() as conn:
            cond = [s.study_instance_uid == study_uid, s.state == PROCESSING]
            if owner is not None:
                cond.append(s.owner == owner)
            res = conn.execute(
                studies_table.update()
                .where(*cond)
                .values(
                    state=FAILED,
                    reason=reason,
                    finished_at=_now(),
                    lease_expires_at=None,
                    updated_at=_now(),
                    state_changed_at=_now(),
                )
            )
            if res.rowcount:
                self._event(conn, study_uid, FAILED, reason)

    def reset_for_retry(
        self, study_uid: str, *, reprocess: bool = False, destination: str | None = None
    ) -> str:
        """Make a failed (or, with ``reprocess``, any finished) study go again.

        With SRs already written and not ``reprocess``, failed deliveries go back to pending
        and the study to ``sending``; otherwise the study is queued for a new report.
        ``destination`` re-sends only that destination's failed delivery (not with
        ``reprocess``). Returns the new state.
        """
        if reprocess and destination is not None:
            raise ValueError("reprocess reports the study again for every destination")
        s = studies_table.c
        now = _now()
        with self._tx() as conn:
            row = conn.execute(
                sa.select(studies_table).where(s.study_instance_uid == study_uid)
            ).first()
            if row is None:
                raise KeyError(study_uid)
            if destination is not None:
                return self._retry_delivery(conn, row, destination, now)
            if row.state in (RECEIVING, QUEUED, PROCESSING) or (
                row.state != FAILED and not reprocess
            ):
                return str(row.state)
            has_results = bool(row.result_paths and json.loads(row.result_paths))
            if has_results and not reprocess:
                conn.execute(
                    deliveries_table.update()
                    .where(
                        deliveries_table.c.study_instance_uid == study_uid,
                        deliveries_table.c.state == DELIVERY_FAILED,
                    )
                    .values(
                        state=DELIVERY_PENDING,
                        attempts=0,
                        next_attempt_at=now,
                        enqueued_at=None,
                        updated_at=now,
                    )
                )
                new = SENDING
            else:
                new = RECEIVING
            conn.execute(
                studies_table.update()
                .where(s.study_instance_uid == study_uid)
                .values(
                    state=new,
                    reason=None,
                    owner=None,
                    lease_expires_at=None,
                    finished_at=None,
                    last_received_at=0.0 if new == RECEIVING else row.last_received_at,
                    updated_at=now,
                    state_changed_at=now,
                )
            )
            self._event(
                conn,
                study_uid,
                "retry",
                "operator retry: " + ("re-send reports" if new == SENDING else "reprocess"),
            )
        return new

    def _retry_delivery(self, conn: Connection, row: Any, destination: str, now: float) -> str:
        """One failed delivery back to pending; a failed study back to ``sending``."""
        d = deliveries_table.c
        if row.state not in (FAILED, SENDING):
            return str(row.state)
        reset = conn.execute(
            deliveries_table.update()
            .where(
                d.study_instance_uid == row.study_instance_uid,
                d.destination == destination,
                d.state == DELIVERY_FAILED,
            )
            .values(
                state=DELIVERY_PENDING,
                attempts=0,
                next_attempt_at=now,
                enqueued_at=None,
                updated_at=now,
            )
        )
        if not reset.rowcount:
            return str(row.state)
        if row.state == FAILED:
            conn.execute(
                studies_table.update()
                .where(studies_table.c.study_instance_uid == row.study_instance_uid)
                .values(
                    state=SENDING,
                    reason=None,
                    finished_at=None,
                    updated_at=now,
                    state_changed_at=now,
                )
            )
        self._event(
            conn, row.study_instance_uid, "retry", f"operator retry: re-send to {destination}"
        )
        return SENDING

    def _set_state(
        self, study_uid: str, state: str, reason: str | None, *, from_states: Sequence[str]
    ) -> bool:
        s = studies_table.c
        with self._tx() as conn:
            res = conn.execute(
                studies_table.update()
                .where(s.study_instance_uid == study_uid, s.state.in_(tuple(from_states)))
                .values(
                    state=state,
                    reason=reason,
                    finished_at=_now(),
                    updated_at=_now(),
                    state_changed_at=_now(),
                )
            )
            if res.rowcount:
                self._event(conn, study_uid, state, reason or state)
        return bool(res.rowcount)

    # ------------------------------------------------------------------ views
    def get(self, study_uid: str) -> StudyView | None:
        views = self._views(studies_table.c.study_instance_uid == study_uid, limit=1)
        return views[0] if views else None

    def recent(self, limit: int = 50, *, state: str | None = None) -> list[StudyView]:
        cond = studies_table.c.state == state if state else sa.true()
        return self._views(cond, limit=limit)

    def stuck(
        self, *, older_than: float, now: float | None = None, limit: int = 100
    ) -> list[StudyView]:
        """Unfinished studies that entered their state more than ``older_than`` seconds ago."""
        now = _now() if now is None else now
        s = studies_table.c
        since = sa.func.coalesce(s.state_changed_at, s.updated_at)
        return sorted(
            self._views(
                sa.and_(s.state.in_(UNFINISHED_STATES), since <= now - older_than), limit=limit
            ),
            key=lambda v: v.state_since or 0.0,
        )

    def oldest_unfinished_age(self, now: float | None = None) -> float:
        """Seconds since the oldest unfinished study entered its state (0 when none)."""
        now = _now() if now is None else now
        s = studies_table.c
        since = sa.func.coalesce(s.state_changed_at, s.updated_at)
        with self._tx() as conn:
            oldest = conn.execute(
                sa.select(sa.func.min(since)).where(s.state.in_(UNFINISHED_STATES))
            ).scalar_one()
        return 0.0 if oldest is None else max(0.0, now - float(oldest))

    def count_by_state(self) -> dict[str, int]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(studies_table.c.state, sa.func.count()).group_by(studies_table.c.state)
            ).all()
        counts = dict.fromkeys(STUDY_STATES, 0)
        counts.update({r[0]: int(r[1]) for r in rows})
        return counts

    def _views(self, cond: Any, *, limit: int) -> list[StudyView]:
        s = studies_table.c
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(studies_table)
                .where(cond)
                .order_by(s.last_received_at.desc())
                .limit(limit)
            ).all()
            out = []
            for r in rows:
                uid = r.study_instance_uid
                n = conn.execute(
                    sa.select(sa.func.count()).where(instances_table.c.study_instance_uid == uid)
                ).scalar_one()
                dels = conn.execute(
                    sa.select(deliveries_table)
                    .where(deliveries_table.c.study_instance_uid == uid)
                    .order_by(deliveries_table.c.destination)
                ).all()
                out.append(
                    StudyView(
                        study_instance_uid=uid,
                        state=r.state,
                        reason=r.reason,
                        generation=r.generation,
                        first_received_at=r.first_received_at,
                        last_received_at=r.last_received_at,
                        queued_at=r.queued_at,
                        processed_at=r.processed_at,
                        finished_at=r.finished_at,
                        model_name=r.model_name,
                        model_version=r.model_version,
                        findings=r.findings,
                        impression=r.impression,
                        lesion_count=r.lesion_count,
                        result_paths=tuple(json.loads(r.result_paths or "[]")),
                        instance_count=int(n),
                        deliveries=tuple(_delivery(d) for d in dels),
                        attempts=int(r.attempts or 0),
                        stage=r.stage,
                        state_since=r.state_changed_at or r.updated_at,
                    )
                )
        return out


def _delivery(row: Any) -> Delivery:
    return Delivery(
        destination=row.destination,
        state=row.state,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_error=row.last_error,
        sent_at=row.sent_at,
    )


def make_engine(url: str) -> Engine:
    """The engine of a study database URL (SQLite: WAL, busy timeout, BEGIN IMMEDIATE)."""
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, pool_pre_ping=True
        )

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" below open the transaction: BEGIN IMMEDIATE takes the
            # write lock up front, so read-then-write sequences from several threads and
            # processes wait for each other (busy_timeout) instead of failing.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(url, pool_pre_ping=True)
