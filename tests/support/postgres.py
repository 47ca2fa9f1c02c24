"""A private PostgreSQL server for tests: its own cluster on a free loopback port, trust auth."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.processes import Process, free_port, wait_port


def postgres_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@contextmanager
def private_postgres() -> Iterator[str]:
    """Yield a SQLAlchemy URL of a throw-away PostgreSQL cluster (removed afterwards)."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (Debian package 'postgresql')")
    workdir = Path(tempfile.mkdtemp(prefix="d2r-pg-"))
    demote = None
    if os.geteuid() == 0:  # initdb refuses to run as root: run the cluster as 'postgres'
        pw = pwd.getpwnam("postgres")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)

        def demote() -> None:
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)

    data = workdir / "data"
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
        preexec_fn=demote,  # noqa: PLW1509 - single-threaded at this point
    )
    port = free_port()
    log = workdir / "postgres.log"
    proc = Process(
        [
            str(bindir / "postgres"),
            *("-D", str(data), "-p", str(port), "-k", str(workdir)),
            *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"),
        ],
        env=os.environ,
        log=log,
        cwd=workdir,
        preexec_fn=demote,
    )
    try:
        wait_port(port, timeout=30)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


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
