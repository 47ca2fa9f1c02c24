"""A node's two ingest paths in a process of their own, for measuring what a request costs it.

``python -m tests.security.ingest_node DIR`` starts the DICOM listener (wired as ``d2r node``
wires it) and the HTTP endpoint with the STOW-RS receiver, both with the node's default
settings except the addresses, the spool (``DIR/spool``) and its free-space guard (0). It
prints one JSON line ``{"dicom": PORT, "http": PORT}`` once both serve, and runs until its
standard input closes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cli.runtime import start_listener
from dicom_node.settings import NodeSettings
from dicom_node.spool import Spool
from dicom_node.stow import StowReceiver
from observability import metrics
from observability.audit import AuditLog, ListenerAudit
from observability.http import ObservabilityServer
from studydb.store import StudyStore
from tests.support.processes import free_port

AE_TITLE = "D2RMEM"


def main(folder: Path) -> None:
    node = NodeSettings.from_env(
        {
            "D2R_AE_TITLE": AE_TITLE,
            "D2R_HOST": "127.0.0.1",
            "D2R_PORT": str(free_port()),
            "D2R_SPOOL_DIR": str(folder / "spool"),
            "D2R_MIN_FREE_BYTES": "0",
        }
    )
    store = StudyStore(f"sqlite:///{folder / 'd2r.db'}")
    spool = Spool(node.spool_dir, min_free_bytes=node.min_free_bytes)
    audit = ListenerAudit(AuditLog(folder / "audit.jsonl"))
    listener = start_listener(node, spool, store, audit, released=lambda: None)
    receiver = StowReceiver(
        spool,
        store,
        ledger=store,
        max_bytes=node.stow_max_bytes,
        max_concurrent=node.stow_max_concurrent,
        on_instance=audit.stow_instance,
    )
    http = ObservabilityServer(
        "127.0.0.1",
        0,
        registry=metrics.build_registry(None),
        health={},
        ready={},
        ingest=receiver,
    ).start()
    print(json.dumps({"dicom": node.port, "http": http.port}), flush=True)
    try:
        sys.stdin.read()
    finally:
        http.stop()
        listener.shutdown()
        store.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
