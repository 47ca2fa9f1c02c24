"""Composition helpers shared by the ``serve``, ``node`` and ``worker`` subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from d2r_core.config import merged_environment

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

logger = logging.getLogger("d2r")


def without_credentials(broker_url: str) -> str:
    """The broker URL for a log line: each entry of a Sentinel list without its password."""
    entries = []
    for entry in broker_url.split(";"):
        scheme, sep, rest = entry.strip().partition("://")
        entries.append(f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else entry)
    return ";".join(entries)


def environment(args: argparse.Namespace) -> dict[str, str]:
    """Config file values (``--config`` or ``D2R_CONFIG``) overridden by the environment."""
    path = getattr(args, "config", None) or os.environ.get("D2R_CONFIG")
    return merged_environment(path, os.environ)


def configure_logging(env: dict[str, str]) -> None:
    """Root logging: ``D2R_LOG_LEVEL`` and ``D2R_LOG_FORMAT`` (text or JSON lines)."""
    from observability import logs
    from observability.settings import ObservabilitySettings

    obs = ObservabilitySettings.from_env(env)
    logs.configure_logging(env.get("D2R_LOG_LEVEL", "INFO"), obs.log_format)


def use_multiprocess_metrics(path: Path, *, clean: bool) -> Path:
    """Make this process (and its children) write metrics to ``path`` (multiprocess mode).

    Must run before ``prometheus_client`` is first imported. ``clean`` removes the files of an
    earlier run (``d2r serve`` at start).
    """
    path = path.resolve()
    if clean and path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def multiprocess_dir() -> Path | None:
    """The metrics folder this process was started with, if any."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def start_http(
    env: Mapping[str, str],
    *,
    collectors: Sequence[Any] = (),
    health: Mapping[str, Callable[[], None]],
    ready: Mapping[str, Callable[[], None]],
    store: Any = None,
    ingest: Any = None,
    node: str | None = None,
) -> Any:
    """Start the HTTP endpoint of ``D2R_HTTP_HOST:D2R_HTTP_PORT``; None when the port is 0.

    ``ingest`` is the STOW-RS receiver of the node (``/dicom-web/``), if it runs one; ``node``
    its name, a label on every metric.
    """
    from d2r_core.errors import ConfigError
    from dicom_node.settings import NodeSettings
    from observability.auth import Authenticator, FailureLimiter
    from observability.http import ObservabilityServer, tls_context
    from observability.metrics import build_registry
    from observability.pages import StatusPages
    from observability.settings import ObservabilitySettings

    obs = ObservabilitySettings.from_env(env)
    if obs.http_port == 0:
        return None
    auth = Authenticator(
        required=obs.http_auth_required,
        tokens_file=obs.http_tokens_file,
        users_file=obs.http_users_file,
        trusted_proxies=obs.http_trusted_proxies,
        proxy_header=obs.http_proxy_header,
        proxy_roles=obs.http_proxy_roles,
        limiter=FailureLimiter(
            obs.http_auth_max_failures,
            obs.http_auth_window_seconds,
            max_total=obs.http_auth_max_failures_total,
        ),
        max_hashing=obs.http_auth_max_hashing,
    )
    if auth.required and not auth.has_credentials and obs.http_tls_ca is None:
        logger.warning(
            "HTTP endpoint on %s needs credentials but none are configured: only /healthz and "
            "/readyz answer; set D2R_HTTP_TOKENS_FILE, D2R_HTTP_USERS_FILE or "
            "D2R_HTTP_TRUSTED_PROXIES",
            obs.http_host,
        )
    tls = None
    if obs.http_tls_cert is not None and obs.http_tls_key is not None:
        try:
            tls = tls_context(obs.http_tls_cert, obs.http_tls_key, obs.http_tls_ca)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                "D2R_HTTP_TLS_CERT", f"cannot load certificate and key: {exc}"
            ) from None
    server = ObservabilityServer(
        obs.http_host,
        obs.http_port,
        registry=build_registry(multiprocess_dir(), collectors, node=node),
        health=health,
        ready=ready,
        pages=None
        if store is None
        else StatusPages(
            store,
            show_phi=obs.status_page_phi,
            max_pixel_bytes=NodeSettings.from_env(env).max_pixel_bytes,
        ),
        auth=auth,
        tls=tls,
        ingest=ingest,
        max_connections=obs.http_max_connections,
        max_connections_per_client=obs.http_max_connections_per_client,
    )
    try:
        return server.start()
    except OSError as exc:  # the DICOM node keeps working; probes and scrapes will notice
        logger.error(
            "HTTP endpoint not started: cannot bind %s:%d (%s); set D2R_HTTP_PORT",
            obs.http_host,
            obs.http_port,
            exc,
        )
        return None


