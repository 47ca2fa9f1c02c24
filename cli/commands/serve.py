"""``d2r serve``: listener and worker in one command on embedded defaults.

No Redis: the queue is Celery's ``filesystem://`` transport beside the spool, the study database
a SQLite file. The worker runs as a child process (restarted if it dies); the database reconciler
re-queues anything a crash took with it. The child runs at a lower CPU priority (``nice 10``) so
that on a small host the listener's acknowledgements go first, also while the worker loads the
model.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Configuration: D2R_* environment variables (see README). "
        "D2R_MODEL names the D2R-Net checkpoint directory."
    )


# Longer than a screen: the supervisor of the worker child and the node it runs beside share the
# stop event and the metrics folder of one process
def run(args: argparse.Namespace) -> int:
    import os
    import shutil
    import subprocess
    import sys
    import threading
    import time

    from cli.node import run_node
    from cli.runtime import (
        MULTIPROC_ENV,
        configure_logging,
        environment,
        logger,
        stop_event_on_signals,
        use_multiprocess_metrics,
    )
    from worker.settings import FILESYSTEM_BROKER, WorkerSettings

    env = environment(args)
    configure_logging(env)
    settings = WorkerSettings.from_env(env, default_broker=FILESYSTEM_BROKER)
    settings.require_model()
    from studydb.store import StudyStore

    # The schema check (or upgrade) before the worker child starts, which only checks.
    StudyStore(settings.node.database_url, auto_upgrade=settings.node.db_auto_upgrade).close()
    stop = stop_event_on_signals()
    # One /metrics for the node and the worker child: both write to this folder.
    metrics_dir = use_multiprocess_metrics(
        settings.node.spool_dir.parent / "metrics" / settings.node.node_name, clean=True
    )
    from observability.metrics import (
        build_registry,
        loaded_backends,
        mark_process_dead,
        model_loaded,
    )

    child_env = dict(os.environ)
    child_env.update(env)
    child_env["D2R_DEFAULT_BROKER"] = FILESYSTEM_BROKER
    child_env[MULTIPROC_ENV] = str(metrics_dir)
    child_env["D2R_HTTP_PORT"] = "0"  # the node serves the one endpoint
    current: list[subprocess.Popen[bytes]] = []
    cmd = [sys.executable, "-m", "cli.main", "worker", "--pool=solo"]
    nice = shutil.which("nice")
    if nice is not None:  # ingest first: the worker (model load, inference) yields the CPU
        cmd = [nice, "-n", "10", *cmd]

    def supervise() -> None:
        delay = 1.0
        while not stop.is_set():
            started = time.monotonic()
            proc = subprocess.Popen(cmd, env=child_env)
            current[:] = [proc]
            while proc.poll() is None:
                if stop.wait(0.5):
                    proc.terminate()
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    mark_process_dead(proc.pid, str(metrics_dir))
                    return
            mark_process_dead(proc.pid, str(metrics_dir))
            logger.error("worker exited with %s; restarting in %.0f s", proc.returncode, delay)
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 60.0)
            stop.wait(delay)

    def worker_running() -> None:
        if not current or current[0].poll() is not None:
            raise RuntimeError("the worker process is not running")

    worker_metrics = build_registry(metrics_dir)

    def model() -> None:
        if not model_loaded(worker_metrics):
            raise RuntimeError("the worker has not loaded the model yet")

    supervisor = threading.Thread(target=supervise, name="d2r-worker-supervisor")
    supervisor.start()
    try:
        run_node(
            env,
            stop,
            default_broker=FILESYSTEM_BROKER,
            extra_ready={"worker": worker_running, "model": model},
            extra_details={"backend": lambda: loaded_backends(worker_metrics)},
        )
    finally:
        stop.set()
        supervisor.join()
    return 0
