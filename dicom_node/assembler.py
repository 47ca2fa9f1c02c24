"""Study assembly and reconciliation: the node's background loop.

Every tick it
1. completes studies whose quiet period (or force timeout) elapsed: the eligible frontal images are
   chosen by :func:`dicom_node.selection.select_images`; a study with nothing eligible is
   ``skipped`` with the reason, the others are queued with ``enqueue_report``;
2. re-sends jobs the database says are unfinished (queued too long, or a processing lease that
   expired) — at start and every ``reconcile_seconds`` — so a restart or a lost broker message
   never loses a study;
3. hands due deliveries (first attempts whose message was lost, and retries after their backoff)
   to ``enqueue_send``.

The queue itself is injected (``enqueue_report``, ``enqueue_send``): this module never imports
Celery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dicom_node.selection import select_images
from dicom_node.studies import InstanceRecord, StudyStore

logger = logging.getLogger(__name__)

EnqueueReport = Callable[[str, int, Sequence[InstanceRecord]], None]
EnqueueSend = Callable[[str, str], None]


@dataclass(frozen=True)
class AssemblerConfig:
    quiet_seconds: float = 10.0
    force_seconds: float = 600.0
    reconcile_seconds: float = 30.0
    #: a queued study whose job has not been claimed for this long is queued again
    requeue_after: float = 300.0
    tick_seconds: float = 0.5


class Assembler:
    """Completion timers, the reconciler and delivery retries over a :class:`StudyStore`."""

    def __init__(
        self,
        store: StudyStore,
        config: AssemblerConfig,
        *,
        enqueue_report: EnqueueReport,
        enqueue_send: EnqueueSend,
    ) -> None:
        self.store = store
        self.config = config
        self.enqueue_report = enqueue_report
        self.enqueue_send = enqueue_send
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_reconcile = float("-inf")

    def complete_due(self, now: float | None = None) -> list[str]:
        """Queue or skip every study whose quiet period elapsed; returns the queued UIDs."""
        queued = []
        for uid in self.store.due_for_completion(
            quiet_seconds=self.config.quiet_seconds,
            force_seconds=self.config.force_seconds,
            now=now,
        ):
            selection = select_images(self.store.instances(uid))
            if selection.skip_reason is not None:
                logger.info("study %s skipped: %s", uid, selection.skip_reason)
                self.store.mark_skipped(uid, selection.skip_reason)
                continue
            generation = self.store.mark_queued(uid)
            if generation:
                self._enqueue(uid, generation, selection.images)
                queued.append(uid)
        return queued

    def reconcile(self, now: float | None = None) -> list[str]:
        """Re-send the jobs of studies the database says are unfinished."""
        again = []
        for uid, generation in self.store.requeue_candidates(
            requeue_after=self.config.requeue_after, now=now
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

    def _enqueue(self, uid: str, generation: int, images: Sequence[InstanceRecord]) -> None:
        self.enqueue_report(uid, generation, images)
        logger.info("study %s queued (generation %d, %d image(s))", uid, generation, len(images))

    def tick(self) -> None:
        now = time.time()
        self.complete_due(now)
        if now - self._last_reconcile >= self.config.reconcile_seconds:
            self._last_reconcile = now
            requeued = self.reconcile(now)
            if requeued:
                logger.warning("reconciler re-queued %d study(ies)", len(requeued))
        self.send_due(now)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a broker or database hiccup must not stop the loop
                logger.exception("assembler tick failed; retrying")
                self._stop.wait(min(5.0, self.config.reconcile_seconds))
            self._stop.wait(self.config.tick_seconds)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="d2r-assembler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
