"""``d2r worker``: a Celery worker running D2R-Net (production split)."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pool",
        choices=("prefork", "solo", "threads"),
        default="prefork",
        help="Celery pool (default prefork; the model loads once per pool process)",
    )
    parser.add_argument(
        "--queues",
        default="d2r.report,d2r.send",
        help="queues to consume (default both: d2r.report,d2r.send)",
    )
    parser.add_argument("--hostname", default=None, help="Celery node name")


# Longer than a screen: the Celery worker's start-up: schema check, metrics folder, HTTP endpoint
# and the worker itself, in the order they must happen
def run(args: argparse.Namespace) -> int:
    import os
    import shutil
    import socket
    import tempfile
    from pathlib import Path

    from cli.runtime import (
        configure_logging,
        environment,
        multiprocess_dir,
        start_http,
        use_multiprocess_metrics,
    )
    from observability.settings import ObservabilitySettings
    from worker.settings import WorkerSettings

    env = environment(args)
    configure_logging(env)
    default_broker = env.get("D2R_DEFAULT_BROKER") or None
    settings = WorkerSettings.from_env(env, default_broker=default_broker)
    obs = ObservabilitySettings.from_env(env)
    settings.require_model()
    from worker.predictor import ModelOptions, prepare_backend

    # D2R_BACKEND=auto: the checked ONNX export is made here, once, before the pool starts
    choice = prepare_backend(ModelOptions.from_settings(settings))
    if choice is not None:
        logger.info("inference backend: %s", choice.describe())
    from cli.exposure import http_warnings

    for warning in http_warnings(obs):
        logger.warning("%s", warning)
    settings.node.spool_dir.mkdir(parents=True, exist_ok=True)
    own_metrics_dir = None
    if multiprocess_dir() is None:  # pool processes report through files in a private folder
        own_metrics_dir = Path(tempfile.mkdtemp(prefix=f"d2r-worker-metrics-{os.getpid()}-"))
        use_multiprocess_metrics(own_metrics_dir, clean=False)

    from observability.audit import AuditLog
    from observability.metrics import (
        QueueDepthCollector,
        build_registry,
        loaded_backends,
        model_loaded,
    )
    from studydb.store import StudyStore
    from worker.celery_app import create_app
    from worker.messages import REPORT_QUEUE, SEND_QUEUE

    # The schema check first: a database behind or ahead of this release stops the start.
    store = StudyStore(settings.node.database_url, auto_upgrade=settings.node.db_auto_upgrade)
    audit = AuditLog(obs.audit_log, fsync=obs.audit_fsync)
    app = create_app(settings, include_tasks=True, audit=audit)
    queues = QueueDepthCollector(
        settings.broker_url,
        settings.queue_dir,
        (REPORT_QUEUE, SEND_QUEUE),
        sentinel_master=settings.broker_sentinel_master,
    )
    loaded = build_registry(multiprocess_dir())

    def database() -> None:
        store.count_by_state()

    def model() -> None:
        if not model_loaded(loaded):
            raise RuntimeError("no worker process has loaded the model yet")

    http = start_http(
        env,
        collectors=[queues],
        health={"database": database},
        ready={"model": model, "broker": queues.ping},
        details={"backend": lambda: loaded_backends(loaded)},
    )
    argv = [
        "worker",
        f"--pool={args.pool}",
        f"--concurrency={settings.concurrency}",
        f"--queues={args.queues}",
        f"--loglevel={env.get('D2R_LOG_LEVEL', 'INFO').upper()}",
        f"--hostname={args.hostname or f'd2r@{socket.gethostname()}'}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    try:
        app.worker_main(argv)
    finally:
        if http is not None:
            http.stop()
        store.close()
        audit.close()
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
    return 0
