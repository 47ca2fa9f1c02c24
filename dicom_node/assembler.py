"""Study assembly and reconciliation: the node's background loop.

Every tick it
1. completes studies whose quiet period (or force timeout) elapsed, or whose last association
   was released ``release_grace_seconds`` ago with no other association of the study open
   (:meth:`dicom_node.studies.StudyStore.completion_due`): the eligible frontal images are
   chosen by :func:`dicom_node.selection.select_images`; a study with nothing eligible is
   ``skipped`` with the reason, the others are queued with ``enqueue_report``;
2. re-sends jobs the database says are unfinished: a processing claim whose short lease expired
   (its worker died) on every tick, a study queued too long (a lost broker message) at start and
   every ``reconcile_seconds``, so a restart, a killed worker or a lost message never loses a
   study. A claim that expired on the study's last allowed attempt (``D2R_MAX_ATTEMPTS``) is
   ``failed`` with the reason instead, and ``on_failed`` is told (audit log, metrics);
3. hands due deliveries (first attempts whose message was lost, and retries after their backoff)
   to ``enqueue_send``;
4. with a retention period (``D2R_SPOOL_RETENTION_HOURS``), removes the spooled instances and
   SRs of studies that are ``done`` or ``skipped`` and finished longer ago than that, recording a
   ``spool-purged`` event (:meth:`Assembler.purge_expired`, on the reconciler's cadence). Any
   other state keeps its files; so do instances received after the study finished.
5. at start and on the reconciler's cadence, removes the files in the spool's ``tmp/`` that
   nobody writes any more (:meth:`dicom_node.spool.Spool.sweep_tmp`: a crash, or an
   association whose end was missed, left them), logging how many.

The queue itself is injected (``enqueue_report``, ``enqueue_send``): this module never imports
Celery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from dicom_node.selection import select_images
from dicom_node.spool import Spool
from dicom_node.studies import (
    DONE,
    SKIPPED,
    InstanceRecord,
    StudyStore,
    events_table,
    studies_table,
)

logger = logging.getLogger(__name__)

EnqueueReport = Callable[[str, int, Sequence[InstanceRecord]], None]
EnqueueSend = Callable[[str, str], None]
#: (StudyInstanceUID, stage) of a study the reconciler failed after its last attempt
OnFailed = Callable[[str, str], None]

#: event kind recorded when a study's files leave the spool
SPOOL_PURGED = "spool-purged"
_RETAINED_STATES = (DONE, SKIPPED)


def retention_candidates(store: StudyStore, cutoff: float, *, limit: int = 100) -> list[str]:
    """``done``/``skipped`` studies finished before ``cutoff`` and not purged since."""
    s = studies_table.c
    e = events_table.c
    purged_since = sa.select(e.id).where(
        e.study_instance_uid == s.study_instance_uid,
        e.kind == SPOOL_PURGED,
        e.at >= s.finished_at,
    )
    query = (
        sa.select(s.study_instance_uid)
        .where(
            s.state.in_(_RETAINED_STATES),
            s.finished_at.is_not(None),
            s.finished_at < cutoff,
            ~sa.exists(purged_since),
        )
        .order_by(s.finished_at)
        .limit(limit)
    )
    with store.engine.connect() as conn:
        return [str(r[0]) for r in conn.execute(query).all()]


@dataclass(frozen=True)
class AssemblerConfig:
    quiet_seconds: float = 10.0
    force_seconds: float = 600.0
    #: complete a study this long after the association that brought its last instance was
    #: released, when no other association of it is open (None: the quiet period only)
    release_grace_seconds: float | None = 2.0
    reconcile_seconds: float = 30.0
    #: a queued study whose job has not been claimed for this long is queued again
    requeue_after: float = 300.0
    tick_seconds: float = 0.5
    #: remove a finished study's spooled files this long after it finished (0: never)
    retention_seconds: float = 0.0
    #: worker attempts per study before an expired claim fails it
    max_attempts: int = 3


class Assembler:
    """Completion timers, the reconciler and delivery retries over a :class:`StudyStore`."""

    def __init__(
        self,
        store: StudyStore,
        config: AssemblerConfig,
        *,
        enqueue_report: EnqueueReport,
        enqueue_send: EnqueueSend,
        spool: Spool | None = None,
        on_failed: OnFailed | None = None,
    ) -> None:
        self.on_failed = on_failed
        self.store = store
        self.config = config
        self.enqueue_report = enqueue_report
        self.enqueue_send = enqueue_send
        self.spool = spool
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._wake_lock = threading.Lock()
        self._wake_at = float("inf")
        self._thread: threading.Thread | None = None
        self._last_reconcile = float("-inf")

    def complete_due(self, now: float | None = None) -> list[str]:
        """Queue or skip every complete study; returns the queued UIDs."""
        queued = []
        for uid, why in self.store.completion_due(
            quiet_seconds=self.config.quiet_seconds,
            force_seconds=self.config.force_seconds,
            release_grace_seconds=self.config.release_grace_seconds,
            now=now,
        ):
            selection = select_images(self.store.instances(uid))
            if selection.skip_reason is not None:
                logger.info("study %s skipped: %s", uid, selection.skip_reason)
                self.store.mark_skipped(uid, selection.skip_reason)
                continue
            generation = self.store.mark_queued(uid, reason=f"study complete ({why})")
            if generation:
                self._enqueue(uid, generation, selection.images)
                queued.append(uid)
        return queued

    def reap_expired(self, now: float | None = None) -> list[str]:
        """Fail studies whose claim expired on their last attempt; re-send the others' jobs."""
        for uid in self.store.fail_exhausted(max_attempts=self.config.max_attempts, now=now):
            view = self.store.get(uid)
            stage = (view.stage if view is not None else None) or "processing"
            logger.warning("study %s failed: its claim expired on the last attempt", uid)
            if self.on_failed is not None:
                self.on_failed(uid, stage)
        return self.reconcile(now, requeue_after=float("inf"))

    def reconcile(
        self, now: float | None = None, *, requeue_after: float | None = None
    ) -> list[str]:
        """Re-send the jobs of studies the database says are unfinished."""
        again = []
        for uid, generation in self.store.requeue_candidates(
            requeue_after=self.config.requeue_after if requeue_after is None else requeue_after,
            max_attempts=self.config.max_attempts,
            now=now,
        ):
            selection = select_images(self.store.instances(uid))
            if selection.skip_reason is not None or not selection.images:
                continue
            self.store.touch_queued(uid, detail=f"job re-sent by the reconciler (gen {generation})")
            self._enqueue(uid, generation, selection.images)
            again.append(uid)
        return again

    def send_due(self, now: float | None = None) -> list[tuple[str, str]]:
        due = self.store.due_deliveries(requeue_after=self.config.requeue_after, now=now)
        for uid, dest in due:
            self.store.mark_delivery_enqueued(uid, dest)
            self.enqueue_send(uid, dest)
        return due

    def purge_expired(self, now: float | None = None) -> list[str]:
        """Apply the retention period; returns the studies whose files were removed."""
        if self.spool is None or self.config.retention_seconds <= 0:
            return []
        now = time.time() if now is None else now
        cutoff = now - self.config.retention_seconds
        purged = []
        for uid in retention_candidates(self.store, cutoff):
            view = self.store.get(uid)  # re-read: a late instance may have re-opened it
            if view is None or view.state not in _RETAINED_STATES:
                continue
            if view.finished_at is None or view.finished_at >= cutoff:
                continue
            finished = view.finished_at
            paths = [
                i.path for i in self.store.instances(uid) if i.received_at.timestamp() <= finished
            ]
            files, size = self.spool.remove_study_files(uid, [*paths, *view.result_paths])
            hours = self.config.retention_seconds / 3600
            self.store.add_event(
                uid,
                SPOOL_PURGED,
                f"retention {hours:g} h: removed {files} file(s), {size} bytes from the spool",
            )
            logger.info("study %s: %d spooled file(s) removed after retention", uid, files)
            purged.append(uid)
        return purged

    def sweep_tmp(self, now: float | None = None) -> int:
        """Remove the spool's abandoned temporary files; returns how many."""
        if self.spool is None:
            return 0
        files, _ = self.spool.sweep_tmp(now=now)
        return files

    def _enqueue(self, uid: str, generation: int, images: Sequence[InstanceRecord]) -> None:
        self.enqueue_report(uid, generation, images)
        logger.info("study %s queued (generation %d, %d image(s))", uid, generation, len(images))

    def tick(self) -> None:
        now = time.time()
        self.complete_due(now)
        if self.reap_expired(now):
            logger.warning("re-queued the study(ies) of a lost worker")
        if now - self._last_reconcile >= self.config.reconcile_seconds:
            self._last_reconcile = now
            requeued = self.reconcile(now)
            if requeued:
                logger.warning("reconciler re-queued %d study(ies)", len(requeued))
            self.purge_expired(now)
            self.sweep_tmp(now)
        self.send_due(now)

    def wake_after(self, seconds: float) -> None:
        """Run a tick ``seconds`` from now as well (an association was released: the study may
        complete then), rather than up to one tick later."""
        with self._wake_lock:
            self._wake_at = min(self._wake_at, time.monotonic() + seconds)
        self._wake.set()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            with self._wake_lock:
                until = min(deadline, self._wake_at)
                self._wake.clear()
            remaining = until - time.monotonic()
            if remaining <= 0:
                with self._wake_lock:
                    if self._wake_at <= time.monotonic():
                        self._wake_at = float("inf")
                return
            self._wake.wait(remaining)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a broker or database hiccup must not stop the loop
                logger.exception("assembler tick failed; retrying")
                self._stop.wait(min(5.0, self.config.reconcile_seconds))
            self._sleep(self.config.tick_seconds)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="d2r-assembler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
