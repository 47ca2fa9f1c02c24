"""A private PostgreSQL server for tests: its own cluster on a free loopback port, trust auth."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.processes import Process, free_port


def postgres_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


class PostgresServer:
    """A private PostgreSQL cluster on a fixed loopback port that can be stopped and started
    again on the same port and data directory (a database restart or crash under a client).

    ``start()`` runs ``initdb`` the first time; ``stop(mode=...)`` is a ``fast`` shutdown
    (SIGINT to the postmaster: sessions are disconnected, a clean checkpoint), an
    ``immediate`` one (SIGQUIT: crash recovery at the next start) or ``kill`` (SIGKILL of the
    postmaster and every backend, as a host crash); ``restart(down_seconds=...)`` does both.
    :meth:`close` stops it and removes the cluster.
    """

    def __init__(self, workdir: Path | None = None, *, port: int | None = None) -> None:
        """``workdir``: an empty folder every ancestor of which the ``postgres`` user can
        enter when this runs as root (default: a new one under the temporary folder)."""
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package 'postgresql')")
        self.bindir = bindir
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="d2r-pg-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data = self.workdir / "data"
        self.port = port or free_port()
        self.log = self.workdir / "postgres.log"
        self.proc: Process | None = None
        self._demote: Callable[[], None] | None = None
        if os.geteuid() == 0:  # initdb refuses to run as root: run the cluster as 'postgres'
            pw = pwd.getpwnam("postgres")
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)

            def demote() -> None:
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)

            self._demote = demote

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the ``postgres`` database (superuser, trust auth)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (``initdb`` first if there is no cluster yet) and wait until it
        accepts connections (after crash recovery, if any)."""
        if self.running:
            return
        if not (self.data / "PG_VERSION").exists():
            initdb = subprocess.run(
                [
                    str(self.bindir / "initdb"),
                    *("-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"),
                ],
                check=False,
                capture_output=True,
                text=True,
                preexec_fn=self._demote,  # noqa: PLW1509 - only changes the user id
            )
            if initdb.returncode != 0:  # e.g. a workdir the 'postgres' user cannot reach
                raise RuntimeError(f"initdb failed in {self.workdir}: {initdb.stderr[-2000:]}")
        self.proc = Process(
            [
                str(self.bindir / "postgres"),
                *("-D", str(self.data), "-p", str(self.port), "-k", str(self.workdir)),
                *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"),
            ],
            env=os.environ,
            log=self.log,
            cwd=self.workdir,
            preexec_fn=self._demote,
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until ``pg_isready`` says the server accepts connections."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and not self.proc.alive():
                raise RuntimeError(f"PostgreSQL exited:\n{self.proc.log_tail()}")
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                check=False,
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                tail = self.proc.log_tail() if self.proc else ""
                raise TimeoutError(f"PostgreSQL not ready after {timeout:g} s:\n{tail}")
            time.sleep(0.1)

    def stop(self, *, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the server: ``fast`` (SIGINT), ``immediate`` (SIGQUIT) or ``kill`` (SIGKILL of
        its whole process group)."""
        signals = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT, "kill": signal.SIGKILL}
        if mode not in signals:
            raise ValueError(f"mode must be one of {sorted(signals)}, not {mode!r}")
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.alive():
            if mode == "kill":
                proc.kill9()
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signals[mode])
                try:
                    proc.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill9()
        proc.stop()  # closes the log (and kills whatever is left of the group)
        if mode == "kill":  # a killed postmaster's backends hold its shared memory until gone
            _wait_group_gone(proc.pid, timeout)

    def restart(self, *, down_seconds: float = 0.0, mode: str = "fast") -> float:
        """Stop (``mode`` as in :meth:`stop`), stay down ``down_seconds``, start again on the
        same port and data; returns the seconds it was unreachable (stop to ready)."""
        began = time.monotonic()
        self.stop(mode=mode)
        time.sleep(down_seconds)
        self.start()
        return time.monotonic() - began

    def close(self) -> None:
        """Stop the server and remove its cluster."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """Wait until no live (non-zombie) process is left in process group ``pgid``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = False
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive = True
                break
        if not alive:
            return
        time.sleep(0.05)


@contextmanager
def private_postgres_server(workdir: Path | None = None) -> Iterator[PostgresServer]:
    """Yield a started :class:`PostgresServer` (a throw-away cluster, removed afterwards)."""
    server = PostgresServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.close()


@contextmanager
def private_postgres() -> Iterator[str]:
    """Yield a SQLAlchemy URL of a throw-away PostgreSQL cluster (removed afterwards)."""
    with private_postgres_server() as server:
        yield server.url


@contextmanager
def postgres_server() -> Iterator[str]:
    """The admin URL of the server named by D2R_TEST_POSTGRES_URL, or of a private cluster."""
    if url := os.environ.get("D2R_TEST_POSTGRES_URL"):
        yield url
        return
    with private_postgres() as url:
        yield url


@contextmanager
def scratch_database(admin_url: str, prefix: str) -> Iterator[str]:
    """Yield the URL of a new, empty database on ``admin_url``'s server; dropped afterwards."""
    import uuid

    import sqlalchemy as sa

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()
