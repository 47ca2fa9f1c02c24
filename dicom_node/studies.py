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

Several nodes (PostgreSQL): every node runs the same receivers and the same assembler on one
database. Each state change is a conditional update, so whichever node's update wins does the
work (queues the job, re-sends it, hands a delivery to the queue) and the others find nothing to
do. Each node records a heartbeat (``nodes``) and which of its associations are open for which
study (``node_associations``); a surviving node expires the open associations of a node that
stopped beating (:meth:`StudyStore.expire_silent_nodes`), so a study is never held by a dead
node. Duties that must run on one node at a time (retention, the spool check) take a short lease
(:meth:`StudyStore.hold_duty`).

Database outages: a restart or failover of the database raises connection errors. Every public
method retries them with a short backoff for ``retry_seconds`` (a transaction that failed was
rolled back, so running it again is safe), then raises
:class:`~dicom_node.errors.DatabaseUnavailable`. Callers that must answer quickly (the
receivers, the probes) narrow the budget with :meth:`StudyStore.retry_budget`.

Times are stored as UTC seconds since the epoch (floats), so SQLite and PostgreSQL behave the
same."""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from d2r_core.errors import ConfigError
from dicom_node import schema
from dicom_node.errors import DatabaseUnavailable

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

    def to_row(self) -> dict[str, Any]:
        row = {f: getattr(self, f) for f in self.__dataclass_fields__}
        row["received_at"] = self.received_at.timestamp()
        row["received_by"] = self.received_by or None
        return row

    @classmethod
    def from_row(cls, row: Any) -> InstanceRecord:
        m = row._mapping
        return cls(
            **{
                f: m[f] for f in cls.__dataclass_fields__ if f not in ("received_at", "received_by")
            },
            received_at=datetime.fromtimestamp(m["received_at"], UTC),
            received_by=m["received_by"] or "",
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


def _now() -> float:
    return time.time()


_P = ParamSpec("_P")
_R = TypeVar("_R")
#: the retry budget of the calls in this context (None: the store's ``retry_seconds``)
_BUDGET: ContextVar[float | None] = ContextVar("d2r_db_retry_budget", default=None)
#: set while a public method runs, so that the methods it calls do not retry on their own
_RETRYING: ContextVar[bool] = ContextVar("d2r_db_retrying", default=False)
#: SQLSTATE classes of errors a new transaction may not meet: connection exception (08),
#: insufficient resources (53, e.g. too many connections), operator intervention (57, e.g. the
#: server shutting down or starting up), transaction rollback (40: serialization, deadlock)
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57")


def transient_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is (momentarily) unreachable or busy, not that the
    statement is wrong: the transaction was rolled back and may simply run again."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return False
    orig = exc.orig
    if type(orig).__module__.startswith("sqlite3"):
        return "locked" in str(orig) or "busy" in str(orig)
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is None:  # no answer from a server at all: refused, reset, closed
        return True
    return str(sqlstate)[:2] in _TRANSIENT_SQLSTATE_CLASSES


def _brief(exc: BaseException) -> str:
    """One line naming a database error (no statement, no parameters)."""
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {first[:200]}"


def _retrying(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a :class:`StudyStore` method again while the database is unreachable, within the
    budget; then raise :class:`DatabaseUnavailable`."""

    @functools.wraps(method)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if _RETRYING.get():
            return method(*args, **kwargs)
        store = args[0]
        budget = _BUDGET.get()
        if budget is None:
            budget = float(getattr(store, "retry_seconds", 0.0))
        deadline = time.monotonic() + budget
        delay = 0.1
        token = _RETRYING.set(True)
        try:
            while True:
                try:
                    return method(*args, **kwargs)
                except sa.exc.DBAPIError as exc:
                    if not transient_database_error(exc):
                        raise
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise DatabaseUnavailable(
                            f"the study database did not answer within {budget:g} s ({_brief(exc)})"
                        ) from exc
                    logger.warning(
                        "study database unreachable (%s); retrying %s for up to %.0f s",
                        _brief(exc),
                        method.__name__,
                        left,
                    )
                    time.sleep(min(delay, left))
                    delay = min(delay * 2, 2.0)
        finally:
            _RETRYING.reset(token)

    return run


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
    retry_seconds : float
        How long each call retries while the database is unreachable before it raises
        :class:`~dicom_node.errors.DatabaseUnavailable` (``D2R_DB_RETRY_SECONDS``).
    """

    def __init__(self, url: str, *, auto_upgrade: bool = False, retry_seconds: float = 0.0) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError("url must be a non-empty SQLAlchemy URL")
        self.url = url
        self.retry_seconds = retry_seconds
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

    @staticmethod
    @contextmanager
    def retry_budget(seconds: float) -> Iterator[None]:
        """Calls in this block retry an unreachable database for ``seconds`` at most (0: once)."""
        token = _BUDGET.set(max(0.0, seconds))
        try:
            yield
        finally:
            _BUDGET.reset(token)

    # ----------------------------------------------------------------- events
    def _event(self, conn: Connection, study_uid: str | None, kind: str, detail: str) -> None:
        conn.execute(
            events_table.insert().values(
                study_instance_uid=study_uid, at=_now(), kind=kind, detail=detail
            )
        )

    @_retrying
    def add_event(self, study_uid: str | None, kind: str, detail: str) -> None:
        """Append one event (no PHI: UIDs, states and reasons only)."""
        with self._tx() as conn:
            self._event(conn, study_uid, kind, detail)

    @_retrying
    def events(self, study_uid: str) -> list[Event]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(events_table.c.at, events_table.c.kind, events_table.c.detail)
                .where(events_table.c.study_instance_uid == study_uid)
                .order_by(events_table.c.id)
            ).all()
        return [Event(at=r.at, kind=r.kind, detail=r.detail) for r in rows]

    # -------------------------------------------------------------- node side
    @_retrying
    def record_instance(self, record: InstanceRecord, *, outcome: str) -> str:
        """Record a durably spooled instance; returns the outcome recorded.

        ``outcome`` is the spool's: stored, duplicate or conflict. The spool compares with the
        files it holds, the database with what was acknowledged: a duplicate or a conflict of an
        instance without a row (its first copy was spooled while the database was unreachable,
        and refused) is recorded as ``stored``, pointing at the copy this request brought. So a
        duplicate is only ever answered against a recorded instance.
        """
        if outcome not in ("stored", "duplicate", "conflict"):
            raise ValueError(f"outcome must be stored, duplicate or conflict, not {outcome!r}")
        for attempt in range(3):
            try:
                return self._record_instance(record, outcome)
            except sa.exc.IntegrityError:
                # Two associations delivered the first instances of one study at once, or the
                # same instance twice: the loser re-reads and takes the other branch.
                if attempt == 2:
                    raise
                if outcome == "stored" and self._has_instance(record.sop_instance_uid):
                    outcome = "duplicate"
        raise AssertionError("unreachable")

    def _has_instance(self, sop_uid: str) -> bool:
        with self._tx() as conn:
            row = conn.execute(
                sa.select(instances_table.c.sop_instance_uid).where(
                    instances_table.c.sop_instance_uid == sop_uid
                )
            ).first()
        return row is not None

    def _record_instance(self, record: InstanceRecord, outcome: str) -> str:
        now = record.received_at.timestamp()
        study_uid = record.study_instance_uid
        with self._tx() as conn:
            if outcome != "stored":
                column = "duplicates" if outcome == "duplicate" else "conflicts"
                counted = conn.execute(
                    instances_table.update()
                    .where(instances_table.c.sop_instance_uid == record.sop_instance_uid)
                    .values({column: instances_table.c[column] + 1})
                )
                if counted.rowcount:
                    self._event(
                        conn,
                        study_uid,
                        outcome,
                        f"instance {record.sop_instance_uid}: "
                        + (
                            "same bytes received again; kept one copy"
                            if outcome == "duplicate"
                            else "different bytes under the same SOP Instance UID; first copy "
                            f"kept, new copy quarantined at {record.path}"
                        ),
                    )
                    return outcome
                self._event(
                    conn,
                    study_uid,
                    "recorded-late",
                    f"instance {record.sop_instance_uid}: its file was in the spool but never "
                    "recorded (the earlier request was refused); recorded now",
                )
                outcome = "stored"
            conn.execute(instances_table.insert().values(**record.to_row()))
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
                return outcome
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
        return outcome

    @_retrying
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

    @_retrying
    def rejections(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(rejections_table).order_by(rejections_table.c.id.desc()).limit(limit)
            ).all()
        return [dict(r._mapping) for r in rows]

    @_retrying
    def instances(self, study_uid: str) -> list[InstanceRecord]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(instances_table)
                .where(instances_table.c.study_instance_uid == study_uid)
                .order_by(instances_table.c.received_at)
            ).all()
        return [InstanceRecord.from_row(r) for r in rows]

    @_retrying
    def open_association(self, study_uid: str, *, node: str = "") -> None:
        """An association of ``node`` brought its first instance of ``study_uid`` (after it was
        recorded)."""
        s = studies_table.c
        a = node_associations_table.c
        with self._tx() as conn:
            counted = conn.execute(
                studies_table.update()
                .where(s.study_instance_uid == study_uid)
                .values(open_associations=s.open_associations + 1)
            )
            if not counted.rowcount:
                return
            held = conn.execute(
                node_associations_table.update()
                .where(a.node == node, a.study_instance_uid == study_uid)
                .values(open=a.open + 1)
            )
            if not held.rowcount:  # the study row is locked: no other insert can race this one
                conn.execute(
                    node_associations_table.insert().values(
                        node=node, study_instance_uid=study_uid, open=1
                    )
                )

    @_retrying
    def close_association(
        self, study_uids: Sequence[str], *, released: bool, node: str = ""
    ) -> None:
        """An association of ``node`` that brought instances of ``study_uids`` ended.

        ``released``: it ended with an A-RELEASE. Then each study whose last open association
        this was records ``released_at`` (the early-completion rule); an aborted association
        only stops counting, leaving its studies to the quiet period. An association whose
        count a surviving node already expired (:meth:`expire_silent_nodes`) is not counted
        twice.
        """
        if not study_uids:
            return
        now = _now()
        with self._tx() as conn:
            for uid in study_uids:
                self._close_one(conn, uid, node, 1, released=released, now=now)

    def _close_one(
        self, conn: Connection, uid: str, node: str, count: int, *, released: bool, now: float
    ) -> int:
        """Stop counting up to ``count`` open associations of ``node`` for ``uid``; returns how
        many were open."""
        s = studies_table.c
        a = node_associations_table.c
        conn.execute(
            sa.select(s.study_instance_uid).where(s.study_instance_uid == uid).with_for_update()
        )
        held = conn.execute(
            sa.select(a.open).where(a.node == node, a.study_instance_uid == uid)
        ).scalar_one_or_none()
        closing = min(count, int(held or 0))
        if closing <= 0:
            return 0
        if closing >= int(held or 0):
            conn.execute(
                node_associations_table.delete().where(a.node == node, a.study_instance_uid == uid)
            )
        else:
            conn.execute(
                node_associations_table.update()
                .where(a.node == node, a.study_instance_uid == uid)
                .values(open=a.open - closing)
            )
        values: dict[str, Any] = {
            "open_associations": sa.case(
                (s.open_associations > closing, s.open_associations - closing), else_=0
            )
        }
        if released:
            values["released_at"] = sa.case(
                (s.open_associations <= closing, now), else_=s.released_at
            )
        conn.execute(studies_table.update().where(s.study_instance_uid == uid).values(**values))
        return closing

    # ------------------------------------------------------------------ nodes
    @_retrying
    def register_node(self, name: str, *, host: str, pid: int) -> list[str]:
        """Record that node ``name`` started; returns the studies whose open associations its
        previous run left (a crash), now expired."""
        now = _now()
        n = nodes_table.c
        with self._tx() as conn:
            seen = conn.execute(
                nodes_table.update()
                .where(n.name == name)
                .values(host=host, pid=pid, started_at=now, heartbeat_at=now)
            )
            if not seen.rowcount:
                conn.execute(
                    nodes_table.insert().values(
                        name=name, host=host, pid=pid, started_at=now, heartbeat_at=now
                    )
                )
            return self._expire_node(conn, name, why="its node restarted", now=now)

    @_retrying
    def heartbeat(self, name: str) -> bool:
        """Record that node ``name`` is alive; False when its row is gone (it re-registers)."""
        with self._tx() as conn:
            res = conn.execute(
                nodes_table.update().where(nodes_table.c.name == name).values(heartbeat_at=_now())
            )
        return bool(res.rowcount)

    @_retrying
    def expire_silent_nodes(
        self, *, expire_seconds: float, now: float | None = None
    ) -> dict[str, list[str]]:
        """Stop counting the open associations of every node silent for ``expire_seconds``.

        Returns {node: studies}. An expired association counts as aborted: its studies complete
        by their quiet period, or by the release rule of a later association.
        """
        now = _now() if now is None else now
        n = nodes_table.c
        a = node_associations_table.c
        expired: dict[str, list[str]] = {}
        with self._tx() as conn:
            silent = conn.execute(
                sa.select(n.name).where(
                    n.heartbeat_at <= now - expire_seconds,
                    sa.exists(sa.select(a.node).where(a.node == n.name)),
                )
            ).all()
            for row in silent:
                studies = self._expire_node(
                    conn,
                    str(row.name),
                    why=f"its node sent no heartbeat for {expire_seconds:g} s",
                    now=now,
                )
                if studies:
                    expired[str(row.name)] = studies
        return expired

    def _expire_node(self, conn: Connection, name: str, *, why: str, now: float) -> list[str]:
        a = node_associations_table.c
        rows = conn.execute(
            sa.select(a.study_instance_uid, a.open)
            .where(a.node == name)
            .order_by(a.study_instance_uid)
        ).all()
        studies = []
        for row in rows:
            uid = str(row.study_instance_uid)
            if self._close_one(conn, uid, name, int(row.open), released=False, now=now):
                self._event(
                    conn,
                    uid,
                    "association-expired",
                    f"{int(row.open)} open association(s) on node {name} expired: {why}",
                )
                studies.append(uid)
        return studies

    @_retrying
    def nodes(self) -> list[NodeView]:
        """Every node that ever recorded a heartbeat, with its open associations."""
        n = nodes_table.c
        a = node_associations_table.c
        opened = (
            sa.select(sa.func.coalesce(sa.func.sum(a.open), 0))
            .where(a.node == n.name)
            .scalar_subquery()
        )
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(n.name, n.host, n.pid, n.started_at, n.heartbeat_at, opened).order_by(
                    n.name
                )
            ).all()
        return [
            NodeView(
                name=str(r[0]),
                host=str(r[1]),
                pid=int(r[2]),
                started_at=float(r[3]),
                heartbeat_at=float(r[4]),
                open_associations=int(r[5]),
            )
            for r in rows
        ]

    @_retrying
    def hold_duty(self, duty: str, holder: str, *, seconds: float) -> bool:
        """Take or renew the lease on ``duty`` for ``seconds``; False while another holds it."""
        now = _now()
        d = duties_table.c
        with self._tx() as conn:
            res = conn.execute(
                duties_table.update()
                .where(d.name == duty, sa.or_(d.holder == holder, d.expires_at <= now))
                .values(holder=holder, expires_at=now + seconds)
            )
            if res.rowcount:
                return True
            if conn.execute(sa.select(d.name).where(d.name == duty)).first() is not None:
                return False
        try:
            with self._tx() as conn:
                conn.execute(
                    duties_table.insert().values(name=duty, holder=holder, expires_at=now + seconds)
                )
        except sa.exc.IntegrityError:  # another node created it first
            return False
        return True

    @_retrying
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

    @_retrying
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

    @_retrying
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

    @_retrying
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

    @_retrying
    def mark_skipped(self, study_uid: str, reason: str) -> None:
        self._set_state(study_uid, SKIPPED, reason, from_states=(RECEIVING,))

    @_retrying
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

    @_retrying
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

    @_retrying
    def touch_queued(
        self,
        study_uid: str,
        *,
        detail: str,
        generation: int | None = None,
        requeue_after: float | None = None,
        now: float | None = None,
    ) -> bool:
        """Record a re-send of a study's job; expired processing leases go back to queued.

        With ``generation``, only while the study is still a candidate of
        :meth:`requeue_candidates` (same generation, lease expired or, with ``requeue_after``,
        queued that long): of several nodes reconciling at once, one wins and re-sends the job.
        Returns whether this call re-queued it.
        """
        s = studies_table.c
        now = _now() if now is None else now
        cond: list[Any] = [s.study_instance_uid == study_uid]
        if generation is None:
            cond.append(s.state.in_((QUEUED, PROCESSING)))
        else:
            due = [sa.and_(s.state == PROCESSING, s.lease_expires_at <= now)]
            if requeue_after is not None and requeue_after != float("inf"):
                due.append(sa.and_(s.state == QUEUED, s.queued_at <= now - requeue_after))
            cond += [s.generation == generation, sa.or_(*due)]
        with self._tx() as conn:
            res = conn.execute(
                studies_table.update()
                .where(*cond)
                .values(
                    state=QUEUED,
                    queued_at=now,
                    owner=None,
                    lease_expires_at=None,
                    state_changed_at=sa.case(
                        (s.state == PROCESSING, now), else_=s.state_changed_at
                    ),
                )
            )
            if res.rowcount:
                self._event(conn, study_uid, "requeued", detail)
        return bool(res.rowcount)

    # ------------------------------------------------------------ worker side
    @_retrying
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

    @_retrying
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
        under the same owner (a redelivered message, which continues its attempt) or with an
        expired lease, while it has attempts left (``max_attempts``; None: unbounded). The claim
        holds for ``lease_seconds``; the worker renews it with :meth:`renew_lease` while it
        works.
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
            cond.append(
                sa.or_(s.attempts < max_attempts, sa.and_(s.state == PROCESSING, s.owner == owner))
            )
        with self._tx() as conn:
            res = conn.execute(
                studies_table.update()
                .where(*cond)
                .values(
                    state=PROCESSING,
                    owner=owner,
                    lease_expires_at=now + lease_seconds,
                    # the same job again (redelivered, or retried after a database outage)
                    # continues its attempt; anything else is a new one
                    attempts=sa.case(
                        (sa.and_(s.state == PROCESSING, s.owner == owner), s.attempts),
                        else_=s.attempts + 1,
                    ),
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

    @_retrying
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

    @_retrying
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

    @_retrying
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

    @_retrying
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

    @_retrying
    def mark_delivery_enqueued(
        self,
        study_uid: str,
        destination: str,
        *,
        requeue_after: float | None = None,
        now: float | None = None,
    ) -> bool:
        """Note that a delivery's attempt was handed to the queue; returns whether this call did.

        With ``requeue_after``, only while it is still due (:meth:`due_deliveries`): of several
        nodes handing out due deliveries at once, one wins.
        """
        now = _now() if now is None else now
        d = deliveries_table.c
        cond: list[Any] = [d.study_instance_uid == study_uid, d.destination == destination]
        if requeue_after is not None:
            cond += [
                d.state == DELIVERY_PENDING,
                d.next_attempt_at <= now,
                sa.or_(d.enqueued_at.is_(None), d.enqueued_at <= now - requeue_after),
            ]
        with self._tx() as conn:
            res = conn.execute(deliveries_table.update().where(*cond).values(enqueued_at=now))
        return bool(res.rowcount)

    @_retrying
    def delivery(self, study_uid: str, destination: str) -> Delivery | None:
        with self._tx() as conn:
            row = conn.execute(
                sa.select(deliveries_table).where(
                    deliveries_table.c.study_instance_uid == study_uid,
                    deliveries_table.c.destination == destination,
                )
            ).first()
        return None if row is None else _delivery(row)

    @_retrying
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

    @_retrying
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

    @_retrying
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
    @_retrying
    def get(self, study_uid: str) -> StudyView | None:
        views = self._views(studies_table.c.study_instance_uid == study_uid, limit=1)
        return views[0] if views else None

    @_retrying
    def recent(self, limit: int = 50, *, state: str | None = None) -> list[StudyView]:
        cond = studies_table.c.state == state if state else sa.true()
        return self._views(cond, limit=limit)

    @_retrying
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

    @_retrying
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

    @_retrying
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
                i = instances_table.c
                by_node = conn.execute(
                    sa.select(i.received_by, sa.func.count())
                    .where(i.study_instance_uid == uid)
                    .group_by(i.received_by)
                    .order_by(i.received_by)
                ).all()
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
                        received_by=tuple((str(b[0] or ""), int(b[1])) for b in by_node),
                    )
                )
        return out


class NodeRecorder:
    """The study database as one node's receivers (C-STORE, STOW-RS) use it.

    Every instance and association is recorded under the node's name, and each call waits for
    an unreachable database ``wait_seconds`` at most before it raises
    :class:`~dicom_node.errors.DatabaseUnavailable`: the receiver then answers a failure status
    rather than keep the sender waiting. The end of an association is not on the answer's path
    and retries for the store's whole budget.
    """

    def __init__(self, store: StudyStore, node: str, *, wait_seconds: float) -> None:
        self.store = store
        self.node = node
        self.wait_seconds = wait_seconds

    def record_instance(self, record: InstanceRecord, *, outcome: str) -> str:
        with self.store.retry_budget(self.wait_seconds):
            return self.store.record_instance(
                replace(record, received_by=self.node), outcome=outcome
            )

    def record_rejection(
        self,
        *,
        sop_instance_uid: str | None,
        study_instance_uid: str | None,
        reason: str,
        calling_ae_title: str,
    ) -> None:
        with self.store.retry_budget(self.wait_seconds):
            self.store.record_rejection(
                sop_instance_uid=sop_instance_uid,
                study_instance_uid=study_instance_uid,
                reason=reason,
                calling_ae_title=calling_ae_title,
            )

    def open_association(self, study_uid: str) -> None:
        with self.store.retry_budget(self.wait_seconds):
            self.store.open_association(study_uid, node=self.node)

    def close_association(self, study_uids: Sequence[str], *, released: bool) -> None:
        self.store.close_association(study_uids, released=released, node=self.node)


def _delivery(row: Any) -> Delivery:
    return Delivery(
        destination=row.destination,
        state=row.state,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_error=row.last_error,
        sent_at=row.sent_at,
    )


def hold_single_node_lock(url: str) -> IO[bytes] | None:
    """Hold, for this process's life, the lock that makes a SQLite database one node's alone.

    Several nodes share a PostgreSQL database; a SQLite file is one host's, and the assembler
    of a second node on it would compete for its write lock. Returns the open lock file (keep
    it), or None for other databases.

    Raises
    ------
    ConfigError
        Naming ``D2R_DATABASE_URL``, when another running node holds the lock.
    """
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    if parsed.database == ":memory:":
        return None
    path = Path(f"{parsed.database}.node-lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "ab")  # noqa: SIM115 - held open for the life of the process
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(
            "D2R_DATABASE_URL",
            f"another d2r node uses the SQLite database {parsed.database}; several nodes need "
            "one PostgreSQL database (postgresql+psycopg://...)",
        ) from None
    return handle


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
    connect_args: dict[str, Any] = {}
    if sa.engine.make_url(url).get_backend_name() == "postgresql":
        # a database host that does not answer at all fails a connection attempt in seconds
        connect_args["connect_timeout"] = 5
    return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
