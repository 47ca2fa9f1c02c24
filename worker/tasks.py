"""Thin, idempotent, late-acknowledged Celery tasks.

``d2r.report_study`` claims a study in the database, runs :func:`worker.pipeline.run`, writes the
SRs to the spool and hands each destination to ``d2r.send_reports``. A redelivered or duplicated
message finds the study already claimed, reported or re-opened and does nothing; SR UIDs derive
from the study and the model version, so even a repeated send carries the same objects. With
``D2R_BATCH_MAX`` > 1 the task also claims other queued studies and runs them through the model
as one batch (:mod:`worker.batching`); each is then recorded here, as if it ran alone.

``d2r.send_reports`` sends a study's SRs to one destination and records the attempt; a transient
failure is retried by the node's reconciler after the configured delay (doubling per attempt),
not by a broker countdown, so the database alone decides what is still to be sent.

The first attempt of a freshly reported study runs in this worker process, in a background
thread (:class:`Deliveries`), while the worker goes on with the next study: the SR round trip to
the PACS mostly waits on the network. It is the same attempt as the task's (the delivery must
still be pending in the database, and the attempt is recorded there); a process that dies before
recording it leaves the delivery pending, and the node's reconciler queues it as a task again
(as it does for a lost task message). Sends still in flight finish before the process exits.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from celery import Celery, Task
from celery.exceptions import Retry
from celery.signals import worker_process_init, worker_process_shutdown, worker_shutdown
from pydicom import Dataset

from d2r_core import statuses
from d2r_core.errors import ConfigError
from delivery import Delivered, StudyResults, open_destination
from delivery.content import CONTENT_FILE, DeliveryContent, FindingBox
from delivery.destinations import by_name
from delivery.errors import PermanentSendError, TransientSendError
from dicom_node.instance_file import read_instance
from observability import logs, metrics
from observability.audit import SENT, STUDY_FAILED, AuditLog
from studydb.errors import DatabaseUnavailable
from studydb.records import FAILED
from studydb.store import StudyStore
from worker import pipeline
from worker.errors import InputRejected, PredictionError
from worker.messages import REPORT_TASK, SEND_TASK, ReportJob
from worker.settings import WorkerSettings
from worker.stages import Stage, StageTracker, failure_reason

if TYPE_CHECKING:
    from delivery.dimse import AssociationPool

logger = logging.getLogger(__name__)


class WorkerContext:
    """Per-process resources: the model (loaded once) and the study database."""

    def __init__(self, settings: WorkerSettings, *, audit: AuditLog | None = None) -> None:
        self.settings = settings
        self.audit = audit
        self._lock = threading.Lock()
        self._pid = -1
        self._predictor: Any = None
        self._store: StudyStore | None = None
        self._associations: AssociationPool | None = None

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked pool child: never reuse the parent's handles
            self._pid = os.getpid()
            self._predictor = None
            self._store = None
            self._associations = None

    @property
    def associations(self) -> AssociationPool:
        """Associations to DICOM destinations, kept between studies
        (``D2R_DICOM_ASSOCIATION_IDLE_SECONDS``)."""
        with self._lock:
            self._check_pid()
            if self._associations is None:
                from delivery.dimse import AssociationPool

                self._associations = AssociationPool(
                    self.settings.delivery.association_idle_seconds
                )
            return self._associations

    def close_associations(self) -> None:
        """Release the associations this process keeps open (at shutdown)."""
        with self._lock:
            pool = self._associations if self._pid == os.getpid() else None
            self._associations = None
        if pool is not None:
            pool.close()

    @property
    def store(self) -> StudyStore:
        with self._lock:
            self._check_pid()
            if self._store is None:
                self._store = StudyStore(
                    self.settings.node.database_url,
                    retry_seconds=self.settings.node.db_retry_seconds,
                )
            return self._store

    @property
    def predictor(self) -> Any:
        with self._lock:
            self._check_pid()
            if self._predictor is None:
                from model.predict import Predictor
                from report.grounding import report_chooser

                path = self.settings.require_model()
                try:
                    self._predictor = Predictor.from_checkpoint(
                        path,
                        device=self.settings.device,
                        lesion_score_threshold=self.settings.lesion_min_score,
                        backend=self.settings.backend,
                        engine_dir=self.settings.engine_dir,
                        torch_compile=self.settings.torch_compile,
                        input_gate=self.settings.input_gate,
                        choose_report=report_chooser(self.settings.report_choice),
                    )
                    # a pinned hash must match what was actually loaded
                    self.settings.verify_model_sha256(self._predictor.checkpoint_sha256)
                except Exception as exc:
                    self._predictor = None
                    raise PredictionError(f"cannot load the model from {path}: {exc}") from exc
                logger.info(
                    "model %s %s loaded (sha256 %s)",
                    self._predictor.name,
                    self._predictor.version,
                    self._predictor.checkpoint_sha256[:12],
                )
                metrics.set_model_info(self._predictor.name, self._predictor.version)
            return self._predictor


class Deliveries:
    """First send attempts run beside the next study, one at a time, in this process.

    ``send(study_uid, destination)`` is the body of the send task. The thread pool is made per
    process (a forked pool child never uses its parent's); :meth:`drain` waits for what was
    handed over.
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


def _timed(predict: Callable[[Sequence[Dataset]], Any]) -> Callable[[Sequence[Dataset]], Any]:
    def timed(datasets: Sequence[Dataset]) -> Any:
        started = time.perf_counter()
        try:
            return predict(datasets)
        finally:
            metrics.observe_inference(time.perf_counter() - started)

    return timed


def report_study(
    ctx: WorkerContext,
    app: Celery,
    job_data: dict[str, Any],
    task_id: str,
    deliveries: Deliveries | None = None,
) -> str:
    """Body of ``d2r.report_study``; returns what happened (for logs and tests).

    With ``deliveries`` the first send attempt of each destination runs there; without, it is
    queued as a ``d2r.send_reports`` task.
    """
    job = ReportJob.from_dict(job_data)
    if ctx.settings.batch_max > 1:  # D2R_BATCH_MAX: more queued studies join this one
        from worker.batching import report_batch

        return report_batch(ctx, app, job, task_id, deliveries)
    with logs.bind(study_instance_uid=job.study_instance_uid, task_id=task_id):
        return _report_study(ctx, app, job, task_id, deliveries)


class LeaseHeartbeat:
    """Renew a claim's short lease while the attempt runs (a daemon thread of the pool child).

    A worker killed with -9 stops renewing, so its claim expires within one lease and the
    node's reconciler queues the study again. Renewal never extends the claim beyond the task
    time limit after the claim: a hung worker still lets it expire.
    """

    def __init__(
        self,
        store: StudyStore,
        study_uid: str,
        owner: str,
        settings: WorkerSettings,
        stages: StageTracker,
    ) -> None:
        self._store = store
        self._uid = study_uid
        self._owner = owner
        self._lease = settings.claim_lease_seconds
        self._every = settings.claim_heartbeat_seconds
        self._not_after = time.time() + settings.task_time_limit
        self._stages = stages
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="d2r-lease", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                held = self._store.renew_lease(
                    self._uid,
                    owner=self._owner,
                    lease_seconds=self._lease,
                    not_after=self._not_after,
                    stage=str(self._stages.current),
                )
            except Exception as exc:  # a database hiccup: the next beat tries again
                logger.warning("cannot renew the claim on study %s: %s", self._uid, exc)
                continue
            if not held:
                return

    def __enter__(self) -> LeaseHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5.0)


