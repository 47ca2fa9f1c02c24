"""Further listener processes of ``d2r node`` and ``d2r serve`` (``D2R_LISTENER_PROCESSES``).

The node process binds the DICOM port and runs the assembler, the reconciler and the HTTP
endpoint. With ``D2R_LISTENER_PROCESSES=N`` it also starts N-1 listener processes
(``python -m cli.listeners``) that inherit its listening socket and receive associations
exactly as it does: same spool, study database, audit log and metrics folder
(:mod:`dicom_node.shared_port` spreads the associations over the processes).

- A listener process tells the node over a pipe when it serves (``/readyz`` reports
  ``listener`` until every process does) and when an association that brought instances is
  released, so the assembler looks again when the release grace period ends, as it does for
  the node's own associations.
- The node restarts a listener process that died (after 1 s, doubling up to 60 s while it keeps
  dying). An association cut by such a death was never acknowledged for the instance it was
  sending; its studies complete by the quiet period.
- A listener process stops on SIGTERM or when the node is gone (its stdin, a pipe from the
  node, reaches end of file).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

logger = logging.getLogger("d2r")

#: seconds a stopping listener process gets to finish before it is killed
STOP_TIMEOUT = 30.0
#: messages of a listener process to the node, one byte each
SERVING = b"s"
RELEASED = b"r"


class ListenerProcesses:
    """Start, watch and stop the node's further listener processes."""

    def __init__(
        self,
        count: int,
        listening: socket.socket,
        env: Mapping[str, str],
        *,
        on_released: Callable[[], None],
        metrics_dir: str | None = None,
    ) -> None:
        self._count = count
        self._listening = listening
        self._env = dict(env)
        self._on_released = on_released
        self._metrics_dir = metrics_dir
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self._serving: list[bool] = [False] * count
        self._threads: list[threading.Thread] = []
        self._supervisor = threading.Thread(
            target=self._supervise, name="d2r-listeners", daemon=True
        )

    def start(self) -> None:
        for index in range(self._count):
            self._spawn(index)
        self._supervisor.start()

    def check(self) -> None:
        """Readiness: every listener process accepts associations."""
        with self._lock:
            down = [
                i + 2
                for i, p in enumerate(self._procs)
                if p is None or p.poll() is not None or not self._serving[i]
            ]
        if down:
            raise RuntimeError(f"listener process {', '.join(map(str, down))} is not serving")

    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs if p is not None and p.poll() is None]

    def stop(self) -> None:
        self._stop.set()
        if self._supervisor.is_alive():  # it starts no process once it has seen the stop
            self._supervisor.join()
        with self._lock:
            procs = [p for p in self._procs if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("listener process %d did not stop; killing it", proc.pid)
                proc.kill()
                proc.wait()
            self._process_gone(proc)
            if proc.stdin is not None:
                proc.stdin.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, index: int) -> None:
        env = {**os.environ, **self._env}
        if self._metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        fd = self._listening.fileno()
        read, write = os.pipe()  # the process's messages: serving, association released
        cmd = [sys.executable, "-m", "cli.listeners", "--socket-fd", str(fd)]
        cmd += ["--message-fd", str(write), "--index", str(index + 2)]
        try:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, pass_fds=(fd, write))
        finally:
            os.close(write)  # the reader sees the end of the pipe when the process is gone
        with self._lock:
            self._procs[index] = proc
            self._serving[index] = False
        thread = threading.Thread(
            target=self._messages, args=(index, read), name=f"d2r-listener-{index + 2}", daemon=True
        )
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        logger.info("listener process %d started (pid %d)", index + 2, proc.pid)

    def _process_gone(self, proc: subprocess.Popen[bytes]) -> None:
        if self._metrics_dir is not None:
            from observability.metrics import mark_process_dead

            mark_process_dead(proc.pid, self._metrics_dir)

    def _supervise(self) -> None:
        delays = [1.0] * self._count
        started = [time.monotonic()] * self._count
        while not self._stop.wait(0.5):
            for index in range(self._count):
                with self._lock:
                    proc = self._procs[index]
                if proc is None or proc.poll() is None or self._stop.is_set():
                    continue
                self._process_gone(proc)
                if proc.stdin is not None:
                    proc.stdin.close()
                if time.monotonic() - started[index] > 60:  # it ran a while: start over at 1 s
                    delays[index] = 1.0
                delay = delays[index]
                delays[index] = min(delay * 2, 60.0)
                logger.error(
                    "listener process %d (pid %d) exited with %s; restarting in %.0f s",
                    index + 2,
                    proc.pid,
                    proc.returncode,
                    delay,
                )
                if self._stop.wait(delay):
                    return
                started[index] = time.monotonic()
                self._spawn(index)

    def _messages(self, index: int, read: int) -> None:
        try:
            while data := os.read(read, 4096):
                if SERVING in data:
                    with self._lock:
                        self._serving[index] = True
                if RELEASED in data:
                    try:
                        self._on_released()
                    except Exception:  # the study then completes by its quiet period
                        logger.exception("could not schedule the assembler after a release")
        finally:
            os.close(read)


def serve(args: argparse.Namespace) -> int:
    """Run one further listener process until SIGTERM or the node is gone."""
    from cli.runtime import configure_logging, start_listener, stop_event_on_signals
    from dicom_node.settings import NodeSettings
    from dicom_node.spool import Spool
    from observability.audit import AuditLog, ListenerAudit
    from observability.settings import ObservabilitySettings
    from studydb.store import StudyStore

    multiprocessing.current_process().name = f"listener-{args.index}"  # its log lines say so
    env = dict(os.environ)
    configure_logging(env)
    node = NodeSettings.from_env(env)
    obs = ObservabilitySettings.from_env(env)
    stop = stop_event_on_signals()
    listening = socket.socket(fileno=args.socket_fd)

    def tell(message: bytes) -> None:
        try:
            os.write(args.message_fd, message)
        except OSError:  # the node is gone; this process stops too
            stop.set()

    def released() -> None:
        tell(RELEASED)

    def node_gone() -> None:
        while sys.stdin.buffer.read(4096):
            pass
        stop.set()

    store = StudyStore(node.database_url, retry_seconds=node.db_retry_seconds)
    spool = Spool(node.spool_dir, min_free_bytes=node.min_free_bytes)
    audit = AuditLog(obs.audit_log, fsync=obs.audit_fsync)
    listener_audit = ListenerAudit(audit)
    server = start_listener(node, spool, store, listener_audit, released, inherited=listening)
    threading.Thread(target=node_gone, name="d2r-node-watch", daemon=True).start()
    tell(SERVING)
    logger.info("listener process %d serving %s:%d", args.index, node.host, node.port)
    try:
        stop.wait()
    finally:
        server.shutdown()
        store.close()
        audit.close()
        logger.info("listener process %d stopped", args.index)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cli.listeners", description=__doc__)
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--message-fd", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
