"""Signed reports come back from a RIS over HL7 v2: a real ``d2r node`` process with its
MLLP listener on, the RIS played by the product's MLLP client (:func:`delivery.mllp.exchange`)
in the test process.

The studies are recorded in the node's database before it starts, as its receivers record
them (one instance each, with its accession number).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from delivery.hl7 import Ack, parse_ack
from delivery.mllp import exchange
from studydb.store import StudyStore
from tests.support.processes import Process, base_env, d2r_cmd, free_port, start_redis, wait_port
from tests.support.signed_reports import add_study, oru

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIGNED = "Small left pleural effusion.\nNo pneumothorax."
CORRECTED = "Small left pleural effusion with adjacent atelectasis.\nNo pneumothorax."


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[int, StudyStore, Process]]:
    url = f"sqlite:///{tmp_path / 'd2r.db'}"
    store = StudyStore(url)
    add_study(store, "1.7.1", accession="ACC-1")
    add_study(store, "1.7.2", accession="ACC-2")
    add_study(store, "1.7.3")  # no accession number: only its UID matches it
    redis, broker = start_redis(tmp_path)
    hl7_port = free_port()
    env = base_env(
        D2R_DATABASE_URL=url,
        D2R_SPOOL_DIR=str(tmp_path / "spool"),
        D2R_HOST="127.0.0.1",
        D2R_PORT=str(free_port()),
        D2R_HTTP_PORT="0",
        D2R_BROKER_URL=broker,
        D2R_MIN_FREE_BYTES="0",
        D2R_AUDIT_LOG=str(tmp_path / "audit.jsonl"),
        D2R_HL7_LISTEN_PORT=str(hl7_port),
        D2R_LOG_LEVEL="INFO",
    )
    process = Process(d2r_cmd("node"), env=env, log=tmp_path / "node.log")
    try:
        wait_port(hl7_port, timeout=60)
        yield hl7_port, store, process
    finally:
        process.stop()
        redis.stop()
        store.close()


def _send(port: int, message: bytes) -> Ack:
    return parse_ack(exchange("127.0.0.1", port, message, timeout=10))


@pytest.mark.timeout(180)
def test_the_ris_sends_final_corrected_preliminary_and_unmatched_reports(
    node: tuple[int, StudyStore, Process],
) -> None:
    port, store, process = node
    sent = [
        ("F1", oru(SIGNED, control_id="F1", accession="ACC-1")),
        ("F1", oru(SIGNED, control_id="F1", accession="ACC-1")),  # sent again
        ("C1", oru(CORRECTED, control_id="C1", status="C", accession="ACC-1")),
        ("P2", oru("Preliminary: effusion?", control_id="P2", status="P", accession="ACC-2")),
        ("U9", oru("Normal chest.", control_id="U9", accession="ACC-9")),
        ("Z3", oru("Normal chest.", control_id="Z3", zds_uid="1.7.3")),
        ("E3", oru("", control_id="E3", study_uid="1.7.3")),
        ("A1", oru("x", control_id="A1", message_type="ADT^A08^ADT_A01")),
    ]
    acks = [_send(port, message) for _, message in sent]
    assert [a.control_id for a in acks] == [control for control, _ in sent]
    assert [(a.code, a.text) for a in acks] == [
        ("AA", "stored as version 1"),
        ("AA", "already stored as version 1"),
        ("AA", "stored as version 2; supersedes version 1"),
        ("AA", "recorded; result status P is not a signed report"),
        ("AA", "recorded; no matching study (none)"),
        ("AA", "stored as version 1"),
        ("AE", "no report text (TX, FT or ST OBX)"),
        ("AR", "unsupported message type: only ORU^R01"),
    ]
    first = store.signed_reports("1.7.1")
    assert [(r.version, r.result_status, r.report_text) for r in first] == [
        (1, "F", SIGNED),
        (2, "C", CORRECTED),
    ]
    assert first[0].superseded_at is not None and first[1].superseded_at is None
    assert [(r.version, r.message_control_id) for r in store.signed_reports("1.7.3")] == [(1, "Z3")]
    assert store.signed_reports("1.7.2") == []
    messages = store.report_messages()
    assert [(m.message_control_id, m.outcome, m.study_instance_uid) for m in messages] == [
        ("F1", "stored", "1.7.1"),
        ("F1", "repeat", "1.7.1"),
        ("C1", "corrected", "1.7.1"),
        ("P2", "not-final", "1.7.2"),
        ("U9", "unmatched", None),
        ("Z3", "stored", "1.7.3"),
        ("E3", "rejected", "1.7.3"),
        ("A1", "rejected", None),
    ]
    assert messages[4].report_text == "Normal chest."  # kept for a later match
    log = process.log_tail(200_000)
    assert "effusion" not in log and "PHANTOM" not in log  # no report text, no patient data
    assert "signed-report message F1 (status F): stored, answered AA; study 1.7.1" in log
