"""Deliveries: one row per study and destination, from pending to sent or failed."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa

from studydb.engine import Database, retrying
from studydb.ordering import rank_of
from studydb.records import (
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    DELIVERY_SENT,
    Delivery,
)
from studydb.tables import (
    deliveries_table,
    studies_table,
)
from studydb.transitions import delivery_view, now_seconds, settle_study, write_event

logger = logging.getLogger(__name__)

__all__ = ["Deliveries"]


class Deliveries(Database):
    """Deliveries of a study's results to each destination, and their attempts."""

    @retrying
    def due_deliveries(
        self, *, requeue_after: float, now: float | None = None
    ) -> list[tuple[str, str]]:
        """Pending deliveries whose next attempt is due and that are not in flight: those of
        the highest study priority first, the longest due first within one priority."""
        now = now_seconds() if now is None else now
        d = deliveries_table.c
        s = studies_table.c
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(d.study_instance_uid, d.destination)
                .select_from(
                    deliveries_table.outerjoin(
                        studies_table, s.study_instance_uid == d.study_instance_uid
                    )
                )
                .where(
                    d.state == DELIVERY_PENDING,
                    d.next_attempt_at <= now,
                    sa.or_(d.enqueued_at.is_(None), d.enqueued_at <= now - requeue_after),
                )
                .order_by(rank_of(s.priority), d.next_attempt_at, d.study_instance_uid)
            ).all()
        return [(r.study_instance_uid, r.destination) for r in rows]

    @retrying
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
        now = now_seconds() if now is None else now
        d = deliveries_table.c
        cond: list[Any] = [d.study_instance_uid == study_uid, d.destination == destination]
        if requeue_after is not None:
            cond += [
                d.state == DELIVERY_PENDING,
                d.next_attempt_at <= now,
                sa.or_(d.enqueued_at.is_(None), d.enqueued_at <= now - requeue_after),
            ]
        with self.transaction() as conn:
            res = conn.execute(deliveries_table.update().where(*cond).values(enqueued_at=now))
        return bool(res.rowcount)

    @retrying
    def delivery(self, study_uid: str, destination: str) -> Delivery | None:
        with self.transaction() as conn:
            row = conn.execute(
                sa.select(deliveries_table).where(
                    deliveries_table.c.study_instance_uid == study_uid,
                    deliveries_table.c.destination == destination,
                )
            ).first()
        return None if row is None else delivery_view(row)

    @retrying
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
        now = now_seconds()
        d = deliveries_table.c
        with self.transaction() as conn:
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
                write_event(conn, study_uid, "sent", f"{destination}: attempt {attempts} succeeded")
            elif attempts >= max_attempts:
                values.update(state=DELIVERY_FAILED, last_error=error)
                write_event(
                    conn, study_uid, "send-failed", f"{destination}: attempt {attempts}: {error}"
                )
            else:
                delay = retry_delay * 2 ** (attempts - 1)
                values.update(next_attempt_at=now + delay, last_error=error)
                write_event(
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
            settle_study(conn, study_uid)
            return str(values.get("state", DELIVERY_PENDING))