def _report_study(
    ctx: WorkerContext, app: Celery, job: ReportJob, task_id: str, deliveries: Deliveries | None
) -> str:
    settings = ctx.settings
    store = ctx.store
    uid = job.study_instance_uid
    max_attempts = settings.node.max_attempts
    claim_started = time.perf_counter()
    if not store.claim(
        uid,
        generation=job.generation,
        owner=task_id,
        lease_seconds=min(settings.claim_lease_seconds, settings.task_time_limit),
        max_attempts=max_attempts,
    ):
        logger.info(
            "study %s generation %d: stale, already claimed or out of attempts; dropped",
            uid,
            job.generation,
        )
        return "stale"
    claim_seconds = time.perf_counter() - claim_started
    stages = StageTracker()
    images: list[Dataset] = []

    def attempt() -> str:
        with LeaseHeartbeat(store, uid, task_id, settings, stages):
            return _attempt(ctx, app, job, task_id, stages, images, deliveries)

    return _settle_attempt(ctx, app, job, task_id, stages, images, claim_seconds, attempt)


def _settle_attempt(
    ctx: WorkerContext,
    app: Celery,
    job: ReportJob,
    task_id: str,
    stages: StageTracker,
    images: list[Dataset],
    claim_seconds: float,
    attempt: Callable[[], str],
) -> str:
    """Run one claimed study's ``attempt`` and record how it ended: reported, failed (bad
    input, model refused it) or one attempt spent (anything unexpected)."""
    store = ctx.store
    uid = job.study_instance_uid
    max_attempts = ctx.settings.node.max_attempts
    try:
        outcome = attempt()
        _log_timings(uid, stages, claim_seconds)
        return outcome
    except DatabaseUnavailable:  # no attempt spent: the job goes back to the queue
        raise
    except (InputRejected, PredictionError) as exc:
        logger.warning("study %s failed: %s", uid, exc)
        store.mark_failed(uid, str(exc), owner=task_id)
        metrics.observe_report("failed")
        return "failed"
    except Exception as exc:  # outside the expected tree: one attempt spent
        reason = failure_reason(stages.current, exc, images)
        state = store.record_failed_attempt(
            uid, owner=task_id, stage=stages.current, reason=reason, max_attempts=max_attempts
        )
        final = state == FAILED
        metrics.observe_failed_attempt(stages.current, final=final)
        logger.warning(
            "study %s: attempt failed at %s (%s); %s",
            uid,
            stages.current,
            type(exc).__name__,
            "study failed" if final else "queued again",
            exc_info=not final,
        )
        if final:
            metrics.observe_report("failed")
            _audit_failed(ctx, uid, stages.current, exc, reason)
            return "failed"
        if state == "queued":
            app.send_task(REPORT_TASK, args=[job.to_dict()])
        return "retry"


