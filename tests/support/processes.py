"""Real processes for end-to-end tests: Redis, ``d2r`` subcommands, dcmtk tools."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_port(port: int, timeout: float = 20.0) -> None:
    def _open() -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(_open, timeout, f"port {port}")


class Process:
    """A child process with its output in a log file; stopped gracefully, then killed."""

    def __init__(
        self,
        cmd: list[str],
        *,
        env: Mapping[str, str],
        log: Path,
        cwd: Path = REPO,
        preexec_fn: Callable[[], None] | None = None,
    ):
        self.cmd = cmd
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill9(self) -> None:
        """SIGKILL the whole process group (a crash)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._log.close()
        return self.proc.returncode


def d2r_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def run_d2r(
    *args: str, env: Mapping[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        d2r_cmd(*args), env=dict(env), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def small_random_checkpoint(out: Path) -> Path | None:
    """Write a small randomly initialised D2R-Net checkpoint (``d2r init-model``) to ``out``;
    None, with the command's error printed, when it fails."""
    res = run_d2r("init-model", "--out", str(out), "--preset", "small", env=base_env())
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return None
    return out


def start_redis(workdir: Path, port: int | None = None) -> tuple[Process, str]:
    """A private redis-server on loopback (a free port unless given); returns it and its URL.

    Nothing is persisted: a restart on the same port is an empty broker, as after a crash.
    """
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = port or free_port()
    proc = Process(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        env=os.environ,
        log=workdir / "redis.log",
    )
    wait_port(port)
    return proc, f"redis://127.0.0.1:{port}/0"


#: ``D2R_BACKEND_CACHE_DIR`` of every ``d2r`` child the tests start (``use_backend_cache``)
_backend_cache: list[Path] = []


def use_backend_cache(folder: Path) -> None:
    """Let every ``d2r`` child of this test session share one export cache of
    ``D2R_BACKEND=auto``, so each checkpoint is exported and checked once per session."""
    _backend_cache[:] = [folder]


def backend_cache_env() -> dict[str, str]:
    """``D2R_BACKEND_CACHE_DIR`` of the session's shared export cache (empty outside pytest)."""
    return {"D2R_BACKEND_CACHE_DIR": str(_backend_cache[0])} if _backend_cache else {}


def base_env(**overrides: str) -> dict[str, str]:
    """The environment for a ``d2r`` child: this one, without D2R_* leaking in, plus overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("D2R_")}
    # the shared random-weights test checkpoint has no training images, hence no input-gate
    # statistics: tests run it with the gate off; the gate's own tests turn it on
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "D2R_INPUT_GATE": "off"})
    env.update(backend_cache_env())
    env.update(overrides)
    return env
