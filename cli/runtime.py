"""Composition helpers shared by the ``serve``, ``node`` and ``worker`` subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

from dicom_node.settings import merged_environment

logger = logging.getLogger("d2r")


def environment(args: argparse.Namespace) -> dict[str, str]:
    """Config file values (``--config`` or ``D2R_CONFIG``) overridden by the environment."""
    path = getattr(args, "config", None) or os.environ.get("D2R_CONFIG")
    return merged_environment(path, os.environ)


def configure_logging(env: dict[str, str]) -> None:
    level = env.get("D2R_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    # pynetdicom logs every PDU at DEBUG and full dataset summaries at INFO: keep it quiet.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def stop_event_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (graceful stop)."""
    stop = threading.Event()

    def _handler(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return stop


def run_node(env: dict[str, str], stop: threading.Event, *, default_broker: str | None) -> None:
    """Run the listener and the assembler until ``stop`` is set."""
    from dicom_node.assembler import Assembler, AssemblerConfig
    from dicom_node.scp import start_server
    from dicom_node.spool import Spool
    from dicom_node.studies import InstanceRecord, StudyStore
    from worker.celery_app import create_app
    from worker.messages import REPORT_TASK, SEND_TASK, JobInstance, ReportJob
    from worker.settings import WorkerSettings

    settings = WorkerSettings.from_env(env, default_broker=default_broker)
    node = settings.node
    node.spool_dir.mkdir(parents=True, exist_ok=True)
    store = StudyStore(node.database_url)
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

    assembler = Assembler(
        store,
        AssemblerConfig(
            quiet_seconds=node.study_quiet_seconds,
            force_seconds=node.study_force_seconds,
            reconcile_seconds=node.reconcile_seconds,
            requeue_after=max(settings.visibility_timeout, node.study_force_seconds),
        ),
        enqueue_report=enqueue_report,
        enqueue_send=enqueue_send,
    )
    server = start_server(node, spool, store, block=False)
    assert server is not None
    logger.info(
        "listening as %s on %s:%d; spool %s; broker %s",
        node.ae_title,
        node.host,
        node.port,
        node.spool_dir,
        settings.broker_url.split("@")[-1],
    )
    assembler.start()
    try:
        stop.wait()
    finally:
        server.shutdown()
        assembler.stop()
        store.close()
        logger.info("node stopped")
