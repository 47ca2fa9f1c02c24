"""What the receivers record: instances, rejections, the associations that bring them, and the
nodes that run the receivers (membership, heartbeats, duties)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from d2r_core.priority import Priority
from studydb.engine import Database, retrying
from studydb.records import (
    PRIORITY_EVENT,
    QUEUED,
    RECEIVING,
    SKIPPED,
    InstanceRecord,
)
from studydb.tables import (
    duties_table,
    instances_table,
    node_associations_table,
    nodes_table,
    rejections_table,
    studies_table,
)
from studydb.transitions import now_seconds, write_event

logger = logging.getLogger(__name__)

__all__ = ["IngestBook", "NodeRecorder"]


class IngestBook(Database):
    """Ingest bookkeeping: instances, rejections, associations, nodes and duties."""

    @retrying
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
        with self.transaction() as conn:
            row = conn.execute(
                sa.select(instances_table.c.sop_instance_uid).where(
                    instances_table.c.sop_instance_uid == sop_uid
                )
            ).first()
        return row is not None

    # Longer than a screen: one transaction must decide stored, duplicate or conflict and re-open
    # the study; split, the steps would need the same open connection and row state passed between
    # them
    def _record_instance(self, record: InstanceRecord, outcome: str) -> str:
        now = record.received_at.timestamp()
        study_uid = record.study_instance_uid
        with self.transaction() as conn:
            if outcome != "stored":
                column = "duplicates" if outcome == "duplicate" else "conflicts"
                counted = conn.execute(
                    instances_table.update()
                    .where(instances_table.c.sop_instance_uid == record.sop_instance_uid)
                    .values({column: instances_table.c[column] + 1})
                )
                if counted.rowcount:
                    write_event(
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
                write_event(
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
            decision = record.priority
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
                        priority=str(decision.priority if decision else Priority.ROUTINE),
                    )
                )
                write_event(conn, study_uid, "received", "first instance received")
                if decision is not None:
                    write_event(conn, study_uid, PRIORITY_EVENT, decision.describe())
                return outcome
            values: dict[str, Any] = {
                "last_received_at": max(now, study.last_received_at),
                "updated_at": now_seconds(),
            }
            if decision is not None and decision.priority.higher_than(study.priority):
                values["priority"] = str(decision.priority)
                write_event(
                    conn,
                    study_uid,
                    PRIORITY_EVENT,
                    f"raised from {study.priority} to {decision.describe()} by instance "
                    f"{record.sop_instance_uid}",
                )
            if study.state in (QUEUED, SKIPPED):
                values.update(
                    state=RECEIVING, reason=None, queued_at=None, state_changed_at=now_seconds()
                )
                write_event(
                    conn,
                    study_uid,
                    "reopened",
                    f"instance {record.sop_instance_uid} arrived while {study.state}; "
                    "quiet period restarted",
                )
            elif study.state != RECEIVING:
                write_event(
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

    @retrying
    def record_rejection(
        self,
        *,
        sop_instance_uid: str | None,
        study_instance_uid: str | None,
        reason: str,
        calling_ae_title: str,
    ) -> None:
        """Record an instance that was refused with a failure status."""
        with self.transaction() as conn:
            conn.execute(
                rejections_table.insert().values(
                    sop_instance_uid=sop_instance_uid,
                    study_instance_uid=study_instance_uid,
                    calling_ae_title=calling_ae_title,
                    reason=reason,
                    at=now_seconds(),
                )
            )

    @retrying
    def open_association(self, study_uid: str, *, node: str = "") -> None:
        """An association of ``node`` brought its first instance of ``study_uid`` (after it was
        recorded)."""
        s = studies_table.c
        a = node_associations_table.c
        with self.transaction() as conn:
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

    @retrying
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
        now = now_seconds()
        with self.transaction() as conn:
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

    @retrying
    def register_node(self, name: str, *, host: str, pid: int) -> list[str]:
        """Record that node ``name`` started; returns the studies whose open associations its
        previous run left (a crash), now expired."""
        now = now_seconds()
        n = nodes_table.c
        with self.transaction() as conn:
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

    @retrying
    def heartbeat(self, name: str) -> bool:
        """Record that node ``name`` is alive; False when its row is gone (it re-registers)."""
        with self.transaction() as conn:
            res = conn.execute(
                nodes_table.update()
                .where(nodes_table.c.name == name)
                .values(heartbeat_at=now_seconds())
            )
        return bool(res.rowcount)

    @retrying
    def expire_silent_nodes(
        self, *, expire_seconds: float, now: float | None = None
    ) -> dict[str, list[str]]:
        """Stop counting the open associations of every node silent for ``expire_seconds``.

        Returns {node: studies}. An expired association counts as aborted: its studies complete
        by their quiet period, or by the release rule of a later association.
        """
        now = now_seconds() if now is None else now
        n = nodes_table.c
        a = node_associations_table.c
        expired: dict[str, list[str]] = {}
        with self.transaction() as conn:
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
                write_event(
                    conn,
                    uid,
                    "association-expired",
                    f"{int(row.open)} open association(s) on node {name} expired: {why}",
                )
                studies.append(uid)
        return studies

    @retrying
    def hold_duty(self, duty: str, holder: str, *, seconds: float) -> bool:
        """Take or renew the lease on ``duty`` for ``seconds``; False while another holds it."""
        now = now_seconds()
        d = duties_table.c
        with self.transaction() as conn:
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
            with self.transaction() as conn:
                conn.execute(
                    duties_table.insert().values(name=duty, holder=holder, expires_at=now + seconds)
                )
        except sa.exc.IntegrityError:  # another node created it first
            return False
        return True


class NodeRecorder:
    """The study database as one node's receivers (C-STORE, STOW-RS) use it.

    Every instance and association is recorded under the node's name, and each call waits for
    an unreachable database ``wait_seconds`` at most before it raises
    :class:`~studydb.errors.DatabaseUnavailable`: the receiver then answers a failure status
    rather than keep the sender waiting. The end of an association is not on the answer's path
    and retries for the store's whole budget.
    """

    def __init__(self, store: IngestBook, node: str, *, wait_seconds: float) -> None:
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
