"""``d2r worker``: a Celery worker running D2R-Net (production split)."""

from __future__ import annotations

import argparse


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


def run(args: argparse.Namespace) -> int:
    import socket

    from cli.runtime import configure_logging, environment
    from worker.celery_app import create_app
    from worker.settings import WorkerSettings

    env = environment(args)
    configure_logging(env)
    default_broker = env.get("D2R_DEFAULT_BROKER") or None
    settings = WorkerSettings.from_env(env, default_broker=default_broker)
    settings.require_model()
    settings.node.spool_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(settings, include_tasks=True)
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
    app.worker_main(argv)
    return 0
