"""Batched inference: one ``d2r.report_study`` task reports up to ``D2R_BATCH_MAX`` studies.

The task claims its own study as usual, then claims up to ``D2R_BATCH_MAX - 1`` other
``queued`` studies straight from the study database, for at most ``D2R_BATCH_WAIT_MS``. Every
claim is the ordinary per-study claim with its own lease (:meth:`StudyStore.claim`), so the
database alone decides who reports a study: the job message of a study claimed here finds it
claimed (or already reported) and is dropped as stale, and a study whose worker dies is
re-queued by the reconciler once its lease expires, exactly as without batching.

The images of all claimed studies go through the model as one batch
(:meth:`model.predict.Predictor.predict_batch`); then each study is built, written, recorded
and sent on its own, through the same path as a single study (:func:`worker.tasks._attempt`),
so one study's bad image, abstention or unbuildable SR ends only that study.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from celery import Celery
from pydicom import Dataset

from dicom_node.instance_file import read_instance
from dicom_node.selection import select_images
from observability import logs, metrics
from studydb.store import StudyStore
from worker import tasks
from worker.messages import JobInstance, ReportJob
from worker.settings import WorkerSettings
from worker.stages import Stage, StageTracker

logger = logging.getLogger(__name__)

#: the shortest pause between two looks for more queued studies while a batch fills
_POLL_SECONDS = 0.005


def claim_more(
    store: StudyStore,
    settings: WorkerSettings,
    *,
    owner: str,
    want: int,
    exclude: Sequence[str],
) -> list[ReportJob]:
    """Claim up to ``want`` queued studies for ``owner`` within ``D2R_BATCH_WAIT_MS``.

    Each is claimed at its queued generation with its own lease and counts one attempt, like
    a study claimed through its job message; the job is rebuilt from the database (the images
    :func:`dicom_node.selection.select_images` chooses, as the reconciler does).
    """
    deadline = time.monotonic() + settings.batch_wait_seconds
    seen = set(exclude)
    jobs: list[ReportJob] = []
    while True:
        for uid, generation in store.queued_studies(
            limit=want - len(jobs), exclude=seen, max_attempts=settings.node.max_attempts
        ):
            seen.add(uid)
            if not store.claim(
                uid,
                generation=generation,
                owner=owner,
                lease_seconds=min(settings.claim_lease_seconds, settings.task_time_limit),
                max_attempts=settings.node.max_attempts,
            ):
                continue  # another worker was first
            selection = select_images(store.instances(uid))
            if not selection.images:  # cannot happen for a queued study; never leave it held
                store.mark_failed(
                    uid, f"no image to report on: {selection.skip_reason}", owner=owner
                )
                continue
            jobs.append(
                ReportJob(
                    study_instance_uid=uid,
                    generation=generation,
                    instances=tuple(
                        JobInstance(i.sop_instance_uid, i.sop_class_uid, i.path)
                        for i in selection.images
                    ),
                    queued_at=time.time(),
                )
            )
        remaining = deadline - time.monotonic()
        if len(jobs) >= want or remaining <= 0:
            return jobs
        time.sleep(min(remaining, max(_POLL_SECONDS, settings.batch_wait_seconds / 4)))


class BatchHeartbeat:
    """Renew the lease of every study of a batch while it runs (one daemon thread).

    The same rules as :class:`worker.tasks.LeaseHeartbeat`: a killed worker stops renewing,
    and no claim is renewed past the task time limit after the batch was claimed. A study
    that is no longer this owner's (reported, failed) is dropped from the renewals.
    """

    def __init__(
        self,
        store: StudyStore,
        owner: str,
        settings: WorkerSettings,
        stages: Mapping[str, StageTracker],
    ) -> None:
        self._store = store
        self._owner = owner
        self._lease = settings.claim_lease_seconds
        self._every = settings.claim_heartbeat_seconds
        self._not_after = time.time() + settings.task_time_limit
        self._stages = dict(stages)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="d2r-batch-lease", daemon=True)

    def renew(self) -> None:
        """Renew every held claim once."""
        for uid, stages in list(self._stages.items()):
            try:
                held = self._store.renew_lease(
                    uid,
                    owner=self._owner,
                    lease_seconds=self._lease,
                    not_after=self._not_after,
                    stage=str(stages.current),
                )
            except Exception as exc:  # a database hiccup: the next beat tries again
                logger.warning("cannot renew the claim on study %s: %s", uid, exc)
                continue
            if not held:
                del self._stages[uid]

    def _run(self) -> None:
        while self._stages and not self._stop.wait(self._every):
            self.renew()

    def __enter__(self) -> BatchHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5.0)


def _read_study(job: ReportJob, max_pixel_bytes: int) -> dict[str, Dataset | Exception]:
    """Each image of ``job`` read from the spool (pixel data up to ``max_pixel_bytes``), or the
    error that stopped the reading."""
    read: dict[str, Dataset | Exception] = {}
    for inst in job.instances:
        try:
            read[inst.path] = read_instance(inst.path, max_pixel_bytes=max_pixel_bytes)
        except Exception as exc:  # replayed, and judged, by the per-study path
            read[inst.path] = exc
            break
    return read


def _replayed_read(read: Mapping[str, Dataset | Exception]) -> Callable[[str], Dataset]:
    def read_image(path: str) -> Dataset:
        value = read.get(path)
        if value is None:  # after the failed image: never asked for, as in the spool read
            raise FileNotFoundError(path)
        if isinstance(value, Exception):
            raise value
        return value

    return read_image


def _replayed_predict(
    outcome: Any, stage: str, stages: StageTracker
) -> Callable[[Sequence[Dataset]], Any]:
    def predict(_datasets: Sequence[Dataset]) -> Any:
        stages.enter(stage)  # where the batch left this study: a failure is recorded there
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return predict


def report_batch(
    ctx: tasks.WorkerContext,
    app: Celery,
    job: ReportJob,
    task_id: str,
    deliveries: tasks.Deliveries | None = None,
) -> str:
    """Body of ``d2r.report_study`` while ``D2R_BATCH_MAX`` > 1; returns what happened to
    ``job``'s own study (the other studies' outcomes are recorded and logged). As for one
    study, each reported study's first send runs in ``deliveries`` when given."""
    settings = ctx.settings
    store = ctx.store
    uid = job.study_instance_uid
    started = time.perf_counter()
    with logs.bind(study_instance_uid=uid, task_id=task_id):
        if not store.claim(
            uid,
            generation=job.generation,
            owner=task_id,
            lease_seconds=min(settings.claim_lease_seconds, settings.task_time_limit),
            max_attempts=settings.node.max_attempts,
        ):
            logger.info(
                "study %s generation %d: stale, already claimed or out of attempts; dropped",
                uid,
                job.generation,
            )
            return "stale"
    jobs = [job]
    with logs.bind(task_id=task_id):
        try:
            jobs += claim_more(
                store, settings, owner=task_id, want=settings.batch_max - 1, exclude=[uid]
            )
        except Exception as exc:  # the batch goes on with the studies already claimed
            logger.warning("cannot claim more studies for the batch: %s", exc)
        claim_seconds = (time.perf_counter() - started) / len(jobs)
        if len(jobs) > 1:
            logger.info(
                "batch of %d studies: %s", len(jobs), " ".join(j.study_instance_uid for j in jobs)
            )
        stages = {j.study_instance_uid: StageTracker() for j in jobs}
        with BatchHeartbeat(store, task_id, settings, stages):
            return _run_batch(ctx, app, jobs, task_id, stages, claim_seconds, deliveries)


