"""``d2r serve``: listener and worker in one command on embedded defaults.

No Redis: the queue is Celery's ``filesystem://`` transport beside the spool, the study database
a SQLite file. The worker runs as a child process (restarted if it dies); the database reconciler
re-queues anything a crash took with it.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Configuration: D2R_* environment variables (see README). "
        "D2R_MODEL names the D2R-Net checkpoint directory."
    )


def run(args: argparse.Namespace) -> int:
    import os
    import subprocess
    import sys
    import threading
    import time

    from cli.runtime import (
        configure_logging,
        environment,
        logger,
        run_node,
        stop_event_on_signals,
    )
    from worker.settings import FILESYSTEM_BROKER, WorkerSettings

    env = environment(args)
    configure_logging(env)
    settings = WorkerSettings.from_env(env, default_broker=FILESYSTEM_BROKER)
    settings.require_model()
    stop = stop_event_on_signals()

    child_env = dict(os.environ)
    child_env.update(env)
    child_env["D2R_DEFAULT_BROKER"] = FILESYSTEM_BROKER
    cmd = [sys.executable, "-m", "cli.main", "worker", "--pool=solo"]

    def supervise() -> None:
        delay = 1.0
        while not stop.is_set():
            started = time.monotonic()
            proc = subprocess.Popen(cmd, env=child_env)
            while proc.poll() is None:
                if stop.wait(0.5):
                    proc.terminate()
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    return
            logger.error("worker exited with %s; restarting in %.0f s", proc.returncode, delay)
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 60.0)
            stop.wait(delay)

    supervisor = threading.Thread(target=supervise, name="d2r-worker-supervisor")
    supervisor.start()
    try:
        run_node(env, stop, default_broker=FILESYSTEM_BROKER)
    finally:
        stop.set()
        supervisor.join()
    return 0
