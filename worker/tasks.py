"""The worker's Celery tasks, ``d2r.report_study`` and ``d2r.send_reports``: registration only.

:func:`register_tasks` binds the task names to their bodies, :func:`report_study` (the batch
path of :mod:`worker.run`) and :func:`worker.sending.send_reports`, and maps a study database
outage to a retry of the message; every other outcome is decided, and recorded, by the bodies.

The tasks are idempotent and acknowledged late: a redelivered or duplicated message finds the
study already claimed, reported or re-opened and does nothing; SR UIDs derive from the study and
the model version, so even a repeated send carries the same objects.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, Task
from celery.exceptions import Retry
from celery.signals import worker_process_init, worker_process_shutdown, worker_shutdown

from observability import metrics
from observability.audit import AuditLog
from studydb.errors import DatabaseUnavailable
from worker.attempt import ReportTask
from worker.context import WorkerContext
from worker.messages import REPORT_TASK, SEND_TASK, ReportJob, broker_priority
from worker.outcomes import Outcome
from worker.run import report_batch
from worker.sending import Deliveries, send_reports
from worker.settings import WorkerSettings

__all__ = ["DATABASE_RETRIES", "WorkerContext", "register_tasks", "report_study", "send_reports"]

logger = logging.getLogger(__name__)

#: times a task goes back to the queue because the study database did not answer; with the
#: store's own retries (``D2R_DB_RETRY_SECONDS`` each time) this outlasts a database failover
DATABASE_RETRIES = 10


def report_study(
    ctx: WorkerContext,
    app: Celery,
    job_data: dict[str, Any],
    task_id: str,
    deliveries: Deliveries | None = None,
) -> Outcome:
    """Body of ``d2r.report_study``: the job message's study, and the queued studies that join
    its batch (:func:`worker.run.report_batch`); returns what happened to the message's study.

    With ``deliveries`` the first send attempt of each destination runs there; without, it is
    queued as a ``d2r.send_reports`` task.
    """
    job = ReportJob.from_dict(job_data)
    return report_batch(ReportTask(ctx, app, task_id, deliveries), job)


def register_tasks(
    app: Celery, settings: WorkerSettings, *, audit: AuditLog | None = None
) -> WorkerContext:
    """Register the tasks on ``app``; the model loads once per worker process."""
    ctx = WorkerContext(settings, audit=audit)
    deliveries = Deliveries(
        lambda uid, dest: send_reports(ctx, uid, dest),
        requeue=lambda uid, dest: app.send_task(
            SEND_TASK, args=[uid, dest], priority=broker_priority(ctx.store.priority_of(uid))
        ),
    )

    @app.task(name=REPORT_TASK, bind=True)  # type: ignore[untyped-decorator]
    def report_study_task(self: Task, job: dict[str, Any]) -> str:
        try:  # the plain value: Celery logs what a task returned
            return report_study(ctx, app, job, self.request.id or "unknown", deliveries).value
        except DatabaseUnavailable as exc:
            raise _database_retry(self, exc, "report") from None

    @app.task(name=SEND_TASK, bind=True)  # type: ignore[untyped-decorator]
    def send_reports_task(self: Task, study_uid: str, destination: str) -> str:
        try:
            return send_reports(ctx, study_uid, destination, self.request.id).value
        except DatabaseUnavailable as exc:
            raise _database_retry(self, exc, "send") from None

    _ = (report_study_task, send_reports_task)
    _connect_process_signals(ctx, deliveries)
    return ctx


def _database_retry(task: Task, exc: DatabaseUnavailable, what: str) -> BaseException:
    """Put the task's message back on the queue (after a backoff) instead of acknowledging it
    away; after :data:`DATABASE_RETRIES` the study is left to the node's reconciler."""
    retries = int(task.request.retries or 0)
    if retries >= DATABASE_RETRIES:
        logger.error(
            "%s task given up after %d database retries (%s); the node's reconciler re-sends it",
            what,
            retries,
            exc,
        )
        return exc
    countdown = min(60.0, 2.0 * 2**retries)
    logger.warning("%s task back on the queue in %.0f s: %s", what, countdown, exc)
    try:
        task.retry(exc=exc, countdown=countdown, max_retries=DATABASE_RETRIES)
    except Retry as retry:  # the new message is on the queue: raise this to acknowledge this one
        requeued: BaseException = retry
        return requeued
    return exc


def _connect_process_signals(ctx: WorkerContext, deliveries: Deliveries) -> None:
    """Load the model as a worker process starts; finish its sends and close its associations
    as it stops."""

    @worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _load_model(**_: Any) -> None:
        try:
            ctx.predictor  # noqa: B018 - warm up: load the model before the first study
        except Exception:
            logger.exception("model not loaded at start-up; the first study will retry")

    @worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _finish_sends(**_: Any) -> None:  # solo pool: the sends ran in the main process
        deliveries.drain(ctx.settings.task_time_limit)
        ctx.close_associations()

    @worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _process_gone(**_: Any) -> None:
        deliveries.drain(ctx.settings.task_time_limit)
        ctx.close_associations()
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:  # this process's live gauges (the loaded model) leave the endpoint
            metrics.mark_process_dead(os.getpid(), directory)