def _run_batch(
    ctx: tasks.WorkerContext,
    app: Celery,
    jobs: Sequence[ReportJob],
    task_id: str,
    stages: Mapping[str, StageTracker],
    claim_seconds: float,
    deliveries: tasks.Deliveries | None = None,
) -> str:
    reads: dict[str, dict[str, Dataset | Exception]] = {}
    for job in jobs:
        with logs.bind(study_instance_uid=job.study_instance_uid):
            reads[job.study_instance_uid] = _read_study(job, ctx.settings.node.max_pixel_bytes)
    readable = [
        j for j in jobs if all(isinstance(v, Dataset) for v in reads[j.study_instance_uid].values())
    ]
    predictions: dict[str, Any] = {}
    left: dict[str, str] = {}  # the stage each study was in when the batch finished with it
    try:
        predictor = ctx.predictor
    except Exception as exc:  # each study records the load failure as it would alone
        predictions = {j.study_instance_uid: exc for j in readable}
        left = {j.study_instance_uid: Stage.PREDICT for j in readable}
    else:
        if readable:

            def on_stage(index: int, stage: str) -> None:
                uid = readable[index].study_instance_uid
                with logs.bind(study_instance_uid=uid):
                    stages[uid].enter(stage)

            batch_started = time.perf_counter()
            outcomes = predictor.predict_batch(
                [[reads[j.study_instance_uid][i.path] for i in j.instances] for j in readable],
                on_stage=on_stage,
            )
            metrics.observe_inference(time.perf_counter() - batch_started)
            for j, outcome in zip(readable, outcomes, strict=True):
                predictions[j.study_instance_uid] = outcome
                left[j.study_instance_uid] = str(stages[j.study_instance_uid].current)
    own = "stale"
    for n, job in enumerate(jobs):
        uid = job.study_instance_uid
        images: list[Dataset] = []
        read_image = _replayed_read(reads[uid])
        predict = None
        if uid in predictions:
            predict = _replayed_predict(predictions[uid], left[uid], stages[uid])
        with logs.bind(study_instance_uid=uid, task_id=task_id):

            def attempt(
                job: ReportJob = job,
                images: list[Dataset] = images,
                read_image: Callable[[str], Dataset] = read_image,
                predict: Any = predict,
            ) -> str:
                return tasks._attempt(
                    ctx,
                    app,
                    job,
                    task_id,
                    stages[job.study_instance_uid],
                    images,
                    deliveries,
                    read_image=read_image,
                    predict=predict,
                )

            try:
                outcome = tasks._settle_attempt(
                    ctx, app, job, task_id, stages[uid], images, claim_seconds, attempt
                )
            except Exception as exc:  # not even recorded (database down): the lease decides
                logger.warning(
                    "study %s: outcome not recorded (%s); its claim expires and the study is "
                    "queued again",
                    uid,
                    type(exc).__name__,
                )
                outcome = "unrecorded"
        if n == 0:
            own = outcome
        elif outcome not in ("reported", "abstained"):
            logger.info("study %s (batched): %s", uid, outcome)
    return own
