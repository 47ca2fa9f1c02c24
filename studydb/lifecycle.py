"""A study's life after its instances: completion, the queue, claims and leases, attempts,
the report, failure and an operator's retry."""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from d2r_core.priority import Priority
from studydb.drift import Observation, write_observation
from studydb.engine import Database, retrying
from studydb.ordering import BY_RANK, effective_rank, rank_of, waiting_since
from studydb.records import (
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    DONE,
    FAILED,
    PRIORITY_EVENT,
    PROCESSING,
    QUEUED,
    RECEIVING,
    SENDING,
    SKIPPED,
)
from studydb.tables import (
    deliveries_table,
    studies_table,
)
from studydb.transitions import now_seconds, retry_delivery, write_event

logger = logging.getLogger(__name__)

__all__ = ["Lifecycle"]


def _pending_deliveries(
    conn: Connection, study_uid: str, destinations: Sequence[str], now: float
) -> None:
    """Replace the study's deliveries with one pending delivery per destination, due now."""
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


class Lifecycle(Database):
    """State changes of studies: completion, claims, leases, attempts, results, retries."""

    @retrying
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

    @retrying
    def completion_due(
        self,
        *,
        quiet_seconds: float,
        force_seconds: float,
        release_grace_seconds: float | None = None,
        now: float | None = None,
        urgent_quiet_seconds: float | None = None,
    ) -> list[tuple[str, str]]:
        """Studies still receiving that are complete, each with why.

        Why is ``quiet period``, ``force timeout`` or, with ``release_grace_seconds``,
        ``association released``: the association that brought the last instance was released
        that long ago and no other association of the study is open. With
        ``urgent_quiet_seconds`` an urgent or stat study's quiet period is that long instead.
        """
        now = now_seconds() if now is None else now
        s = studies_table.c
        quiet = s.last_received_at <= now - quiet_seconds
        if urgent_quiet_seconds is not None:
            quiet = sa.or_(
                quiet,
                sa.and_(
                    rank_of(s.priority) <= Priority.URGENT.rank,
                    s.last_received_at <= now - urgent_quiet_seconds,
                ),
            )
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
        with self.transaction() as conn:
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

    @retrying
    def force_complete(self, study_uid: str) -> bool:
        """Make a receiving study due now (manual force-complete)."""
        with self.transaction() as conn:
            res = conn.execute(
                studies_table.update()
                .where(
                    studies_table.c.study_instance_uid == study_uid,
                    studies_table.c.state == RECEIVING,
                )
                .values(last_received_at=0.0, updated_at=now_seconds())
            )
            if res.rowcount:
                write_event(conn, study_uid, "force-complete", "completed by operator")
        return bool(res.rowcount)

    @retrying
    def mark_queued(self, study_uid: str, *, reason: str = "study complete") -> int:
        """receiving -> queued; returns the new generation (0 if the study was not receiving)."""
        s = studies_table.c
        with self.transaction() as conn:
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
                    queued_priority=None,
                    queued_at=now_seconds(),
                    reason=None,
                    attempts=0,
                    updated_at=now_seconds(),
                    state_changed_at=now_seconds(),
                )
            )
            if not res.rowcount:
                return 0
            write_event(conn, study_uid, "queued", f"{reason}; generation {generation}")
        return int(generation)

    @retrying
    def mark_skipped(self, study_uid: str, reason: str) -> None:
        self._set_state(study_uid, SKIPPED, reason, from_states=(RECEIVING,))

    @retrying
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
        now = now_seconds() if now is None else now
        s = studies_table.c
        expired = sa.and_(s.state == PROCESSING, s.lease_expires_at <= now)
        if max_attempts is not None:
            expired = sa.and_(expired, s.attempts < max_attempts)
        conditions = [expired]
        if requeue_after != float("inf"):
            conditions.append(sa.and_(s.state == QUEUED, s.queued_at <= now - requeue_after))
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(s.study_instance_uid, s.generation).where(sa.or_(*conditions))
            ).all()
        return [(r.study_instance_uid, r.generation) for r in rows]

    @retrying
    def fail_exhausted(self, *, max_attempts: int, now: float | None = None) -> list[str]:
        """Fail processing studies whose claim expired after their last allowed attempt.

        A worker killed (or hung past its time limit) on every attempt leaves the lease to
        expire; such a study is failed with the reason instead of being queued again.
        """
        now = now_seconds() if now is None else now
        s = studies_table.c
        failed = []
        with self.transaction() as conn:
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
                    write_event(conn, r.study_instance_uid, FAILED, reason)
                    failed.append(str(r.study_instance_uid))
        return failed

    @retrying
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
        now = now_seconds() if now is None else now
        cond: list[Any] = [s.study_instance_uid == study_uid]
        if generation is None:
            cond.append(s.state.in_((QUEUED, PROCESSING)))
        else:
            due = [sa.and_(s.state == PROCESSING, s.lease_expires_at <= now)]
            if requeue_after is not None and requeue_after != float("inf"):
                due.append(sa.and_(s.state == QUEUED, s.queued_at <= now - requeue_after))
            cond += [s.generation == generation, sa.or_(*due)]
        with self.transaction() as conn:
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
                write_event(conn, study_uid, "requeued", detail)
        return bool(res.rowcount)

    @retrying
    def queued_studies(
        self,
        *,
        limit: int,
        exclude: Collection[str] = (),
        max_attempts: int | None = None,
        aging_seconds: float | None = None,
        now: float | None = None,
    ) -> list[tuple[str, int]]:
        """Queued studies, (StudyInstanceUID, generation): the highest priority first, the
        longest queued first within one priority. A routine or low study queued longer than
        ``aging_seconds`` counts as urgent (the starvation guard; None: off).

        A worker filling a batch claims them with :meth:`claim`, which alone decides: a study
        another worker claims first is simply not claimed here, and its own job message finds
        it claimed and is dropped.
        """
        if limit <= 0:
            return []
        s = studies_table.c
        now = now_seconds() if now is None else now
        cond = [s.state == QUEUED]
        if exclude:
            cond.append(s.study_instance_uid.not_in(list(exclude)))
        if max_attempts is not None:
            cond.append(s.attempts < max_attempts)
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(s.study_instance_uid, s.generation)
                .where(*cond)
                .order_by(effective_rank(now, aging_seconds), waiting_since(), s.study_instance_uid)
                .limit(limit)
            ).all()
        return [(str(r.study_instance_uid), int(r.generation)) for r in rows]

    @retrying
    def message_priority(
        self, study_uid: str, *, aging_seconds: float | None = None, now: float | None = None
    ) -> Priority:
        """The priority to send ``study_uid``'s job with (its own, or ``urgent`` once a
        routine or low study waited ``aging_seconds`` in the queue); recorded as the priority
        of its queued job, so :meth:`promotion_candidates` finds it when it rises again."""
        s = studies_table.c
        now = now_seconds() if now is None else now
        with self.transaction() as conn:
            row = conn.execute(
                sa.select(s.priority, s.queued_priority, effective_rank(now, aging_seconds)).where(
                    s.study_instance_uid == study_uid
                )
            ).first()
            if row is None:
                return Priority.ROUTINE
            stored = Priority.parse(row.priority)
            effective = BY_RANK[int(row[2])]
            conn.execute(
                studies_table.update()
                .where(s.study_instance_uid == study_uid)
                .values(queued_priority=str(effective))
            )
            sent = Priority.parse(row.queued_priority or stored)
            if effective.higher_than(stored) and effective.higher_than(sent):
                write_event(
                    conn,
                    study_uid,
                    PRIORITY_EVENT,
                    f"{stored} study queued for over {aging_seconds:g} s: served as {effective}",
                )
        return effective

    @retrying
    def promotion_candidates(
        self, *, aging_seconds: float | None = None, now: float | None = None
    ) -> list[tuple[str, int]]:
        """Queued studies whose job was sent with a lower priority than they now have (raised
        by an operator, or aged); (StudyInstanceUID, generation). The caller sends the job
        again, with :meth:`message_priority`; the first message is dropped as stale."""
        s = studies_table.c
        now = now_seconds() if now is None else now
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(s.study_instance_uid, s.generation).where(
                    s.state == QUEUED,
                    s.queued_priority.is_not(None),
                    effective_rank(now, aging_seconds) < rank_of(s.queued_priority),
                )
            ).all()
        return [(str(r.study_instance_uid), int(r.generation)) for r in rows]

    @retrying
    def set_priority(self, study_uid: str, priority: Priority, *, source: str) -> Priority:
        """Set a study's priority by hand (``d2r retry --priority``); returns the one before.

        Raises
        ------
        KeyError
            No such study.
        """
        s = studies_table.c
        with self.transaction() as conn:
            before = conn.execute(
                sa.select(s.priority).where(s.study_instance_uid == study_uid).with_for_update()
            ).scalar_one_or_none()
            if before is None:
                raise KeyError(study_uid)
            if before != str(priority):
                conn.execute(
                    studies_table.update()
                    .where(s.study_instance_uid == study_uid)
                    .values(priority=str(priority), updated_at=now_seconds())
                )
                write_event(
                    conn, study_uid, PRIORITY_EVENT, f"set from {before} to {priority} ({source})"
                )
        return Priority.parse(before)

    @retrying
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
        now = now_seconds()
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
        with self.transaction() as conn:
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
                write_event(
                    conn,
                    study_uid,
                    "processing",
                    f"claimed by task {owner} (attempt {attempts}{of})",
                )
        return bool(res.rowcount)

    @retrying
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
        now = now_seconds()
        s = studies_table.c
        values: dict[str, Any] = {"lease_expires_at": min(now + lease_seconds, not_after)}
        if stage is not None:
            values["stage"] = stage
        with self.transaction() as conn:
            res = conn.execute(
                studies_table.update()
                .where(s.study_instance_uid == study_uid, s.state == PROCESSING, s.owner == owner)
                .values(**values)
            )
        return bool(res.rowcount)

    @retrying
    def record_failed_attempt(
        self, study_uid: str, *, owner: str, stage: str, reason: str, max_attempts: int
    ) -> str:
        """An unexpected error ended this owner's attempt: queue the study again or fail it.

        Returns the new state: ``queued`` while attempts are left (the caller re-sends the
        job), ``failed`` after ``max_attempts`` (the reason is recorded), or the unchanged
        state when the claim is no longer this owner's.
        """
        now = now_seconds()
        s = studies_table.c
        with self.transaction() as conn:
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
            write_event(conn, study_uid, "attempt-failed", detail)
            if new == FAILED:
                write_event(conn, study_uid, FAILED, reason)
        return new

    @retrying
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
        observation: Observation | None = None,
    ) -> bool:
        """processing -> sending (or done without destinations); creates pending deliveries.

        ``outcome`` (e.g. ``"abstained: <why>"`` when the model's input gate declined the study)
        is kept in ``reason`` through ``done``, so status, the status page and the audit show it.
        ``observation`` (the gate's score, the abstention, the findings stated) is recorded in
        the same transaction, for drift monitoring (:mod:`studydb.drift`).
        """
        now = now_seconds()
        s = studies_table.c
        with self.transaction() as conn:
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
            _pending_deliveries(conn, study_uid, destinations, now)
            if observation is not None:
                write_observation(conn, study_uid, observation, now=now)
            write_event(
                conn,
                study_uid,
                "reported",
                f"{model_name} {model_version}: {lesion_count} lesion(s), "
                f"{len(result_paths)} DICOM object(s)"
                + ("" if destinations else "; no destinations configured")
                + (f"; {outcome}" if outcome else ""),
            )
        return True

    @retrying
    def mark_failed(self, study_uid: str, reason: str, *, owner: str | None = None) -> None:
        """processing -> failed with a reason (input rejected, model error)."""
        s = studies_table.c
        with self.transaction() as conn:
            cond = [s.study_instance_uid == study_uid, s.state == PROCESSING]
            if owner is not None:
                cond.append(s.owner == owner)
            res = conn.execute(
                studies_table.update()
                .where(*cond)
                .values(
                    state=FAILED,
                    reason=reason,
                    finished_at=now_seconds(),
                    lease_expires_at=None,
                    updated_at=now_seconds(),
                    state_changed_at=now_seconds(),
                )
            )
            if res.rowcount:
                write_event(conn, study_uid, FAILED, reason)

    # Longer than a screen: one transaction re-opens the study and each failed delivery together,
    # so a retry is all or nothing
    @retrying
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
        now = now_seconds()
        with self.transaction() as conn:
            row = conn.execute(
                sa.select(studies_table).where(s.study_instance_uid == study_uid)
            ).first()
            if row is None:
                raise KeyError(study_uid)
            if destination is not None:
                return retry_delivery(conn, row, destination, now)
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
            write_event(
                conn,
                study_uid,
                "retry",
                "operator retry: " + ("re-send reports" if new == SENDING else "reprocess"),
            )
        return new

    def _set_state(
        self, study_uid: str, state: str, reason: str | None, *, from_states: Sequence[str]
    ) -> bool:
        s = studies_table.c
        with self.transaction() as conn:
            res = conn.execute(
                studies_table.update()
                .where(s.study_instance_uid == study_uid, s.state.in_(tuple(from_states)))
                .values(
                    state=state,
                    reason=reason,
                    finished_at=now_seconds(),
                    updated_at=now_seconds(),
                    state_changed_at=now_seconds(),
                )
            )
            if res.rowcount:
                write_event(conn, study_uid, state, reason or state)
        return bool(res.rowcount)
