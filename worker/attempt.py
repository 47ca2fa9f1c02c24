"""One claimed study's attempt, once its batch has read the images and run the model.

:func:`finish` builds the study's SRs from what the spool and the model gave
(:func:`worker.pipeline.run`), writes them, records the study as reported and hands each
destination its first send. :func:`settle` runs it and records how it ended: reported, failed
(bad input, or the model refused it) or one attempt spent (anything unexpected), so each study
of a batch ends on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from pydicom import Dataset

from dicom_node.instance_file import read_instance
from model.predict import StudyPrediction
from observability import metrics
from observability.audit import STUDY_FAILED
from studydb.drift import Observation
from studydb.errors import DatabaseUnavailable
from studydb.records import FAILED, QUEUED
from worker import pipeline
from worker.context import WorkerContext
from worker.errors import InputRejected, PredictionError
from worker.messages import REPORT_TASK, SEND_TASK, ReportJob, broker_priority
from worker.outcomes import Outcome
from worker.results import write_results
from worker.sending import Deliveries
from worker.settings import WorkerSettings
from worker.stages import Stage, StageTracker, failure_reason

__all__ = ["SOURCE_VALUES_LEFT_OUT", "ClaimedStudy", "ReportTask", "finish", "settle"]

#: the logger these lines have always come from (operators' log filters name it)
logger = logging.getLogger("worker.tasks")
#: the study event naming source attributes left out of d2r's objects (invalid for their VR)
SOURCE_VALUES_LEFT_OUT = "source-values-left-out"


@dataclass(frozen=True)
class ReportTask:
    """One ``d2r.report_study`` task: the process's resources, the app that queues follow-up
    tasks, the task id (the owner of its claims) and where first sends run (None: queued as
    ``d2r.send_reports`` tasks)."""

    ctx: WorkerContext
    app: Celery
    task_id: str
    deliveries: Deliveries | None = None


@dataclass
class ClaimedStudy:
    """One study a task holds: its job, where its attempt is, and what the spool read and the
    model predicted for it, replayed to :func:`worker.pipeline.run` by :func:`finish`."""

    job: ReportJob
    stages: StageTracker = field(default_factory=StageTracker)
    #: each image read (by spool path), up to and including the error that stopped the reading
    read: dict[str, Dataset | Exception] = field(default_factory=dict)
    #: the model's prediction, or the exception that ended it; None: not predicted
    prediction: StudyPrediction | Exception | None = None
    #: the stage the batch left the study in (a prediction failure is recorded there)
    left_at: str = Stage.PREDICT
    #: the headers the attempt used: a failure reason leaves their identifiers out
    headers: list[Dataset] = field(default_factory=list)

    @property
    def uid(self) -> str:
        return self.job.study_instance_uid

    @property
    def readable(self) -> bool:
        """No image failed to read."""
        return all(isinstance(v, Dataset) for v in self.read.values())

    @property
    def images(self) -> list[Dataset]:
        """The images read, in the job's order (all of them when :attr:`readable`)."""
        return [v for i in self.job.instances if isinstance(v := self.read.get(i.path), Dataset)]

    def read_images(self, max_pixel_bytes: int) -> None:
        """Read each image from the spool (pixel data up to ``max_pixel_bytes``); stop at the
        first error, which :func:`finish` replays and judges."""
        for inst in self.job.instances:
            try:
                self.read[inst.path] = read_instance(inst.path, max_pixel_bytes=max_pixel_bytes)
            except Exception as exc:  # replayed, and judged, by the per-study path
                self.read[inst.path] = exc
                break

    def predicted(self, outcome: StudyPrediction | Exception) -> None:
        """Keep the model's ``outcome`` and the stage it left the study in."""
        self.prediction = outcome
        self.left_at = str(self.stages.current)

    def read_image(self, path: str) -> Dataset:
        """The image read from ``path``, or the error that stopped the reading there."""
        value = self.read.get(path)
        if value is None:  # after the failed image: never asked for, as in the spool read
            raise FileNotFoundError(path)
        if isinstance(value, Exception):
            raise value
        return value

    def predict(self, _datasets: Sequence[Dataset]) -> StudyPrediction:
        """The model's prediction, entering the stage the batch left the study in."""
        self.stages.enter(self.left_at)  # a failure is recorded where the batch left it
        if self.prediction is None:
            raise PredictionError("the batch gave no prediction for this study")
        if isinstance(self.prediction, Exception):
            raise self.prediction
        return self.prediction


def settle(task: ReportTask, study: ClaimedStudy, claim_seconds: float, model: Any) -> Outcome:
    """:func:`finish` ``study`` and record how it ended: reported, failed (bad input, the model
    refused it) or one attempt spent (anything unexpected).

    Raises
    ------
    DatabaseUnavailable
        No attempt is spent: the study's message goes back to the queue.
    """
    try:
        outcome = finish(task, study, model)
        _log_timings(study.uid, study.stages, claim_seconds)
        return outcome
    except DatabaseUnavailable:  # no attempt spent: the job goes back to the queue
        raise
    except (InputRejected, PredictionError) as exc:
        logger.warning("study %s failed: %s", study.uid, exc)
        task.ctx.store.mark_failed(study.uid, str(exc), owner=task.task_id)
        metrics.observe_report(Outcome.FAILED)
        return Outcome.FAILED
    except Exception as exc:  # outside the expected tree: one attempt spent
        return _spend_attempt(task, study, exc)


