"""Claims in the study database: a task's own study, and the queued studies that join its batch.

Every claim is the ordinary per-study claim with its own lease (:meth:`StudyStore.claim`), and
counts one attempt, so the database alone decides who reports a study: the job message of a
study claimed into a batch finds it claimed (or already reported) and is dropped as stale, and
a study whose worker dies is queued again by the reconciler once its lease expires.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from dicom_node.selection import select_images
from studydb.store import StudyStore
from worker.messages import JobInstance, ReportJob
from worker.settings import WorkerSettings

__all__ = ["claim", "claim_more"]

#: the shortest pause between two looks for more queued studies while a batch fills
POLL_SECONDS = 0.005


def claim(
    store: StudyStore, settings: WorkerSettings, uid: str, generation: int, *, owner: str
) -> bool:
    """Claim study ``uid`` at ``generation`` for ``owner``, with a lease of
    ``D2R_CLAIM_LEASE_SECONDS`` (at most the task time limit), while it has attempts left."""
    return store.claim(
        uid,
        generation=generation,
        owner=owner,
        lease_seconds=min(settings.claim_lease_seconds, settings.task_time_limit),
        max_attempts=settings.node.max_attempts,
    )


def claim_more(
    store: StudyStore,
    settings: WorkerSettings,
    *,
    owner: str,
    want: int,
    exclude: Sequence[str],
) -> list[ReportJob]:
    """Claim up to ``want`` queued studies for ``owner`` within ``D2R_BATCH_WAIT_MS``: the
    highest priority first, the longest queued first within one priority (a routine or low study
    queued ``D2R_PRIORITY_AGING_SECONDS`` counts as urgent).

    Each is claimed at its queued generation (:func:`claim`); the job is rebuilt from the
    database (the images :func:`dicom_node.selection.select_images` chooses, as the reconciler
    does).
    """
    deadline = time.monotonic() + settings.batch_wait_seconds
    seen = set(exclude)
    jobs: list[ReportJob] = []
    while True:
        for uid, generation in store.queued_studies(
            limit=want - len(jobs),
            exclude=seen,
            max_attempts=settings.node.max_attempts,
            aging_seconds=settings.node.priority_aging_seconds,
        ):
            seen.add(uid)
            if not claim(store, settings, uid, generation, owner=owner):
                continue  # another worker was first
            job = _job(store, uid, generation, owner)
            if job is not None:
                jobs.append(job)
        remaining = deadline - time.monotonic()
        if len(jobs) >= want or remaining <= 0:
            return jobs
        time.sleep(min(remaining, max(POLL_SECONDS, settings.batch_wait_seconds / 4)))


def _job(store: StudyStore, uid: str, generation: int, owner: str) -> ReportJob | None:
    """The job of claimed study ``uid``, or None (then the study is failed, never left held)."""
    selection = select_images(store.instances(uid))
    if not selection.images:  # cannot happen for a queued study
        store.mark_failed(uid, f"no image to report on: {selection.skip_reason}", owner=owner)
        return None
    return ReportJob(
        study_instance_uid=uid,
        generation=generation,
        instances=tuple(
            JobInstance(i.sop_instance_uid, i.sop_class_uid, i.path) for i in selection.images
        ),
        queued_at=time.time(),
    )
