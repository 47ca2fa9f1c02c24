"""One further listener process (``cli.listeners``) on its own, as the node starts it.

The test process binds the listening socket and never accepts on it, so every association goes
to the listener process; the study database is a fresh SQLite file.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cli.listeners import ListenerProcesses
from tests.support.processes import base_env, wait_for


@dataclass
class LoneListener:
    processes: ListenerProcesses
    port: int
    database: str


def _serving(processes: ListenerProcesses) -> bool:
    try:
        processes.check()
    except RuntimeError:
        return False
    return True


@contextmanager
def lone_listener_process(
    tmp: Path,
    *,
    env: Mapping[str, str] | None = None,
    on_released: Callable[[], None] = lambda: None,
) -> Iterator[LoneListener]:
    """Start it with ``D2R_*`` overrides ``env``, wait until it serves; stop it after."""
    from studydb.store import StudyStore

    database = f"sqlite:///{tmp / 'd2r.db'}"
    StudyStore(database, auto_upgrade=True).close()
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    values = {
        "D2R_AE_TITLE": "D2R",
        "D2R_HOST": "127.0.0.1",
        "D2R_PORT": str(port),
        "D2R_SPOOL_DIR": str(tmp / "spool"),
        "D2R_DATABASE_URL": database,
        "D2R_MIN_FREE_BYTES": "0",
        "D2R_AUDIT_LOG": str(tmp / "audit.jsonl"),
        **(env or {}),
    }
    processes = ListenerProcesses(1, listening, base_env(**values), on_released=on_released)
    processes.start()
    try:
        wait_for(lambda: _serving(processes), 60, "the listener process to serve")
        yield LoneListener(processes, port, database)
    finally:
        processes.stop()
        listening.close()
