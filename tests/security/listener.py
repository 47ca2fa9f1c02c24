"""A real listener wired as ``d2r node`` wires it (audit, metrics, rejection hook), in-process.

The study database is a real SQLite file and the spool a real folder; only the broker side
(assembler, worker) is absent, since these tests are about what the listener accepts.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from cli.runtime import start_listener
from dicom_node.settings import NodeSettings
from dicom_node.spool import Spool
from observability.audit import AuditLog, ListenerAudit, read_audit
from studydb.store import StudyStore
from tests.support.processes import free_port

STORESCU = "/usr/bin/storescu"
AE_TITLE = "D2RSEC"


@dataclass
class Listener:
    settings: NodeSettings
    spool: Spool
    store: StudyStore
    audit_path: Path
    server: Any

    @property
    def port(self) -> int:
        return self.settings.port

    def audit_lines(self, event: str) -> list[dict[str, Any]]:
        return [x for x in read_audit(self.audit_path) if x["event"] == event]


@contextmanager
def running_listener(tmp: Path, **env: str) -> Iterator[Listener]:
    """Start the listener with ``D2R_*`` overrides; stop it (and close the database) after."""
    values: dict[str, str] = {
        "D2R_AE_TITLE": AE_TITLE,
        "D2R_HOST": "127.0.0.1",
        "D2R_PORT": str(free_port()),
        "D2R_SPOOL_DIR": str(tmp / "spool"),
        "D2R_MIN_FREE_BYTES": "0",
        "D2R_ACSE_TIMEOUT": "5",
        "D2R_NETWORK_TIMEOUT": "10",
        "D2R_DIMSE_TIMEOUT": "10",
    }
    values.update(env)
    settings = NodeSettings.from_env(values)
    store = StudyStore(f"sqlite:///{tmp / 'd2r.db'}")
    spool = Spool(settings.spool_dir, min_free_bytes=settings.min_free_bytes)
    audit_path = tmp / "audit.jsonl"
    log = AuditLog(audit_path)
    listener_audit = ListenerAudit(log)
    server = start_listener(settings, spool, store, listener_audit, released=lambda: None)
    try:
        yield Listener(settings, spool, store, audit_path, server)
    finally:
        server.shutdown()
        store.close()
        log.close()


def storescu(
    port: int,
    *files: Path,
    aec: str = AE_TITLE,
    aet: str = "MODALITY",
    flags: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu with ``-d`` (so the response statuses can be read back)."""
    args = [
        STORESCU,
        "-d",
        "-aet",
        aet,
        "-aec",
        aec,
        *flags,
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def store_statuses(res: subprocess.CompletedProcess[str]) -> list[int]:
    """The DIMSE statuses of the C-STORE responses storescu received (from its ``-d`` log)."""
    blocks = (res.stdout + res.stderr).split("Received Store Response")[1:]
    found = [re.search(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", b) for b in blocks]
    return [int(m.group(1), 16) for m in found if m]


def sample(name: str, labels: dict[str, str]) -> float:
    """The current value of a metric sample in this process (0 when never moved)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0
