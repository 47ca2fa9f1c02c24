"""A node process (``d2r node``, and the node half of ``d2r serve``) as one object.

:class:`Node` composes what a node runs over one study database and one spool: the DICOM
listener (and its extra listener processes), the STOW-RS receiver, the assembler with its
reconciler, the audit log, the HTTP endpoint (with the FHIR endpoint for signed reports,
:mod:`feedback.fhir`) and, when ``D2R_HL7_LISTEN_PORT`` is set, the MLLP listener for signed
reports (:mod:`feedback.hl7_listener`); SRs the PACS sends as signed reports go through the
listeners' report intake (:func:`cli.runtime.report_intake`). :meth:`Node.start` brings them
up in order, :meth:`Node.stop` takes them down in reverse; each part is built by a named step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from cli.listeners import ListenerProcesses
from cli.runtime import multiprocess_dir, start_http, start_listener, without_credentials

__all__ = ["Node", "run_node"]

logger = logging.getLogger("d2r")


class Node:
    """One node: listener, STOW-RS, assembler and HTTP endpoint on one study database.

    Parameters
    ----------
    env : dict
        The merged configuration (config file overridden by the environment).
    default_broker : str or None
        The broker when ``D2R_BROKER_URL`` is unset (``d2r serve``: the embedded one).
    extra_ready : mapping, optional
        More readiness checks for ``/readyz`` (``d2r serve``: the worker and its model).
    extra_details : mapping, optional
        Facts ``/readyz`` tells an authenticated caller (``d2r serve``: the worker's backend).
    """

    def __init__(
        self,
        env: dict[str, str],
        *,
        default_broker: str | None,
        extra_ready: Mapping[str, Callable[[], None]] | None = None,
        extra_details: Mapping[str, Callable[[], str]] | None = None,
    ) -> None:
        from feedback.settings import FeedbackSettings
        from observability.settings import ObservabilitySettings
        from worker.settings import WorkerSettings

        self.env = env
        self.settings = WorkerSettings.from_env(env, default_broker=default_broker)
        self.obs = ObservabilitySettings.from_env(env)
        self.feedback = FeedbackSettings.from_env(env)
        self.config = self.settings.node
        self.extra_ready = dict(extra_ready or {})
        self.extra_details = dict(extra_details or {})
        self._node_lock: IO[bytes] | None = None
        self.store: Any = None
        self.spool: Any = None
        self.app: Any = None
        self.assembler: Any = None
        self.audit: Any = None
        self.listener_audit: Any = None
        self.server: Any = None
        self.listeners: ListenerProcesses | None = None
        self.http: Any = None
        self.hl7: Any = None
        self.scorer: Any = None

    def run(self, stop: threading.Event) -> None:
        """Start, serve until ``stop`` is set, then stop."""
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()

    def start(self) -> None:
        """Open the database and the spool, then start every part of the node."""
        self._open_database()
        self._open_spool_and_queue()
        self._build_assembler()
        self.assembler.record_start()  # before the listeners count this run's associations
        self._start_listeners()
        self._start_hl7()
        self._start_scorer()
        self._start_http()
        node = self.config
        logger.info(
            "node %s listening as %s on %s:%d (%d listener process%s); spool %s; broker %s",
            node.node_name,
            node.ae_title,
            node.host,
            node.port,
            node.listener_processes,
            "es" if node.listener_processes > 1 else "",
            node.spool_dir,
            without_credentials(self.settings.broker_url),
        )
        self.assembler.start()

    def stop(self) -> None:
        """Stop every part, the HTTP endpoint first and the database last."""
        if self.http is not None:
            self.http.stop()
        if self.hl7 is not None:
            self.hl7.stop()
        if self.scorer is not None:
            self.scorer.stop()
        if self.listeners is not None:
            self.listeners.stop()
        if self.server is not None:
            self.server.shutdown()
        if self.assembler is not None:
            self.assembler.stop()
        if self.store is not None:
            self.store.close()
        if self.audit is not None:
            self.audit.close()
        if self._node_lock is not None:
            self._node_lock.close()
        logger.info("node stopped")

    # ----------------------------------------------------------------- steps
    def _open_database(self) -> None:
        from cli.exposure import exposure_warnings
        from studydb.engine import hold_single_node_lock
        from studydb.store import StudyStore

        node = self.config
        node.spool_dir.mkdir(parents=True, exist_ok=True)
        self._node_lock = hold_single_node_lock(node.database_url)  # SQLite: one node only
        self.store = StudyStore(
            node.database_url,
            auto_upgrade=node.db_auto_upgrade,
            retry_seconds=node.db_retry_seconds,
        )
        # once, by a node that starts (its database usable): listener processes never get here
        for warning in exposure_warnings(node, self.obs):
            logger.warning("%s", warning)

    def _open_spool_and_queue(self) -> None:
        from dicom_node.spool import Spool
        from worker.celery_app import create_app

        self.spool = Spool(self.config.spool_dir, min_free_bytes=self.config.min_free_bytes)
        self.app = create_app(self.settings)

    def enqueue_report(self, uid: str, generation: int, images: Sequence[Any]) -> None:
        """Send the report job of a study complete with ``images`` (instance records), with
        the study's priority as the message's (:func:`worker.messages.broker_priority`)."""
        from worker.messages import REPORT_TASK, JobInstance, ReportJob, broker_priority

        job = ReportJob(
            study_instance_uid=uid,
            generation=generation,
            instances=tuple(
                JobInstance(i.sop_instance_uid, i.sop_class_uid, i.path) for i in images
            ),
            queued_at=time.time(),
        )
        priority = self.store.message_priority(
            uid, aging_seconds=self.config.priority_aging_seconds
        )
        self.app.send_task(REPORT_TASK, args=[job.to_dict()], priority=broker_priority(priority))

    def enqueue_send(self, uid: str, destination: str) -> None:
        """Send the job that delivers a study's results to one destination (an urgent study's
        ahead of routine retries)."""
        from worker.messages import SEND_TASK, broker_priority

        priority = broker_priority(self.store.priority_of(uid))
        self.app.send_task(SEND_TASK, args=[uid, destination], priority=priority)

    def broker_identity(self) -> str | None:
        """The Redis master's run and replication ids (a restart, a promotion or a resync
        changes them)."""
        if not self.settings.broker_url.startswith(("redis://", "rediss://", "sentinel://")):
            return None
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            info = conn.default_channel.client.info()
        run_id = str(info.get("run_id") or "")
        return f"{run_id}/{info.get('master_replid', '')}" if run_id else None

    def _build_assembler(self) -> None:
        from dicom_node.assembler import Assembler, AssemblerConfig
        from observability.audit import AuditLog, ListenerAudit

        node = self.config
        self.assembler = Assembler(
            self.store,
            AssemblerConfig(
                quiet_seconds=node.study_quiet_seconds,
                force_seconds=node.study_force_seconds,
                release_grace_seconds=node.study_release_grace_seconds,
                reconcile_seconds=node.reconcile_seconds,
                requeue_after=max(self.settings.visibility_timeout, node.study_force_seconds),
                retention_seconds=node.spool_retention_hours * 3600.0,
                max_attempts=node.max_attempts,
                node=node.node_name,
                heartbeat_seconds=node.node_heartbeat_seconds,
                node_expire_seconds=node.node_expire_seconds,
                priority_aging_seconds=node.priority_aging_seconds,
                urgent_quiet_seconds=node.urgent_quiet_seconds,
            ),
            enqueue_report=self.enqueue_report,
            enqueue_send=self.enqueue_send,
            spool=self.spool,
            on_failed=self.study_failed,
            broker_identity=self.broker_identity,
        )
        self.audit = AuditLog(self.obs.audit_log, fsync=self.obs.audit_fsync)
        self.listener_audit = ListenerAudit(self.audit)

    def study_failed(self, uid: str, stage: str) -> None:
        """Count and audit a study the reconciler failed after its last attempt."""
        from observability import metrics
        from observability.audit import STUDY_FAILED

        view = self.store.get(uid)
        metrics.observe_failed_attempt(stage, final=True)
        self.audit.try_record(
            STUDY_FAILED,
            study_instance_uid=uid,
            stage=stage,
            exception="WorkerLost",
            reason=None if view is None else view.reason,
        )

    def released(self) -> None:
        """An association (or STOW-RS request) that brought instances ended: check soon."""
        self.assembler.wake_after(self.config.study_release_grace_seconds + 0.05)

    def _start_listeners(self) -> None:
        node = self.config
        self.server = start_listener(
            node,
            self.spool,
            self.store,
            self.listener_audit,
            self.released,
            shared=node.listener_processes > 1,
        )
        if node.listener_processes > 1 and self.server.socket is not None:
            metrics_dir = multiprocess_dir()
            self.listeners = ListenerProcesses(
                node.listener_processes - 1,
                self.server.socket,
                self.env,
                on_released=self.released,
                metrics_dir=None if metrics_dir is None else str(metrics_dir),
            )
            self.listeners.start()

    def _start_hl7(self) -> None:
        """The MLLP listener for signed reports, when ``D2R_HL7_LISTEN_PORT`` is set."""
        from dicom_node.scp import server_ssl_context
        from feedback.hl7_listener import Hl7Listener

        settings = self.feedback
        if settings.port == 0:
            return
        node = self.config
        self.hl7 = Hl7Listener(
            self.store,
            settings,
            host=node.host,
            sending_application=node.ae_title,
            ssl_context=server_ssl_context(node) if settings.tls else None,
        )
        self.hl7.start()
        logger.info(
            "signed reports: HL7 listener on %s:%d%s",
            node.host,
            self.hl7.port,
            " (TLS)" if settings.tls else "",
        )

    def _start_scorer(self) -> None:
        """Score signed reports (HL7, FHIR or DICOM SR alike) every
        ``D2R_FEEDBACK_SCORE_SECONDS``."""
        if self.feedback.score_seconds > 0:
            from cli.scoring import Scorer

            self.scorer = Scorer(self.store, self.feedback.score_seconds)
            self.scorer.start()

    def agreement(self) -> dict[str, dict[str, Any]]:
        """The drafts against the signed reports, all time and in the sliding window."""
        from feedback.scoring import windowed_summaries

        return windowed_summaries(
            self.store.report_scores, window_days=self.feedback.window_days, now=time.time()
        )

    def agreement_report(self) -> dict[str, Any]:
        """The status page's section: both summaries and the window's daily series."""
        from feedback.scoring import windowed_report

        return windowed_report(
            self.store.iter_report_scores, window_days=self.feedback.window_days, now=time.time()
        )

    def _stow_receiver(self) -> Any:
        from cli.runtime import report_intake
        from dicom_node.stow import StowReceiver
        from studydb.ingest import NodeRecorder

        node = self.config
        recorder = NodeRecorder(
            self.store, node.node_name, wait_seconds=node.db_ingest_wait_seconds
        )
        return StowReceiver(
            self.spool,
            recorder,
            ledger=recorder,
            max_bytes=node.stow_max_bytes,
            max_concurrent=node.stow_max_concurrent,
            on_released=self.released,
            on_instance=self.listener_audit.stow_instance,
            priority=node.priority,
            reports=report_intake(node, self.store),
        )

    def listener_bound(self) -> None:
        """Readiness: the DICOM listener (and every listener process) is up."""
        if self.server.socket is None or self.server.socket.fileno() < 0:
            raise OSError("the DICOM listener is closed")
        if self.listeners is not None:
            self.listeners.check()

    def database(self) -> None:
        """Health: the study database answers now (a probe does not wait out an outage)."""
        with self.store.retry_budget(0.0):
            self.store.count_by_state()

    def _start_http(self) -> None:
        from feedback.fhir import FhirReceiver
        from observability.metrics import (
            OldestUnfinishedCollector,
            QueuedByPriorityCollector,
            QueueDepthCollector,
            StudiesByStateCollector,
            feedback_collectors,
        )
        from worker.messages import REPORT_QUEUE, SEND_QUEUE

        stow = self._stow_receiver()
        fhir = FhirReceiver(
            self.store,
            max_bytes=self.feedback.fhir_max_bytes,
            wait_seconds=self.config.db_ingest_wait_seconds,
        )
        queues = QueueDepthCollector(
            self.settings.broker_url,
            self.settings.queue_dir,
            (REPORT_QUEUE, SEND_QUEUE),
            sentinel_master=self.settings.broker_sentinel_master,
        )
        self.http = start_http(
            self.env,
            collectors=[
                StudiesByStateCollector(self.store.count_by_state),
                QueuedByPriorityCollector(self.store.count_by_priority),
                OldestUnfinishedCollector(self.store.oldest_unfinished_age),
                *feedback_collectors(self.store, self.feedback, self.agreement),
                queues,
            ],
            health={"database": self.database},
            ready={
                "listener": self.listener_bound,
                "database": self.database,
                "broker": queues.ping,
                **self.extra_ready,
            },
            details=self.extra_details,
            store=self.store,
            ingest=stow,
            receivers={"fhir": fhir},
            agreement=self.agreement_report,
            node=self.config.node_name,
        )


def run_node(
    env: dict[str, str],
    stop: threading.Event,
    *,
    default_broker: str | None,
    extra_ready: Mapping[str, Callable[[], None]] | None = None,
    extra_details: Mapping[str, Callable[[], str]] | None = None,
) -> None:
    """Run a :class:`Node` until ``stop`` is set."""
    Node(
        env, default_broker=default_broker, extra_ready=extra_ready, extra_details=extra_details
    ).run(stop)