def stop_event_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (graceful stop)."""
    stop = threading.Event()

    def _handler(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return stop


def association_rejected(audit: Any) -> Callable[[Any, str], None]:
    """Count and audit an association the listener refused itself (e.g. by peer address)."""
    from observability import metrics
    from observability.audit import ASSOCIATION

    def record(assoc: Any, reason: str) -> None:
        metrics.observe_association(False, reason)
        primitive = getattr(assoc.requestor, "primitive", None)
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        audit.try_record(
            ASSOCIATION,
            calling_ae_title=str(getattr(primitive, "calling_ae_title", "") or "").strip(),
            called_ae_title=str(getattr(primitive, "called_ae_title", "") or "").strip(),
            peer_address=assoc.requestor.address,
            peer_port=assoc.requestor.port,
            result="rejected",
            reason=reason,
            start=now,
            end=now,
            instances=0,
        )

    return record


def start_listener(
    node: Any,
    spool: Any,
    store: Any,
    listener_audit: Any,
    released: Callable[[], None],
    *,
    shared: bool = False,
    inherited: socket.socket | None = None,
) -> Any:
    """The DICOM listener of a node process, its instances audited and recorded in ``store``."""
    from dicom_node.scp import AssociationStudies, start_server
    from studydb.ingest import NodeRecorder

    recorder = NodeRecorder(store, node.node_name, wait_seconds=node.db_ingest_wait_seconds)
    server = start_server(
        node,
        spool,
        listener_audit.recorder(recorder),
        block=False,
        extra_handlers=listener_audit.handlers(),
        on_rejected=association_rejected(listener_audit.audit),
        associations=AssociationStudies(recorder, on_released=released),
        shared=shared,
        inherited=inherited,
    )
    assert server is not None
    return server


def run_node(
    env: dict[str, str],
    stop: threading.Event,
    *,
    default_broker: str | None,
    extra_ready: Mapping[str, Callable[[], None]] | None = None,
) -> None:
    """Run the listener, the assembler and the HTTP endpoint until ``stop`` is set."""
    from dicom_node.assembler import Assembler, AssemblerConfig
    from dicom_node.spool import Spool
    from dicom_node.stow import StowReceiver
    from observability import metrics
    from observability.audit import STUDY_FAILED, AuditLog, ListenerAudit
    from observability.metrics import (
        OldestUnfinishedCollector,
        QueueDepthCollector,
        StudiesByStateCollector,
    )
    from observability.settings import ObservabilitySettings
    from studydb.engine import hold_single_node_lock
    from studydb.ingest import NodeRecorder
    from studydb.records import InstanceRecord
    from studydb.store import StudyStore
    from worker.celery_app import create_app
    from worker.messages import (
        REPORT_QUEUE,
        REPORT_TASK,
        SEND_QUEUE,
        SEND_TASK,
        JobInstance,
        ReportJob,
    )
    from worker.settings import WorkerSettings

    settings = WorkerSettings.from_env(env, default_broker=default_broker)
    obs = ObservabilitySettings.from_env(env)
    node = settings.node
    node.spool_dir.mkdir(parents=True, exist_ok=True)
    node_lock = hold_single_node_lock(node.database_url)  # SQLite: one node per database
    store = StudyStore(
        node.database_url,
        auto_upgrade=node.db_auto_upgrade,
        retry_seconds=node.db_retry_seconds,
    )
    from cli.exposure import exposure_warnings

    # once, by a node that starts (its database usable): listener processes never get here
    for warning in exposure_warnings(node, obs):
        logger.warning("%s", warning)
    spool = Spool(node.spool_dir, min_free_bytes=node.min_free_bytes)
    app = create_app(settings)

    def enqueue_report(uid: str, generation: int, images: Sequence[InstanceRecord]) -> None:
        import time

        job = ReportJob(
            study_instance_uid=uid,
            generation=generation,
            instances=tuple(
                JobInstance(i.sop_instance_uid, i.sop_class_uid, i.path) for i in images
            ),
            queued_at=time.time(),
        )
        app.send_task(REPORT_TASK, args=[job.to_dict()])

    def enqueue_send(uid: str, destination: str) -> None:
        app.send_task(SEND_TASK, args=[uid, destination])

    def broker_identity() -> str | None:
        """The Redis master's run and replication ids (a restart, a promotion or a resync
        changes them)."""
        if not settings.broker_url.startswith(("redis://", "rediss://", "sentinel://")):
            return None
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            info = conn.default_channel.client.info()
        run_id = str(info.get("run_id") or "")
        return f"{run_id}/{info.get('master_replid', '')}" if run_id else None

    assembler = Assembler(
        store,
        AssemblerConfig(
            quiet_seconds=node.study_quiet_seconds,
            force_seconds=node.study_force_seconds,
            release_grace_seconds=node.study_release_grace_seconds,
            reconcile_seconds=node.reconcile_seconds,
            requeue_after=max(settings.visibility_timeout, node.study_force_seconds),
            retention_seconds=node.spool_retention_hours * 3600.0,
            max_attempts=node.max_attempts,
            node=node.node_name,
            heartbeat_seconds=node.node_heartbeat_seconds,
            node_expire_seconds=node.node_expire_seconds,
        ),
        enqueue_report=enqueue_report,
        enqueue_send=enqueue_send,
        spool=spool,
        on_failed=lambda uid, stage: study_failed(uid, stage),
        broker_identity=broker_identity,
    )
    audit = AuditLog(obs.audit_log, fsync=obs.audit_fsync)

    def study_failed(uid: str, stage: str) -> None:
        view = store.get(uid)
        metrics.observe_failed_attempt(stage, final=True)
        audit.try_record(
            STUDY_FAILED,
            study_instance_uid=uid,
            stage=stage,
            exception="WorkerLost",
            reason=None if view is None else view.reason,
        )

    listener_audit = ListenerAudit(audit)

    def released() -> None:
        assembler.wake_after(node.study_release_grace_seconds + 0.05)

    server = start_listener(
        node, spool, store, listener_audit, released, shared=node.listener_processes > 1
    )
    listeners = None
    if node.listener_processes > 1 and server.socket is not None:
        from cli.listeners import ListenerProcesses

        metrics_dir = multiprocess_dir()
        listeners = ListenerProcesses(
            node.listener_processes - 1,
            server.socket,
            env,
            on_released=released,
            metrics_dir=None if metrics_dir is None else str(metrics_dir),
        )
        listeners.start()
    recorder = NodeRecorder(store, node.node_name, wait_seconds=node.db_ingest_wait_seconds)
    stow = StowReceiver(
        spool,
        recorder,
        ledger=recorder,
        max_bytes=node.stow_max_bytes,
        max_concurrent=node.stow_max_concurrent,
        on_released=released,
        on_instance=listener_audit.stow_instance,
    )
    queues = QueueDepthCollector(
        settings.broker_url,
        settings.queue_dir,
        (REPORT_QUEUE, SEND_QUEUE),
        sentinel_master=settings.broker_sentinel_master,
    )

    def listener_bound() -> None:
        if server.socket is None or server.socket.fileno() < 0:
            raise OSError("the DICOM listener is closed")
        if listeners is not None:
            listeners.check()

    def database() -> None:
        with store.retry_budget(0.0):  # a probe answers now; it does not wait out an outage
            store.count_by_state()

    http = start_http(
        env,
        collectors=[
            StudiesByStateCollector(store.count_by_state),
            OldestUnfinishedCollector(store.oldest_unfinished_age),
            queues,
        ],
        health={"database": database},
        ready={
            "listener": listener_bound,
            "database": database,
            "broker": queues.ping,
            **(extra_ready or {}),
        },
        store=store,
        ingest=stow,
        node=node.node_name,
    )
    logger.info(
        "node %s listening as %s on %s:%d (%d listener process%s); spool %s; broker %s",
        node.node_name,
        node.ae_title,
        node.host,
        node.port,
        node.listener_processes,
        "es" if node.listener_processes > 1 else "",
        node.spool_dir,
        without_credentials(settings.broker_url),
    )
    assembler.start()
    try:
        stop.wait()
    finally:
        if http is not None:
            http.stop()
        if listeners is not None:
            listeners.stop()
        server.shutdown()
        assembler.stop()
        store.close()
        audit.close()
        if node_lock is not None:
            node_lock.close()
        logger.info("node stopped")
