"""Thin, idempotent, late-acknowledged Celery tasks.

``d2r.report_study`` claims a study in the database, runs :func:`worker.pipeline.run`, writes the
SRs to the spool and hands each destination to ``d2r.send_reports``. A redelivered or duplicated
message finds the study already claimed, reported or re-opened and does nothing; SR UIDs derive
from the study and the model version, so even a repeated send carries the same objects.

``d2r.send_reports`` sends a study's SRs to one destination and records the attempt; a transient
failure is retried by the node's reconciler after the configured delay (doubling per attempt),
not by a broker countdown, so the database alone decides what is still to be sent.
"""

from __future__ import annotations

import logging
import os
import threading
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from celery import Celery, Task
from celery.signals import worker_process_init
from pydicom import Dataset

from dicom_node.errors import PermanentSendError, TransientSendError
from dicom_node.scu import SendOptions, send_datasets
from dicom_node.settings import parse_destinations
from dicom_node.studies import StudyStore
from worker import pipeline
from worker.errors import InputRejected, ModelError
from worker.messages import SEND_TASK, ReportJob
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


class WorkerContext:
    """Per-process resources: the model (loaded once) and the study database."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._pid = -1
        self._predictor: Any = None
        self._store: StudyStore | None = None

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked pool child: never reuse the parent's handles
            self._pid = os.getpid()
            self._predictor = None
            self._store = None

    @property
    def store(self) -> StudyStore:
        with self._lock:
            self._check_pid()
            if self._store is None:
                self._store = StudyStore(self.settings.node.database_url)
            return self._store

    @property
    def predictor(self) -> Any:
        with self._lock:
            self._check_pid()
            if self._predictor is None:
                from model.predict import Predictor

                path = self.settings.require_model()
                try:
                    self._predictor = Predictor.from_checkpoint(path, device=self.settings.device)
                except Exception as exc:
                    raise ModelError(f"cannot load the model from {path}: {exc}") from exc
                logger.info(
                    "model %s %s loaded (sha256 %s)",
                    self._predictor.name,
                    self._predictor.version,
                    self._predictor.checkpoint_sha256[:12],
                )
            return self._predictor


def _read_image(path: str) -> Dataset:
    return pydicom.dcmread(path)


def _series_description(name: str, version: str, description: str) -> str:
    text = f"{name} {version} AI draft report (unverified)"
    lowered = f"{name} {description}".lower()
    if any(word in lowered for word in ("synthetic", "phantom", "random", "untrained", "demo")):
        text += " - not for diagnostic use"
    return text[:64]


def report_study(ctx: WorkerContext, app: Celery, job_data: dict[str, Any], task_id: str) -> str:
    """Body of ``d2r.report_study``; returns what happened (for logs and tests)."""
    from report.build import AlgorithmInfo, build_reports

    job = ReportJob.from_dict(job_data)
    settings = ctx.settings
    store = ctx.store
    uid = job.study_instance_uid
    if not store.claim(
        uid, generation=job.generation, owner=task_id, lease_seconds=settings.task_time_limit
    ):
        logger.info(
            "study %s generation %d: stale or already claimed; dropped", uid, job.generation
        )
        return "stale"
    try:
        predictor = ctx.predictor
        algorithm = AlgorithmInfo(name=predictor.name, version=predictor.version)
        series_description = _series_description(
            predictor.name, predictor.version, getattr(predictor, "description", "")
        )

        def build(content: Any) -> list[Dataset]:
            return build_reports(
                content,
                algorithm,
                text_sr=settings.text_sr,
                tracking_identifier_prefix=settings.tracking_identifier_prefix,
                series_description=series_description,
            )

        result = pipeline.run(
            job, read_image=_read_image, predict=predictor.predict, build_reports=build
        )
    except (InputRejected, ModelError) as exc:
        logger.warning("study %s failed: %s", uid, exc)
        store.mark_failed(uid, str(exc), owner=task_id)
        return "failed"
    paths = []
    for ds in result.reports:
        path = settings.results_dir / uid / f"{ds.SOPInstanceUID}.dcm"
        write_atomic(path, _encode(ds))
        paths.append(str(path))
    destinations = [d.name for d in settings.node.destinations]
    pred = result.prediction
    if not store.mark_reported(
        uid,
        owner=task_id,
        result_paths=paths,
        model_name=pred.model_name,
        model_version=pred.model_version,
        findings=pred.findings,
        impression=pred.impression,
        lesion_count=len(pred.lesions),
        destinations=destinations,
    ):
        return "stale"
    for dest in destinations:
        app.send_task(SEND_TASK, args=[uid, dest])
    return "reported"


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably: temp file, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def send_reports(ctx: WorkerContext, study_uid: str, destination: str) -> str:
    """Body of ``d2r.send_reports``: one attempt to one destination; returns the new state."""
    settings = ctx.settings
    store = ctx.store
    delivery = store.delivery(study_uid, destination)
    if delivery is None or delivery.state != "pending":
        return "stale"
    view = store.get(study_uid)
    if view is None or not view.result_paths:
        return "stale"
    (dest,) = parse_destinations(destination)
    error: str | None = None
    ok = False
    try:
        datasets = [pydicom.dcmread(p) for p in view.result_paths]
        send_datasets(
            datasets,
            dest,
            ae_title=settings.node.ae_title,
            options=SendOptions.from_settings(settings.node),
        )
        ok = True
    except TransientSendError as exc:
        error = f"transient: {exc}"
    except PermanentSendError as exc:
        error = f"permanent: {exc}"
    except OSError as exc:
        error = f"cannot read the reports: {exc}"
    max_attempts = settings.max_send_attempts
    if error and error.startswith(("permanent", "cannot read")):
        max_attempts = 1  # retrying cannot help
    state = store.record_delivery_attempt(
        study_uid,
        destination,
        ok=ok,
        error=error,
        max_attempts=max_attempts,
        retry_delay=settings.node.send_retry_delay,
    )
    log = logger.info if ok else logger.warning
    log("study %s -> %s: %s%s", study_uid, destination, state, f" ({error})" if error else "")
    return state


def register_tasks(app: Celery, settings: WorkerSettings) -> WorkerContext:
    """Register the tasks on ``app``; the model loads once per worker process."""
    ctx = WorkerContext(settings)

    @app.task(name="d2r.report_study", bind=True)  # type: ignore[untyped-decorator]
    def report_study_task(self: Task, job: dict[str, Any]) -> str:
        return report_study(ctx, app, job, self.request.id or "unknown")

    @app.task(name=SEND_TASK, bind=True)  # type: ignore[untyped-decorator]
    def send_reports_task(self: Task, study_uid: str, destination: str) -> str:
        return send_reports(ctx, study_uid, destination)

    @worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _load_model(**_: Any) -> None:
        try:
            ctx.predictor  # noqa: B018 - warm up: load the model before the first study
        except Exception:
            logger.exception("model not loaded at start-up; the first study will retry")

    _ = (report_study_task, send_reports_task)
    return ctx