def _log_timings(uid: str, stages: StageTracker, claim_seconds: float) -> None:
    """One INFO line with where the attempt's time went (``bench/load`` reads it)."""
    seconds = stages.seconds()
    seconds["database"] = seconds.get("database", 0.0) + claim_seconds
    logger.info(
        "study %s timings: %s",
        uid,
        " ".join(f"{k}={v * 1000:.1f}ms" for k, v in seconds.items()),
    )


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


def _attempt(
    ctx: WorkerContext,
    app: Celery,
    job: ReportJob,
    task_id: str,
    stages: StageTracker,
    images: list[Dataset],
    deliveries: Deliveries | None = None,
    *,
    read_image: Callable[[str], Dataset] | None = None,
    predict: Callable[[Sequence[Dataset]], Any] | None = None,
) -> str:
    """Read, predict, build, write and record one claimed study; ``read_image`` and
    ``predict`` replace the spool read and the model (a batch predicted beforehand)."""
    from report.build import AlgorithmInfo, RoiEncoding, build_reports

    settings = ctx.settings
    store = ctx.store
    uid = job.study_instance_uid
    predictor = ctx.predictor
    algorithm = AlgorithmInfo(
        name=predictor.name, version=predictor.version, parameters=predictor.parameters
    )

    def build(content: Any) -> list[Dataset]:
        return build_reports(
            content,
            algorithm,
            text_sr=settings.text_sr,
            tracking_identifier_prefix=settings.tracking_identifier_prefix,
            roi_encoding=RoiEncoding(settings.sr_roi_encoding),
        )

    def predict_one(datasets: Sequence[Dataset]) -> Any:
        return predictor.predict(datasets, on_stage=stages.enter)

    result = pipeline.run(
        job,
        read_image=functools.partial(read_instance, max_pixel_bytes=settings.node.max_pixel_bytes)
        if read_image is None
        else read_image,
        predict=_timed(predict_one) if predict is None else predict,
        build_reports=build,
        stages=stages,
        images=images,
    )
    stages.enter(Stage.WRITE_RESULTS)
    files = {
        settings.results_dir / uid / f"{ds.SOPInstanceUID}.dcm": _encode(ds)
        for ds in result.reports
    }
    content_path = settings.results_dir / uid / CONTENT_FILE
    write_all_atomic({**files, content_path: _content(result).to_json().encode("utf-8")})
    paths = [str(p) for p in files]
    destinations = [d.name for d in settings.delivery.destinations]
    pred = result.prediction
    stages.enter(Stage.DATABASE)
    if not store.mark_reported(
        uid,
        owner=task_id,
        result_paths=paths,
        model_name=pred.model_name,
        model_version=pred.model_version,
        findings=pred.findings,
        impression=result.content.impression,
        lesion_count=len(result.content.lesions),
        destinations=destinations,
        outcome=f"abstained: {pred.abstain_reason}" if pred.abstained else None,
    ):
        return "stale"
    outcome = "abstained" if pred.abstained else "reported"
    metrics.observe_report(outcome)
    if not destinations and (view := store.get(uid)) is not None:
        metrics.observe_study_done(view, None)
    for dest in destinations:
        if deliveries is not None:
            deliveries.submit(uid, dest)
        else:
            app.send_task(SEND_TASK, args=[uid, dest])
    return outcome