def finish(task: ReportTask, study: ClaimedStudy, model: Any) -> Outcome:
    """Build, write, record and send ``study``'s SRs; ``model`` is the predictor, or the
    exception that stopped it loading (raised here, as for a study alone)."""
    if isinstance(model, Exception):
        raise model
    settings = task.ctx.settings
    dropped: list[str] = []
    result = pipeline.run(
        study.job,
        read_image=study.read_image,
        predict=study.predict,
        build_reports=_sr_builder(settings, model, dropped),
        stages=study.stages,
        images=study.headers,
    )
    study.stages.enter(Stage.WRITE_RESULTS)
    paths = write_results(settings.results_dir / study.uid, result)
    destinations = [d.name for d in settings.delivery.destinations]
    pred = result.prediction
    study.stages.enter(Stage.DATABASE)
    if not task.ctx.store.mark_reported(
        study.uid,
        owner=task.task_id,
        result_paths=paths,
        model_name=pred.model_name,
        model_version=pred.model_version,
        findings=pred.findings,
        impression=result.content.impression,
        lesion_count=len(result.content.lesions),
        destinations=destinations,
        outcome=f"abstained: {pred.abstain_reason}" if pred.abstained else None,
        observation=_observation(task, result),
    ):
        return Outcome.STALE
    if dropped:  # keywords only: the values themselves may identify the patient
        task.ctx.store.add_event(
            study.uid,
            SOURCE_VALUES_LEFT_OUT,
            f"left out of every object d2r wrote, their value invalid for their VR: "
            f"{', '.join(dropped)}",
        )
    outcome = Outcome.ABSTAINED if pred.abstained else Outcome.REPORTED
    metrics.observe_report(outcome)
    _hand_over(task, study.uid, destinations)
    return outcome


def _observation(task: ReportTask, result: pipeline.ReportResult) -> Observation:
    """What drift monitoring records of a reported study: the gate's score and calibration,
    whether it abstained, and the findings the SRs state with a box."""
    pred = result.prediction
    return Observation(
        model_name=pred.model_name,
        model_version=pred.model_version,
        abstained=pred.abstained,
        gate_score=pred.ood_score,
        gate=task.ctx.gate_reference if pred.input_gate else None,
        findings=tuple(lesion.class_name for lesion in result.content.lesions),
    )


def _sr_builder(
    settings: WorkerSettings, predictor: Any, dropped: list[str]
) -> pipeline.BuildReports:
    """The objects of a report (``D2R_OUTPUTS``), signed with the model's name, version and
    parameters; the keywords of source values left out for their VR are added to ``dropped``."""
    from report.build import AlgorithmInfo, RoiEncoding
    from report.outputs import Output, build_outputs

    algorithm = AlgorithmInfo(
        name=predictor.name, version=predictor.version, parameters=predictor.parameters
    )
    outputs = [Output(o) for o in settings.outputs if settings.text_sr or o != Output.TEXT]

    def build(content: Any) -> list[Dataset]:
        built = build_outputs(
            content,
            algorithm,
            outputs,
            tracking_identifier_prefix=settings.tracking_identifier_prefix,
            roi_encoding=RoiEncoding(settings.sr_roi_encoding),
        )
        dropped[:] = built.dropped
        return built.datasets

    return build


def _hand_over(task: ReportTask, uid: str, destinations: Sequence[str]) -> None:
    """Hand each destination its first send: to this process's background sends, or as a task.

    A study without destinations is done now: its end-to-end latency is observed."""
    if not destinations and (view := task.ctx.store.get(uid)) is not None:
        metrics.observe_study_done(view, None)
    for dest in destinations:
        if task.deliveries is not None:
            task.deliveries.submit(uid, dest)
        else:
            priority = broker_priority(task.ctx.store.priority_of(uid))
            task.app.send_task(SEND_TASK, args=[uid, dest], priority=priority)


def _spend_attempt(task: ReportTask, study: ClaimedStudy, exc: Exception) -> Outcome:
    """Record an attempt ended by an unexpected error; the study is queued again (its job
    message sent anew) or, out of attempts, failed."""
    stage = study.stages.current
    reason = failure_reason(stage, exc, study.headers)
    state = task.ctx.store.record_failed_attempt(
        study.uid,
        owner=task.task_id,
        stage=stage,
        reason=reason,
        max_attempts=task.ctx.settings.node.max_attempts,
    )
    final = state == FAILED
    metrics.observe_failed_attempt(stage, final=final)
    logger.warning(
        "study %s: attempt failed at %s (%s); %s",
        study.uid,
        stage,
        type(exc).__name__,
        "study failed" if final else "queued again",
        exc_info=not final,
    )
    if final:
        metrics.observe_report(Outcome.FAILED)
        _audit_failed(task.ctx, study.uid, stage, exc, reason)
        return Outcome.FAILED
    if state == QUEUED:
        priority = task.ctx.store.message_priority(
            study.uid, aging_seconds=task.ctx.settings.node.priority_aging_seconds
        )
        task.app.send_task(
            REPORT_TASK, args=[study.job.to_dict()], priority=broker_priority(priority)
        )
    return Outcome.RETRY


def _log_timings(uid: str, stages: StageTracker, claim_seconds: float) -> None:
    """One INFO line with where the attempt's time went (``bench/load`` reads it)."""
    seconds = stages.seconds()
    seconds["database"] = seconds.get("database", 0.0) + claim_seconds
    logger.info(
        "study %s timings: %s",
        uid,
        " ".join(f"{k}={v * 1000:.1f}ms" for k, v in seconds.items()),
    )


def _audit_failed(
    ctx: WorkerContext, study_uid: str, stage: str, exc: BaseException, reason: str
) -> None:
    if ctx.audit is not None:
        ctx.audit.try_record(
            STUDY_FAILED,
            study_instance_uid=study_uid,
            stage=stage,
            exception=type(exc).__name__,
            reason=reason,
        )
