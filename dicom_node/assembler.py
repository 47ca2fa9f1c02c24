"""Study assembly and reconciliation: the node's background loop.

Every tick it
1. completes studies whose quiet period (or force timeout) elapsed, or whose last association
   was released ``release_grace_seconds`` ago with no other association of the study open
   (:meth:`studydb.store.StudyStore.completion_due`): the eligible frontal images are
   chosen by :func:`dicom_node.selection.select_images`; a study with nothing eligible is
   ``skipped`` with the reason, the others are queued with ``enqueue_report``;
   queued studies whose priority rose after their job was sent (``d2r retry --priority``,
   or a routine study aged past ``priority_aging_seconds``) have their job sent again at the
   new priority (:meth:`Assembler.promote_queued`);
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
   association whose end was missed, left them), logging how many;
6. records this node's heartbeat every ``heartbeat_seconds`` and expires the open associations
   of any node silent for ``node_expire_seconds`` (:meth:`StudyStore.expire_silent_nodes`);
7. at start and every ``spool_check_seconds``, compares the spool with the database
   (:meth:`Assembler.check_spool`): a first copy without a row, older than
   :data:`UNRECORDED_GRACE_SECONDS` (its request was refused while the database was down, or
   the node died between the rename and the record), is recorded, so the study is reported;
   one that cannot be read is reported as an event.

Several nodes on one database each run an assembler. Every step is a conditional update in
the database (:mod:`studydb`), so a study is queued, re-sent or handed to a
delivery by one node only; retention and the spool check run on one node at a time, under a
duty lease.

Broker faults: a job that cannot be handed to the broker stays in memory and is sent again on
the next tick. When the broker's identity changes (``broker_identity``: a Redis restart or a
Sentinel failover, which may lose the messages it held), every queued study's job and every
pending delivery is sent again at once instead of after ``requeue_after``: a worker drops the
copy of a job whose study is already claimed. For :data:`BROKER_INCIDENT_SECONDS` after any
broker incident the reconciler also re-sends what stayed queued for
:data:`BROKER_INCIDENT_REQUEUE_SECONDS`, for losses that show only later.

The queue itself is injected (``enqueue_report``, ``enqueue_send``): this module never imports
Celery.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dicom_node.errors import InstanceRejected, NodeError
from dicom_node.instance_file import read_instance_header
from dicom_node.metadata import header_from_dataset
from dicom_node.selection import select_images
from dicom_node.spool import Spool, printable
from studydb.records import RETAINED_STATES, SPOOL_PURGED, InstanceRecord
from studydb.store import StudyStore

logger = logging.getLogger(__name__)

EnqueueReport = Callable[[str, int, Sequence[InstanceRecord]], None]
EnqueueSend = Callable[[str, str], None]
#: (StudyInstanceUID, stage) of a study the reconciler failed after its last attempt
OnFailed = Callable[[str, str], None]

#: event kind of an instance found in the spool without a row, and recorded
SPOOL_RECOVERED = "spool-recovered"
#: event kind of a file in the spool without a row that cannot be read
SPOOL_UNRECORDED = "spool-unrecorded"
#: a first copy without a row is recorded by the spool check once it is this old (a receiver
#: records its instance milliseconds after the rename; a younger file may be in that window)
UNRECORDED_GRACE_SECONDS = 120.0
#: the duties one node at a time runs, each under a lease of a few reconciler periods
DUTY_HOUSEKEEPING = "housekeeping"
#: after a broker incident (unreachable, restarted, failed over) the reconciler re-sends jobs
#: queued this long, instead of ``requeue_after``, for :data:`BROKER_INCIDENT_SECONDS`: a
#: failover's losses are not always visible when it is detected (a demoted master resyncs later)
BROKER_INCIDENT_REQUEUE_SECONDS = 60.0
BROKER_INCIDENT_SECONDS = 300.0


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
    #: this node's name (``D2R_NODE_NAME``)
    node: str = ""
    #: how often the node records its heartbeat
    heartbeat_seconds: float = 5.0
    #: a node silent this long has its open associations expired
    node_expire_seconds: float = 30.0
    #: how often the spool is compared with the database (and once at start)
    spool_check_seconds: float = 3600.0
    #: a routine or low study queued this long is served as urgent (0: never)
    priority_aging_seconds: float = 0.0
    #: the quiet period of urgent and stat studies (None: ``quiet_seconds``)
    urgent_quiet_seconds: float | None = None


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
        broker_identity: Callable[[], str | None] | None = None,
    ) -> None:
        self.on_failed = on_failed
        self.broker_identity = broker_identity
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
        self._last_heartbeat = float("-inf")
        self._started_recorded = False
        self._last_spool_check = float("-inf")
        self._last_broker_check = float("-inf")
        self._broker: str | None = None
        self._broker_incident_until = float("-inf")
        #: jobs the broker did not take: (generation, images) by study, sent again each tick
        self._unsent: dict[str, tuple[int, Sequence[InstanceRecord]]] = {}
        self._unsent_sends: set[tuple[str, str]] = set()
        self._reported_files: set[str] = set()

    def complete_due(self, now: float | None = None) -> list[str]:
        """Queue or skip every complete study; returns the queued UIDs."""
        queued = []
        for uid, why in self.store.completion_due(
            quiet_seconds=self.config.quiet_seconds,
            force_seconds=self.config.force_seconds,
            release_grace_seconds=self.config.release_grace_seconds,
            now=now,
            urgent_quiet_seconds=self.config.urgent_quiet_seconds,
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

    def promote_queued(self, now: float | None = None) -> list[str]:
        """Send again, at their new priority, the jobs of queued studies whose priority rose
        since their job was sent (an operator's ``d2r retry --priority``, or the starvation
        guard's ageing); the first message finds the study claimed and is dropped."""
        promoted = []
        for uid, generation in self.store.promotion_candidates(
            aging_seconds=self.config.priority_aging_seconds, now=now
        ):
            selection = select_images(self.store.instances(uid))
            if selection.skip_reason is not None or not selection.images:
                continue
            self._enqueue(uid, generation, selection.images)
            promoted.append(uid)
        return promoted

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
        now = time.time() if now is None else now
        for uid, generation in self.store.requeue_candidates(
            requeue_after=self.config.requeue_after if requeue_after is None else requeue_after,
            max_attempts=self.config.max_attempts,
            now=now,
        ):
            selection = select_images(self.store.instances(uid))
            if selection.skip_reason is not None or not selection.images:
                continue
            after = self.config.requeue_after if requeue_after is None else requeue_after
            if not self.store.touch_queued(
                uid,
                detail=f"job re-sent by the reconciler (gen {generation})",
                generation=generation,
                requeue_after=after,
                now=now,
            ):
                continue  # another node re-sent it, or a worker claimed it meanwhile
            self._enqueue(uid, generation, selection.images)
            again.append(uid)
        return again

    def send_due(
        self, now: float | None = None, *, requeue_after: float | None = None
    ) -> list[tuple[str, str]]:
        """Hand each due delivery to the queue (one node wins each); returns those handed."""
        now = time.time() if now is None else now
        after = self.config.requeue_after if requeue_after is None else requeue_after
        handed = []
        for uid, dest in self.store.due_deliveries(requeue_after=after, now=now):
            if not self.store.mark_delivery_enqueued(uid, dest, requeue_after=after, now=now):
                continue
            self._send(uid, dest)
            handed.append((uid, dest))
        return handed

    def _send(self, uid: str, dest: str) -> None:
        try:
            self.enqueue_send(uid, dest)
        except Exception as exc:  # the broker is down: sent again on the next tick
            if not self._unsent_sends:
                logger.warning("broker unreachable (%s); sends are kept and sent again", exc)
            self._unsent_sends.add((uid, dest))
            self._broker_incident()
        else:
            self._unsent_sends.discard((uid, dest))

    def purge_expired(self, now: float | None = None) -> list[str]:
        """Apply the retention period; returns the studies whose files were removed."""
        if self.spool is None or self.config.retention_seconds <= 0:
            return []
        now = time.time() if now is None else now
        cutoff = now - self.config.retention_seconds
        purged = []
        for uid in self.store.retention_candidates(cutoff):
            view = self.store.get(uid)  # re-read: a late instance may have re-opened it
            if view is None or view.state not in RETAINED_STATES:
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
        try:
            self.enqueue_report(uid, generation, images)
        except Exception as exc:  # the broker is down: the job waits here for the next tick
            if not self._unsent:
                logger.warning("broker unreachable (%s); jobs are kept and sent again", exc)
            self._unsent[uid] = (generation, images)
            self._broker_incident()
            return
        self._unsent.pop(uid, None)
        logger.info("study %s queued (generation %d, %d image(s))", uid, generation, len(images))

    def resend_unsent(self) -> int:
        """Hand the broker the jobs and sends it refused earlier; returns how many it took."""
        if not self._unsent and not self._unsent_sends:
            return 0
        before = len(self._unsent) + len(self._unsent_sends)
        for uid, (generation, images) in list(self._unsent.items()):
            self._enqueue(uid, generation, images)
        for uid, dest in sorted(self._unsent_sends):
            self._send(uid, dest)
        after = len(self._unsent) + len(self._unsent_sends)
        if before > after:
            logger.info("broker reachable again: %d job(s) and send(s) handed over", before - after)
        return before - after

    def check_broker(self, now: float | None = None) -> bool:
        """Re-send every queued job and pending delivery when the broker's identity changed
        (it restarted or failed over, and may have lost what it held); returns whether it did."""
        if self.broker_identity is None:
            return False
        try:
            identity = self.broker_identity()
        except Exception:  # unreachable: the identity is read again on the next tick
            self._broker_incident()
            return False
        if identity is None:
            return False
        previous, self._broker = self._broker, identity
        if previous is None or previous == identity:
            return False
        self._broker_incident()
        logger.warning("the broker restarted or failed over: re-sending queued jobs and sends")
        requeued = self.reconcile(now, requeue_after=0.0)
        sends = self.send_due(now, requeue_after=0.0)
        logger.warning(
            "after the broker change: %d job(s) and %d send(s) re-sent", len(requeued), len(sends)
        )
        return True

    def _broker_incident(self) -> None:
        self._broker_incident_until = time.monotonic() + BROKER_INCIDENT_SECONDS

    def _requeue_after(self) -> float:
        """``requeue_after``, shortened for a while after a broker incident."""
        if time.monotonic() < self._broker_incident_until:
            return min(self.config.requeue_after, BROKER_INCIDENT_REQUEUE_SECONDS)
        return self.config.requeue_after

    # ------------------------------------------------------------ several nodes
    def register(self) -> None:
        """Record this node's start; expire the associations its previous run left open."""
        if not self.config.node:
            return
        host, pid = _host(), os.getpid()
        for seen in self.store.nodes():
            if (
                seen.name == self.config.node
                and (seen.host, seen.pid) != (host, pid)
                and time.time() - seen.heartbeat_at < self.config.node_expire_seconds
            ):
                logger.warning(
                    "node name %s was alive %.0f s ago on host %s (pid %d): if that node still "
                    "runs, give each node its own D2R_NODE_NAME",
                    printable(self.config.node),
                    time.time() - seen.heartbeat_at,
                    printable(seen.host),
                    seen.pid,
                )
        left = self.store.register_node(self.config.node, host=host, pid=pid)
        if left:
            logger.warning(
                "expired the open associations of %d study(ies) left by this node's last run",
                len(left),
            )
        self._last_heartbeat = time.monotonic()

    def beat(self, now: float | None = None) -> None:
        """Record the heartbeat when due; expire the associations of silent nodes."""
        if not self.config.node:
            return
        if time.monotonic() - self._last_heartbeat < self.config.heartbeat_seconds:
            return
        if not self.store.heartbeat(self.config.node):
            self.register()  # its row was removed: record the node again
        self._last_heartbeat = time.monotonic()
        for node, studies in self.store.expire_silent_nodes(
            expire_seconds=self.config.node_expire_seconds, now=now
        ).items():
            logger.warning(
                "node %s is silent: expired its open associations of %d study(ies)",
                printable(node),
                len(studies),
            )

    def _housekeeping(self) -> bool:
        """Whether this node holds the housekeeping duty (always, without a node name)."""
        if not self.config.node:
            return True
        return self.store.hold_duty(
            DUTY_HOUSEKEEPING, self.config.node, seconds=3 * self.config.reconcile_seconds + 30
        )

    def check_spool(self, now: float | None = None) -> tuple[int, int]:
        """Record the first copies in the spool that have no row; returns (recorded, unreadable).

        Files younger than :data:`UNRECORDED_GRACE_SECONDS` are left to the next check (their
        receiver may be about to record them).
        """
        if self.spool is None:
            return 0, 0
        now = time.time() if now is None else now
        recorded = unreadable = 0
        known: dict[str, set[str]] = {}
        for path in self.spool.instance_files():
            study_dir = path.parent.name
            if study_dir not in known:
                known[study_dir] = self.store.recorded_paths_under(path.parent)
            if str(path) in known[study_dir] or str(path) in self._reported_files:
                continue
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue  # removed meanwhile
            if now - mtime < UNRECORDED_GRACE_SECONDS:
                continue
            if self._recover(path, mtime):
                recorded += 1
            else:
                unreadable += 1
        if recorded or unreadable:
            logger.warning(
                "spool check: %d instance(s) found without a record were recorded, %d cannot be "
                "read",
                recorded,
                unreadable,
            )
        return recorded, unreadable

    def _recover(self, path: Path, mtime: float) -> bool:
        """Record one first copy found without a row; False (and an event) when unreadable."""
        try:
            ds = read_instance_header(path)
            header = header_from_dataset(ds)
            sha = self.spool.data_set_sha256(path) if self.spool is not None else None
            meta = ds.file_meta
            record = InstanceRecord(
                study_instance_uid=header.study_instance_uid,
                series_instance_uid=header.series_instance_uid,
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")),
                modality=header.modality,
                body_part_examined=header.body_part_examined,
                view_position=header.view_position,
                series_description=header.series_description,
                path=str(path),
                size=path.stat().st_size,
                sha256=sha or "",
                calling_ae_title=str(meta.get("SourceApplicationEntityTitle", "") or "").strip()[
                    :16
                ],
                received_at=datetime.fromtimestamp(mtime, UTC),
                received_by=self.config.node,
            )
        except (InstanceRejected, NodeError, OSError) as exc:
            self._reported_files.add(str(path))
            self.store.add_event(
                None,
                SPOOL_UNRECORDED,
                f"{printable(path.parent.name)}/{printable(path.name)}: in the spool without a "
                f"record and unreadable ({type(exc).__name__}); left in place",
            )
            return False
        outcome = self.store.record_instance(record, outcome="stored")
        self.store.add_event(
            record.study_instance_uid,
            SPOOL_RECOVERED,
            f"instance {record.sop_instance_uid}: in the spool without a record; {outcome} by "
            "the spool check",
        )
        return True

    def tick(self) -> None:
        now = time.time()
        self.resend_unsent()
        self.beat(now)
        if time.monotonic() - self._last_broker_check >= 2.0:
            self._last_broker_check = time.monotonic()
            self.check_broker(now)
        self.complete_due(now)
        self.promote_queued(now)
        if self.reap_expired(now):
            logger.warning("re-queued the study(ies) of a lost worker")
        if now - self._last_reconcile >= self.config.reconcile_seconds:
            self._last_reconcile = now
            requeued = self.reconcile(now, requeue_after=self._requeue_after())
            if requeued:
                logger.warning("reconciler re-queued %d study(ies)", len(requeued))
            self.sweep_tmp(now)
            if self._housekeeping():
                self.purge_expired(now)
                if now - self._last_spool_check >= self.config.spool_check_seconds:
                    self._last_spool_check = now
                    self.check_spool(now)
        self.send_due(now, requeue_after=self._requeue_after())

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

    def record_start(self) -> None:
        """Record this node's start (:meth:`register`) unless done already; a database that does
        not answer yet leaves it to the first heartbeat.

        The node calls it before its listeners accept associations, so the associations its
        previous run left are expired before any of this run's are counted.
        """
        if self._started_recorded:
            return
        try:
            self.register()
        except Exception:  # the first heartbeat registers it once the database answers
            logger.exception("could not record this node's start; retrying with its heartbeat")
            return
        self._started_recorded = True

    def run(self) -> None:
        self.record_start()
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


def _host() -> str:
    return socket.gethostname()[:255]
