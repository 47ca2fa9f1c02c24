"""Signed reports from the other two sources, against one real ``d2r node`` process: the RIS
posts FHIR DiagnosticReports to its HTTP endpoint (credentials required, also on loopback), and
the PACS sends the radiologist's SR to its AE with dcmtk's ``storescu``.

The studies are recorded in the node's database before it starts, as its receivers record them
(one instance each, with its accession number); the one the PACS reports on is already done.
Everything is asserted through the study database.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from studydb.store import StudyStore
from tests.support.processes import Process, base_env, d2r_cmd, free_port, start_redis, wait_port
from tests.support.signed_reports import (
    add_study,
    diagnostic_report,
    fhir_body,
    set_state,
    signed_sr,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FHIR_STUDY = "1.2.826.0.1.3680043.8.498.9101"
SR_STUDY = "1.2.826.0.1.3680043.8.498.9102"
SIGNED = "Small left pleural effusion.\nNo pneumothorax."
CORRECTED = "Small left pleural effusion with adjacent atelectasis.\nNo pneumothorax."


@dataclass(frozen=True)
class Node:
    dicom_port: int
    http_port: int
    feedback_token: str
    ingest_token: str
    store: StudyStore
    process: Process
    spool: Path
    folder: Path


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    folder = tmp_path_factory.mktemp("signed-report-sources")
    url = f"sqlite:///{folder / 'd2r.db'}"
    store = StudyStore(url)
    add_study(store, FHIR_STUDY, accession="ACC-9101")
    add_study(store, SR_STUDY, accession="ACC-9102")
    set_state(store, SR_STUDY, "done")  # reported long ago: the signed report follows
    tokens = {"feedback": secrets.token_urlsafe(24), "ingest": secrets.token_urlsafe(24)}
    tokens_file = folder / "http-tokens"
    tokens_file.write_text(
        f"ris feedback {tokens['feedback']}\narchive ingest {tokens['ingest']}\n"
    )
    redis, broker = start_redis(folder)
    dicom_port, http_port = free_port(), free_port()
    env = base_env(
        D2R_DATABASE_URL=url,
        D2R_SPOOL_DIR=str(folder / "spool"),
        D2R_HOST="127.0.0.1",
        D2R_PORT=str(dicom_port),
        D2R_HTTP_PORT=str(http_port),
        D2R_HTTP_AUTH="required",
        D2R_HTTP_TOKENS_FILE=str(tokens_file),
        D2R_BROKER_URL=broker,
        D2R_MIN_FREE_BYTES="0",
        D2R_AUDIT_LOG=str(folder / "audit.jsonl"),
        D2R_FEEDBACK_SCORE_SECONDS="0",
        D2R_LOG_LEVEL="INFO",
    )
    process = Process(d2r_cmd("node"), env=env, log=folder / "node.log")
    try:
        wait_port(dicom_port, timeout=60)
        wait_port(http_port, timeout=30)
        yield Node(
            dicom_port,
            http_port,
            tokens["feedback"],
            tokens["ingest"],
            store,
            process,
            folder / "spool",
            folder,
        )
    finally:
        process.stop()
        redis.stop()
        store.close()


def _post(node: Node, report: dict[str, Any], token: str | None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.http_port}/fhir/DiagnosticReport",
        data=fhir_body(report),
        method="POST",
        headers={"Content-Type": "application/fhir+json"},
    )
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _diagnostics(answer: dict[str, Any]) -> str:
    return str(answer["issue"][0]["diagnostics"])


@pytest.mark.timeout(120)
def test_the_ris_posts_fhir_diagnostic_reports(node: Node) -> None:
    final = diagnostic_report(SIGNED, resource_id="rpt-1", version="1", accession="ACC-9101")
    status, answer = _post(node, final, node.feedback_token)
    assert (status, _diagnostics(answer)) == (201, "stored as version 1")

    preliminary = diagnostic_report(
        "Preliminary: effusion?", status="preliminary", resource_id="rpt-1", version="0"
    )
    preliminary["imagingStudy"] = [
        {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{FHIR_STUDY}"}}
    ]
    status, answer = _post(node, preliminary, node.feedback_token)
    assert (status, _diagnostics(answer)) == (
        200,
        "recorded; result status P is not a signed report",
    )

    corrected = diagnostic_report(
        CORRECTED, status="corrected", resource_id="rpt-1", version="2", study_uid=FHIR_STUDY
    )
    status, answer = _post(node, corrected, node.feedback_token)
    assert (status, _diagnostics(answer)) == (201, "stored as version 2; supersedes version 1")

    # the wrong role, no credential: refused before anything is read or recorded
    assert _post(node, final, node.ingest_token)[0] == 403
    assert _post(node, final, None)[0] == 401

    reports = node.store.signed_reports(FHIR_STUDY)
    assert [(r.version, r.result_status, r.report_text, r.source) for r in reports] == [
        (1, "F", SIGNED, "fhir:ris"),
        (2, "C", CORRECTED, "fhir:ris"),
    ]
    assert reports[0].superseded_at is not None and reports[1].superseded_at is None
    messages = [m for m in node.store.report_messages() if m.source.startswith("fhir:")]
    assert [(m.message_control_id, m.outcome, m.study_instance_uid) for m in messages] == [
        ("rpt-1/_history/1", "stored", FHIR_STUDY),
        ("rpt-1/_history/0", "not-final", FHIR_STUDY),
        ("rpt-1/_history/2", "corrected", FHIR_STUDY),
    ]
    assert messages[1].report_text == "Preliminary: effusion?"


def _storescu(node: Node, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/usr/bin/storescu", "-aet", "PACS", "-aec", "D2R", "127.0.0.1", str(node.dicom_port)]
        + [str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.timeout(120)
def test_the_pacs_sends_the_signed_sr_with_the_study(node: Node) -> None:
    before = node.store.get(SR_STUDY)
    assert before is not None and before.state == "done"
    events = len(node.store.events(SR_STUDY))
    unverified = signed_sr(["Draft, not signed."], study_uid=SR_STUDY, verified=False)
    verified = signed_sr(SIGNED.split("\n"), study_uid=SR_STUDY, accession="ACC-9102")
    for name, ds in (("unverified.dcm", unverified), ("verified.dcm", verified)):
        path = node.folder / name
        ds.save_as(path, enforce_file_format=True)
        sent = _storescu(node, path)
        assert sent.returncode == 0, sent.stdout + sent.stderr

    reports = node.store.signed_reports(SR_STUDY)
    assert [(r.version, r.result_status, r.report_text, r.source) for r in reports] == [
        (1, "F", SIGNED, "dicom:PACS"),
    ]
    assert reports[0].message_control_id == verified.SOPInstanceUID
    messages = [m for m in node.store.report_messages() if m.source == "dicom:PACS"]
    assert [(m.message_control_id, m.outcome, m.result_status) for m in messages] == [
        (unverified.SOPInstanceUID, "not-final", "P"),
        (verified.SOPInstanceUID, "stored", "F"),
    ]
    assert messages[0].report_text == "Draft, not signed."
    # the study itself is untouched: same state, same instance, no event but the report's
    after = node.store.get(SR_STUDY)
    assert after is not None and after.state == "done"
    assert [i.sop_instance_uid for i in node.store.instances(SR_STUDY)] == [SR_STUDY + ".1.1"]
    assert [e.kind for e in node.store.events(SR_STUDY)[events:]] == ["signed-report"]
    on_disk = sorted(p.name for p in (node.spool / "reports" / SR_STUDY).iterdir())
    assert on_disk == sorted(f"{ds.SOPInstanceUID}.dcm" for ds in (unverified, verified))

    log = node.process.log_tail(200_000)
    assert "pleural" not in log and "SYNTHETIC" not in log  # no report text, no patient data
    assert f"signed-report SR {verified.SOPInstanceUID} (COMPLETE/VERIFIED, status F)" in log
