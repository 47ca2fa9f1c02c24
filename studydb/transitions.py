"""Steps inside one open transaction, shared by the roles of the study database.

Each takes the :class:`~sqlalchemy.engine.Connection` of the caller's transaction, so a state
change and its event commit together.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from studydb.records import (
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    DELIVERY_SENT,
    DONE,
    FAILED,
    SENDING,
    Delivery,
)
from studydb.tables import deliveries_table, events_table, studies_table

__all__ = ["delivery_view", "now_seconds", "retry_delivery", "settle_study", "write_event"]


def now_seconds() -> float:
    """Seconds since the epoch (UTC), as every time in the study database is stored."""
    return time.time()


def write_event(conn: Connection, study_uid: str | None, kind: str, detail: str) -> None:
    """Append one event to the study's history (no PHI: UIDs, states and reasons only)."""
    conn.execute(
        events_table.insert().values(
            study_instance_uid=study_uid, at=now_seconds(), kind=kind, detail=detail
        )
    )


def settle_study(conn: Connection, study_uid: str) -> None:
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
            finished_at=now_seconds(),
            updated_at=now_seconds(),
            state_changed_at=now_seconds(),
        )
    )
    if res.rowcount:
        write_event(conn, study_uid, new, reason or "every destination acknowledged")


def retry_delivery(conn: Connection, row: Any, destination: str, now: float) -> str:
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
    write_event(conn, row.study_instance_uid, "retry", f"operator retry: re-send to {destination}")
    return SENDING


def delivery_view(row: Any) -> Delivery:
    """A ``deliveries`` row as a :class:`~studydb.records.Delivery`."""
    return Delivery(
        destination=row.destination,
        state=row.state,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_error=row.last_error,
        sent_at=row.sent_at,
    )
