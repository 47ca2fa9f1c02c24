"""Keep a task's claims alive while it works: one thread renews the lease of each claimed study.

A worker killed with -9 stops renewing, so its claims expire within one lease
(``D2R_CLAIM_LEASE_SECONDS``) and the node's reconciler queues the studies again. Renewal never
extends a claim beyond the task time limit after the claims were taken: a hung worker still
lets them expire.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

from studydb.store import StudyStore
from worker.settings import WorkerSettings
from worker.stages import StageTracker

__all__ = ["LeaseHeartbeat"]

#: the logger these lines have always come from (operators' log filters name it)
logger = logging.getLogger("worker.tasks")


class LeaseHeartbeat:
    """Renew the lease of every study in ``stages`` every ``D2R_CLAIM_HEARTBEAT_SECONDS``, with
    the stage it is in, from a daemon thread, while the ``with`` block runs.

    A study that is no longer ``owner``'s (reported, failed, queued again) is dropped from the
    renewals; the thread ends when none is left.
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
        self._thread = threading.Thread(target=self._run, name="d2r-lease", daemon=True)

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

    def __enter__(self) -> LeaseHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