def _content(result: pipeline.ReportResult) -> DeliveryContent:
    """What the HL7 and FHIR senders send: what the SRs say (the grounded lesions, each with
    its sentence, and the checked impression), tied to the TID 1500 SR."""
    pred = result.prediction
    said = result.content
    return DeliveryContent(
        findings=said.findings,
        impression=said.impression,
        lesions=tuple(
            FindingBox(lesion.class_name, lesion.score, lesion.box, sentence=lesion.sentence)
            for lesion in said.lesions
        ),
        model_name=pred.model_name,
        model_version=pred.model_version,
        sr_sop_instance_uid=str(result.reports[0].SOPInstanceUID) if result.reports else "",
        image_sop_instance_uid=pred.sop_instance_uid,
        abstained=pred.abstained,
        abstain_reason=pred.abstain_reason,
        input_gate=pred.input_gate,
    )


def _read_content(paths: Sequence[str]) -> DeliveryContent | None:
    """The content file beside the SRs, or None for results written before it existed."""
    if not paths:
        return None
    path = Path(paths[0]).parent / CONTENT_FILE
    try:
        return DeliveryContent.from_json(path.read_bytes())
    except FileNotFoundError:
        return None


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably: temp file, fsync, rename, fsync the folder."""
    write_all_atomic({path: data})


def write_all_atomic(files: dict[Path, bytes]) -> None:
    """Write each file durably: temp file, fsync, rename; then fsync each folder once.

    A folder created here is also made durable in its parent.
    """
    folders: dict[Path, bool] = {}
    for path in files:
        if path.parent not in folders:
            folders[path.parent] = not path.parent.is_dir()
            path.parent.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    for folder, created in folders.items():
        for directory in (folder, folder.parent) if created else (folder,):
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def send_reports(
    ctx: WorkerContext, study_uid: str, destination: str, task_id: str | None = None
) -> str:
    """Body of ``d2r.send_reports``: one attempt to one destination; returns the new state."""
    with logs.bind(study_instance_uid=study_uid, task_id=task_id):
        return _send_reports(ctx, study_uid, destination)


def _audit_sent(
    ctx: WorkerContext,
    study_uid: str,
    kind: str,
    destination: str,
    delivered: Delivered | None,
    datasets: Sequence[Dataset | None],
    error: str | None,
) -> None:
    """One ``sent`` line per acknowledged object, or per report when the attempt failed."""
    if ctx.audit is None:
        return
    if delivered is not None:
        for item in delivered.items:
            if kind == "dicom":
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
                destination_type=kind,
                status=item.status,
                error=None,
                **about,
            )
        return
    for ds in list(datasets) or [None]:
        ctx.audit.try_record(
            SENT,
            sop_instance_uid=None if ds is None else str(ds.SOPInstanceUID),
            study_instance_uid=study_uid,
            sop_class_uid=None if ds is None else str(ds.SOPClassUID),
            destination=destination,
            destination_type=kind,
            status=None,
            status_name=None,
            error=error,
        )


def _status_name(status: str) -> str | None:
    try:
        return statuses.status_name(int(status, 16))
    except ValueError:
        return None


def _send_reports(ctx: WorkerContext, study_uid: str, destination: str) -> str:
    settings = ctx.settings
    store = ctx.store
    started = time.perf_counter()
    view = store.get(study_uid)  # the study and its deliveries, in one read
    if view is None or not view.result_paths:
        return "stale"
    delivery = next((d for d in view.deliveries if d.destination == destination), None)
    if delivery is None or delivery.state != "pending":
        return "stale"
    error: str | None = None
    ok = False
    datasets: list[Dataset] = []
    delivered: Delivered | None = None
    stages = StageTracker()
    send_started = time.perf_counter()
    kind = "unknown"
    try:
        stages.enter(Stage.SEND)
        address = by_name(settings.delivery.destinations, destination)
        kind = address.kind
        sender = open_destination(
            address,
            settings.delivery,
            associations=ctx.associations if address.kind == "dicom" else None,
        )
        datasets = [pydicom.dcmread(p) for p in view.result_paths]
        content = _read_content(view.result_paths)
        delivered = sender.send(
            StudyResults(study_uid, tuple(datasets), content, files=tuple(view.result_paths))
        )
        ok = True
    except TransientSendError as exc:
        error = f"transient: {exc}"
    except (PermanentSendError, ConfigError) as exc:
        error = f"permanent: {exc}"
    except OSError as exc:
        error = f"cannot read the reports: {exc}"
    except Exception as exc:  # outside the expected tree: bounded by D2R_MAX_ATTEMPTS
        error = f"unexpected: {failure_reason(Stage.SEND, exc, datasets)}"
    send_seconds = time.perf_counter() - send_started
    max_attempts = settings.max_send_attempts
    if error and error.startswith(("permanent", "cannot read")):
        max_attempts = 1  # retrying cannot help
    elif error and error.startswith("unexpected"):
        max_attempts = min(max_attempts, settings.node.max_attempts)
    state = store.record_delivery_attempt(
        study_uid,
        destination,
        ok=ok,
        error=error,
        max_attempts=max_attempts,
        retry_delay=settings.node.send_retry_delay,
    )
    _audit_sent(ctx, study_uid, kind, destination, delivered, datasets, error)
    if error and error.startswith("unexpected"):
        metrics.observe_failed_attempt(Stage.SEND, final=state == "failed")
        if state == "failed":
            _audit_failed_send(ctx, study_uid, error)
    metrics.observe_send_attempt(
        destination,
        kind=kind,
        ok=ok,
        failure=None if error is None else error.partition(":")[0],
        retry=not ok and state == "pending",
    )
    if ok and (done := store.get(study_uid)) is not None:
        metrics.observe_study_done(done, destination)
    log = logger.info if ok else logger.warning
    log(
        "study %s -> %s: %s%s; timings: send=%.1fms database=%.1fms",
        study_uid,
        destination,
        state,
        f" ({error})" if error else "",
        send_seconds * 1000,
        (time.perf_counter() - started - send_seconds) * 1000,
    )
    return state


#: times a task goes back to the queue because the study database did not answer; with the
#: store's own retries (``D2R_DB_RETRY_SECONDS`` each time) this outlasts a database failover
DATABASE_RETRIES = 10


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


def register_tasks(
    app: Celery, settings: WorkerSettings, *, audit: AuditLog | None = None
) -> WorkerContext:
    """Register the tasks on ``app``; the model loads once per worker process."""
    ctx = WorkerContext(settings, audit=audit)
    deliveries = Deliveries(
        lambda uid, dest: send_reports(ctx, uid, dest),
        requeue=lambda uid, dest: app.send_task(SEND_TASK, args=[uid, dest]),
    )

    @app.task(name="d2r.report_study", bind=True)  # type: ignore[untyped-decorator]
    def report_study_task(self: Task, job: dict[str, Any]) -> str:
        try:
            return report_study(ctx, app, job, self.request.id or "unknown", deliveries)
        except DatabaseUnavailable as exc:
            raise _database_retry(self, exc, "report") from None

    @app.task(name=SEND_TASK, bind=True)  # type: ignore[untyped-decorator]
    def send_reports_task(self: Task, study_uid: str, destination: str) -> str:
        try:
            return send_reports(ctx, study_uid, destination, self.request.id)
        except DatabaseUnavailable as exc:
            raise _database_retry(self, exc, "send") from None

    @worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _load_model(**_: Any) -> None:
        try:
            ctx.predictor  # noqa: B018 - warm up: load the model before the first study
        except Exception:
            logger.exception("model not loaded at start-up; the first study will retry")

    @worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _finish_sends(**_: Any) -> None:  # solo pool: the sends ran in the main process
        deliveries.drain(settings.task_time_limit)
        ctx.close_associations()

    @worker_process_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _process_gone(**_: Any) -> None:
        deliveries.drain(settings.task_time_limit)
        ctx.close_associations()
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:  # this process's live gauges (the loaded model) leave the endpoint
            metrics.mark_process_dead(os.getpid(), directory)

    _ = (report_study_task, send_reports_task)
    return ctx
