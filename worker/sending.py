"""Sending a study's SRs to one destination: the attempt, its record and its audit lines.

:func:`send_reports` is the body of ``d2r.send_reports``: one attempt to one destination,
recorded in the study database. A transient failure is retried by the node's reconciler after
the configured delay (doubling per attempt), not by a broker countdown, so the database alone
decides what is still to be sent.

The first attempt of a freshly reported study runs in the worker process, in a background
thread (:class:`Deliveries`), while the worker goes on with the next study: the SR round trip
to the PACS mostly waits on the network. It is the same attempt as the task's (the delivery must
still be pending in the database, and the attempt is recorded there); a process that dies
before recording it leaves the delivery pending, and the node's reconciler queues it as a task
again (as it does for a lost task message). Sends still in flight finish before the process
exits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom import Dataset

from d2r_core import statuses
from d2r_core.errors import ConfigError
from delivery import Delivered, StudyResults, open_destination
from delivery.destinations import by_name
from delivery.errors import PermanentSendError, TransientSendError
from observability import logs, metrics
from observability.audit import SENT, STUDY_FAILED
from studydb.errors import DatabaseUnavailable
from studydb.records import DELIVERY_FAILED, DELIVERY_PENDING
from worker.context import WorkerContext
from worker.outcomes import SendOutcome
from worker.results import read_content
from worker.stages import Stage, StageTracker, failure_reason

__all__ = ["Deliveries", "send_reports"]

#: the logger these lines have always come from (operators' log filters name it)
logger = logging.getLogger("worker.tasks")


class Deliveries:
    """First send attempts run beside the next study, one at a time, in this process.

    ``send(study_uid, destination)`` is the body of the send task; ``requeue`` queues it as a
    task instead when the study database does not answer. The thread pool is made per process
    (a forked pool child never uses its parent's); :meth:`drain` waits for what was handed over.
    """

    def __init__(
        self,
        send: Callable[[str, str], Any],
        *,
        requeue: Callable[[str, str], Any] | None = None,
    ) -> None:
        self._send = send
        self._requeue = requeue
        self._lock = threading.Lock()
        self._pid = -1
        self._executor: ThreadPoolExecutor | None = None
        self._pending: set[Future[Any]] = set()

    def submit(self, study_uid: str, destination: str) -> None:
        """Send ``study_uid``'s reports to ``destination`` in the background."""
        with self._lock:
            if self._executor is None or self._pid != os.getpid():
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="d2r-send")
                self._pid = os.getpid()
                self._pending = set()
            future = self._executor.submit(self._run, study_uid, destination)
            self._pending.add(future)
        future.add_done_callback(self._done)

    def _run(self, study_uid: str, destination: str) -> None:
        try:
            self._send(study_uid, destination)
        except DatabaseUnavailable as exc:  # the send task retries it, database outage or not
            logger.warning(
                "send of study %s to %s handed to the queue: %s", study_uid, destination, exc
            )
            if self._requeue is not None:
                try:
                    self._requeue(study_uid, destination)
                except Exception:
                    logger.exception("could not queue the send; the reconciler queues it again")
        except Exception:  # the delivery stays pending: the reconciler queues it again
            logger.exception("send of study %s to %s failed", study_uid, destination)

    def _done(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def drain(self, timeout: float | None = None) -> None:
        """Wait for the sends handed over so far (in this process)."""
        with self._lock:
            if self._pid != os.getpid():
                return
            pending = list(self._pending)
        for future in pending:
            future.exception(timeout)


@dataclass
class SendAttempt:
    """One attempt to send a study's SRs: what was read and acknowledged, or why it failed."""

    #: the destination's type (dicom, dicomweb, mllp, fhir); unknown until it is found
    kind: str = "unknown"
    datasets: list[Dataset] = field(default_factory=list)
    delivered: Delivered | None = None
    #: ``"<transient|permanent|cannot read the reports|unexpected>: <reason>"``; None: sent
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def unexpected(self) -> bool:
        """Failed outside the expected tree (counted like a report attempt's failure)."""
        return self.error is not None and self.error.startswith("unexpected")


def send_reports(
    ctx: WorkerContext, study_uid: str, destination: str, task_id: str | None = None
) -> SendOutcome:
    """Body of ``d2r.send_reports``: one attempt to one destination; returns the new state."""
    with logs.bind(study_instance_uid=study_uid, task_id=task_id):
        return _send_reports(ctx, study_uid, destination)


def _send_reports(ctx: WorkerContext, study_uid: str, destination: str) -> SendOutcome:
    started = time.perf_counter()
    view = ctx.store.get(study_uid)  # the study and its deliveries, in one read
    if view is None or not view.result_paths:
        return SendOutcome.STALE
    delivery = next((d for d in view.deliveries if d.destination == destination), None)
    if delivery is None or delivery.state != DELIVERY_PENDING:
        return SendOutcome.STALE
    attempt = _attempt(ctx, study_uid, destination, view.result_paths)
    state = _record(ctx, study_uid, destination, attempt)
    log = logger.info if attempt.ok else logger.warning
    log(
        "study %s -> %s: %s%s; timings: send=%.1fms database=%.1fms",
        study_uid,
        destination,
        state,
        f" ({attempt.error})" if attempt.error else "",
        attempt.seconds * 1000,
        (time.perf_counter() - started - attempt.seconds) * 1000,
    )
    return SendOutcome(state)


def _attempt(
    ctx: WorkerContext, study_uid: str, destination: str, paths: Sequence[str]
) -> SendAttempt:
    """Send the SRs at ``paths`` (and their content file) to ``destination``, once."""
    attempt = SendAttempt()
    stages = StageTracker()
    started = time.perf_counter()
    try:
        stages.enter(Stage.SEND)
        address = by_name(ctx.settings.delivery.destinations, destination)
        attempt.kind = address.kind
        sender = open_destination(
            address,
            ctx.settings.delivery,
            associations=ctx.associations if address.kind == "dicom" else None,
        )
        attempt.datasets = [pydicom.dcmread(p) for p in paths]
        content = read_content(paths)
        attempt.delivered = sender.send(
            StudyResults(study_uid, tuple(attempt.datasets), content, files=tuple(paths))
        )
    except TransientSendError as exc:
        attempt.error = f"transient: {exc}"
    except (PermanentSendError, ConfigError) as exc:
        attempt.error = f"permanent: {exc}"
    except OSError as exc:
        attempt.error = f"cannot read the reports: {exc}"
    except Exception as exc:  # outside the expected tree: bounded by D2R_MAX_ATTEMPTS
        attempt.error = f"unexpected: {failure_reason(Stage.SEND, exc, attempt.datasets)}"
    attempt.seconds = time.perf_counter() - started
    return attempt


def _record(ctx: WorkerContext, study_uid: str, destination: str, attempt: SendAttempt) -> str:
    """Record ``attempt`` in the study database, the audit log and the metrics; returns the
    delivery's new state."""
    settings = ctx.settings
    max_attempts = settings.max_send_attempts
    if attempt.error and attempt.error.startswith(("permanent", "cannot read")):
        max_attempts = 1  # retrying cannot help
    elif attempt.unexpected:
        max_attempts = min(max_attempts, settings.node.max_attempts)
    state = ctx.store.record_delivery_attempt(
        study_uid,
        destination,
        ok=attempt.ok,
        error=attempt.error,
        max_attempts=max_attempts,
        retry_delay=settings.node.send_retry_delay,
    )
    _audit_sent(ctx, study_uid, destination, attempt)
    if attempt.unexpected:
        metrics.observe_failed_attempt(Stage.SEND, final=state == DELIVERY_FAILED)
        if state == DELIVERY_FAILED:
            _audit_failed_send(ctx, study_uid, str(attempt.error))
    metrics.observe_send_attempt(
        destination,
        kind=attempt.kind,
        ok=attempt.ok,
        failure=None if attempt.error is None else attempt.error.partition(":")[0],
        retry=not attempt.ok and state == DELIVERY_PENDING,
    )
    if attempt.ok and (done := ctx.store.get(study_uid)) is not None:
        metrics.observe_study_done(done, destination)
    return state


def _audit_sent(ctx: WorkerContext, study_uid: str, destination: str, attempt: SendAttempt) -> None:
    """One ``sent`` line per acknowledged object, or per report when the attempt failed."""
    if ctx.audit is None:
        return
    if attempt.delivered is not None:
        for item in attempt.delivered.items:
            if attempt.kind == "dicom":
                about = {
                    "sop_instance_uid": item.identifier,
                    "sop_class_uid": item.object_type,
                    "status_name": _status_name(item.status),
                }
            else:
                about = {"identifier": item.identifier, "object_type": item.object_type}
            ctx.audit.try_record(
                SENT,
                study_instance_uid=study_uid,
                destination=destination,
                destination_type=attempt.kind,
                status=item.status,
                error=None,
                **about,
            )
        return
    reports: list[Dataset | None] = [*attempt.datasets] or [None]
    for ds in reports:
        ctx.audit.try_record(
            SENT,
            sop_instance_uid=None if ds is None else str(ds.SOPInstanceUID),
            study_instance_uid=study_uid,
            sop_class_uid=None if ds is None else str(ds.SOPClassUID),
            destination=destination,
            destination_type=attempt.kind,
            status=None,
            status_name=None,
            error=attempt.error,
        )


def _status_name(status: str) -> str | None:
    try:
        return statuses.status_name(int(status, 16))
    except ValueError:
        return None


def _audit_failed_send(ctx: WorkerContext, study_uid: str, error: str) -> None:
    if ctx.audit is not None:
        reason = error.removeprefix("unexpected: ")
        ctx.audit.try_record(
            STUDY_FAILED,
            study_instance_uid=study_uid,
            stage=str(Stage.SEND),
            exception=reason.split(": ")[1] if reason.count(": ") else "",
            reason=reason,
        )
