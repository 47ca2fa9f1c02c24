"""The report path: claim, read, predict, then build, write, record and send each study; settle.

``d2r.report_study`` claims its own study and, while ``D2R_BATCH_MAX`` > 1, up to
``D2R_BATCH_MAX - 1`` queued studies more (:mod:`worker.claims`); a single study is a batch of
one. The images of every claimed study are read from the spool, the readable studies go through
the model as one batch (:meth:`model.predict.Predictor.predict_batch`), and each study is then
built, written, recorded and sent on its own (:mod:`worker.attempt`), so one study's bad image,
abstention or unbuildable SR ends only that study. One heartbeat keeps every claim alive
meanwhile (:mod:`worker.lease`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from observability import logs, metrics
from worker.attempt import ClaimedStudy, ReportTask, settle
from worker.claims import claim, claim_more
from worker.context import WorkerContext
from worker.lease import LeaseHeartbeat
from worker.messages import ReportJob
from worker.outcomes import Outcome

__all__ = ["report_batch"]

#: the loggers these lines have always come from (operators' log filters name them)
logger = logging.getLogger("worker.tasks")
batch_logger = logging.getLogger("worker.batching")


def report_batch(task: ReportTask, job: ReportJob) -> Outcome:
    """Report ``job``'s study, and the queued studies that join it; returns what happened to
    ``job``'s own study (the others' outcomes are recorded and logged).

    Raises
    ------
    Exception
        What kept the outcome of ``job``'s own study from being recorded (such as
        :class:`~studydb.errors.DatabaseUnavailable`), once the other studies are settled.
    """
    ctx = task.ctx
    uid = job.study_instance_uid
    started = time.perf_counter()
    with logs.bind(study_instance_uid=uid, task_id=task.task_id):
        if not claim(ctx.store, ctx.settings, uid, job.generation, owner=task.task_id):
            logger.info(
                "study %s generation %d: stale, already claimed or out of attempts; dropped",
                uid,
                job.generation,
            )
            return Outcome.STALE
    batch = [ClaimedStudy(j) for j in [job, *_claim_more(task, job)]]
    claim_seconds = (time.perf_counter() - started) / len(batch)
    alone = uid if len(batch) == 1 else None  # a batch of one: its study's id on every line
    with logs.bind(study_instance_uid=alone, task_id=task.task_id):
        if len(batch) > 1:
            batch_logger.info("batch of %d studies: %s", len(batch), " ".join(s.uid for s in batch))
        stages = {s.uid: s.stages for s in batch}
        with LeaseHeartbeat(ctx.store, task.task_id, ctx.settings, stages):
            for study in batch:
                with logs.bind(study_instance_uid=study.uid):
                    study.read_images(ctx.settings.node.max_pixel_bytes)
            model = _predict(ctx, batch)
            return _settle_all(task, batch, claim_seconds, model)


def _claim_more(task: ReportTask, job: ReportJob) -> list[ReportJob]:
    """The queued studies that join ``job``'s batch (``D2R_BATCH_MAX`` - 1 at most)."""
    settings = task.ctx.settings
    if settings.batch_max < 2:
        return []
    with logs.bind(task_id=task.task_id):
        try:
            return claim_more(
                task.ctx.store,
                settings,
                owner=task.task_id,
                want=settings.batch_max - 1,
                exclude=[job.study_instance_uid],
            )
        except Exception as exc:  # the batch goes on with the studies already claimed
            batch_logger.warning("cannot claim more studies for the batch: %s", exc)
            return []


def _predict(ctx: WorkerContext, batch: list[ClaimedStudy]) -> Any:
    """Run the readable studies through the model as one batch; returns the predictor, or the
    exception that stopped it loading (each study then fails on it, as it would alone)."""
    try:
        predictor = ctx.predictor
    except Exception as exc:  # each study records the load failure as it would alone
        return exc
    readable = [s for s in batch if s.readable]
    if not readable:
        return predictor

    def on_stage(index: int, stage: str) -> None:
        study = readable[index]
        with logs.bind(study_instance_uid=study.uid):
            study.stages.enter(stage)

    started = time.perf_counter()
    try:
        outcomes = predictor.predict_batch([s.images for s in readable], on_stage=on_stage)
    except Exception as exc:  # the model call itself: each study records it, as alone
        outcomes = [exc] * len(readable)
    finally:
        metrics.observe_inference(time.perf_counter() - started)
    for study, outcome in zip(readable, outcomes, strict=True):
        study.predicted(outcome)
    return predictor


def _settle_all(
    task: ReportTask, batch: list[ClaimedStudy], claim_seconds: float, model: Any
) -> Outcome:
    """Settle each study in turn; returns the outcome of the task's own study (the first).

    A study that joined the batch and whose outcome is not recorded is left to its lease; the
    task's own study follows its message instead (as a study alone does): the error is raised
    once the others are settled.
    """
    own: Outcome | Exception = Outcome.STALE
    for n, study in enumerate(batch):
        with logs.bind(study_instance_uid=study.uid, task_id=task.task_id):
            try:
                outcome = settle(task, study, claim_seconds, model)
            except Exception as exc:
                if n == 0:
                    own = exc
                    continue
                batch_logger.warning(
                    "study %s: outcome not recorded (%s); its claim expires and the study is "
                    "queued again",
                    study.uid,
                    type(exc).__name__,
                )
                outcome = Outcome.UNRECORDED
        if n == 0:
            own = outcome
        elif outcome not in (Outcome.REPORTED, Outcome.ABSTAINED):
            batch_logger.info("study %s (batched): %s", study.uid, outcome)
    if isinstance(own, Exception):
        raise own
    return own
