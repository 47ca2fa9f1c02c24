"""Signed reports as FHIR DiagnosticReports: read with fhir.resources, matched and stored as HL7
reports are, answered with an OperationOutcome."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from feedback.fhir import (
    FHIR_JSON,
    MAX_TEXT_CHARS,
    FhirReceiver,
    FhirRejected,
    read_diagnostic_report,
)
from studydb.errors import DatabaseUnavailable
from studydb.feedback import ReportMessage, SignedReport, StoredReport
from studydb.store import StudyStore
from tests.support.signed_reports import add_study, diagnostic_report, fhir_body

HEADERS = {"content-type": "application/fhir+json"}


def _read(report: dict[str, Any], sender: str = "ris") -> Any:
    return read_diagnostic_report(fhir_body(report), sender=sender)


def test_a_final_report_gives_its_text_study_accession_and_version() -> None:
    report = _read(
        diagnostic_report(
            "Small left effusion.\r\nNo pneumothorax.  ",
            version="3",
            accession="ACC-1",
            study_uid="1.2.3",
            contained_study_uid="1.2.4",
        ),
        sender="ris-feed",
    )
    assert report.result_status == "F" and report.fhir_status == "final"
    assert report.text == "Small left effusion.\nNo pneumothorax."
    assert report.study_uids == ("1.2.3", "1.2.4")
    assert report.accession_numbers == ("ACC-1",)
    assert report.control_id == "r1/_history/3"
    assert report.source == "fhir:ris-feed"


@pytest.mark.parametrize(
    "status,result",
    [
        ("final", "F"),
        ("corrected", "C"),
        ("amended", "C"),
        ("appended", "C"),
        ("preliminary", "P"),
        ("partial", "I"),
        ("registered", "O"),
        ("cancelled", "X"),
        ("entered-in-error", "W"),
        ("unknown", ""),
    ],
)
def test_each_status_maps_to_an_hl7_result_status(status: str, result: str) -> None:
    assert _read(diagnostic_report("x", status=status)).result_status == result


def test_html_is_read_as_text_and_the_conclusion_is_the_last_resort() -> None:
    markup = (
        "<div xmlns='http://www.w3.org/1999/xhtml'><h2>Findings</h2><p>Clear&nbsp;lungs, "
        "<b>no</b> effusion.</p><script>alert(1)</script><p>Normal heart.</p></div>"
    )
    html = _read(diagnostic_report(markup, content_type="text/html; charset=utf-8"))
    assert html.text == "Findings\nClear lungs, no effusion.\nNormal heart."
    latin = "Épanchement pleural.".encode("latin-1")
    report = diagnostic_report(None, conclusion="unused")
    report["presentedForm"] = [
        {"contentType": "application/pdf", "data": "JVBERi0="},
        {"contentType": "text/plain; charset=ISO-8859-1", "data": _b64(latin)},
    ]
    assert _read(report).text == "Épanchement pleural."
    report["presentedForm"][1]["contentType"] = "text/plain; charset=rot13"
    assert _read(report).text.startswith("\ufffdpanchement")  # read as UTF-8
    assert _read(diagnostic_report(None, conclusion=" No acute disease. ")).text == (
        "No acute disease."
    )
    assert _read(diagnostic_report(None)).text == ""
    long = _read(diagnostic_report("x" * (MAX_TEXT_CHARS + 10)))
    assert len(long.text) == MAX_TEXT_CHARS


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def test_accession_numbers_come_from_acsn_identifiers_and_the_order() -> None:
    report = diagnostic_report("x", accession="ACC-1")
    report["identifier"].insert(0, {"system": "urn:ris:reports", "value": "REPORT-7"})
    report["basedOn"] = [
        {"identifier": {"value": "ORDER-2"}},
        {"reference": "#order"},
        {"reference": "ServiceRequest/99"},  # a literal reference: nothing to read here
    ]
    report["contained"] = [
        {
            "resourceType": "ServiceRequest",
            "id": "order",
            "status": "active",
            "intent": "order",
            "subject": {"display": "phantom"},
            "identifier": [
                {"type": {"coding": [{"code": "PLAC"}]}, "value": "PLACER-1"},
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                "code": "ACSN",
                            }
                        ]
                    },
                    "value": "ACC-3",
                },
            ],
        }
    ]
    assert _read(report).accession_numbers == ("ACC-1", "ORDER-2", "ACC-3")


def test_only_dicom_uid_identifiers_name_a_study() -> None:
    report = diagnostic_report("x", study_uid="1.2.840.5")
    report["imagingStudy"] += [
        {"identifier": {"system": "urn:other", "value": "urn:oid:1.2.9"}},
        {"identifier": {"system": "urn:dicom:uid", "value": "urn:oid:1.2.x"}},
        {"identifier": {"system": "urn:dicom:uid", "value": "urn:oid:" + "1." * 40 + "1"}},
        {"reference": "#missing"},
    ]
    assert _read(report).study_uids == ("1.2.840.5",)


def test_message_control_ids() -> None:
    first = _read(diagnostic_report("One."))
    second = _read(diagnostic_report("Two."))
    assert first.control_id.startswith("r1#") and first.control_id != second.control_id
    assert _read(diagnostic_report("One.")).control_id == first.control_id
    anonymous = _read(diagnostic_report("One.", resource_id=None)).control_id
    assert anonymous.startswith("sha256:") and len(anonymous) <= 64
    long_id = _read(diagnostic_report("One.", resource_id="a" * 64, version="b" * 20))
    assert long_id.control_id.startswith("sha256:") and len(long_id.control_id) <= 64


def test_the_examples_in_the_module_hold() -> None:
    import doctest

    import feedback.fhir

    result = doctest.testmod(feedback.fhir)
    assert result.attempted >= 3 and result.failed == 0


@pytest.mark.parametrize(
    "body,status,words",
    [
        (b"\xff\xfe not json", 400, "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "not JSON"),
        (b'{"resourceType": "Patient", "id": "p1"}', 400, "not a FHIR DiagnosticReport"),
        (b"[]", 400, "not a FHIR DiagnosticReport"),
        (fhir_body(diagnostic_report("x", status="signed")), 422, "status"),
        (fhir_body({**diagnostic_report("x"), "PHANTOM": "PHANTOM^PATIENT"}), 422, "unknown"),
    ],
)
def test_what_is_not_a_diagnostic_report_is_rejected(body: bytes, status: int, words: str) -> None:
    with pytest.raises(FhirRejected) as caught:
        read_diagnostic_report(body, sender="ris")
    assert caught.value.status == status
    assert caught.value.code == ("AR" if status == 400 else "AE")
    assert words in caught.value.reason
    assert "PHANTOM" not in caught.value.reason  # element paths, never values


# ---------------------------------------------------------------------------- the endpoint
@pytest.fixture
def store(tmp_path: Path) -> Iterator[StudyStore]:
    s = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    add_study(s, "1.8.1", accession="ACC-1")
    add_study(s, "1.8.2", accession="ACC-2")
    yield s
    s.close()


def _post(
    receiver: FhirReceiver,
    body: bytes,
    *,
    headers: dict[str, str] | None = None,
    user: str = "ris",
) -> tuple[int, dict[str, Any]]:
    head = dict(HEADERS if headers is None else headers)
    head.setdefault("content-length", str(len(body)))
    status, content_type, answer = receiver(
        "POST", "/fhir/DiagnosticReport", head, io.BytesIO(body), "127.0.0.1", user
    )
    assert content_type == FHIR_JSON
    outcome = json.loads(answer)
    assert outcome["resourceType"] == "OperationOutcome"
    return status, outcome["issue"][0]


def test_the_endpoint_stores_repeats_corrects_and_records(store: StudyStore) -> None:
    receiver = FhirReceiver(store, max_bytes=1 << 20)
    signed = diagnostic_report("Clear lungs.", version="1", accession="ACC-1")
    status, issue = _post(receiver, fhir_body(signed))
    assert (status, issue["severity"], issue["diagnostics"]) == (
        201,
        "information",
        "stored as version 1",
    )
    assert _post(receiver, fhir_body(signed)) == (
        200,
        {
            "severity": "information",
            "code": "informational",
            "diagnostics": "already stored as version 1",
        },
    )
    corrected = diagnostic_report(
        "Small effusion.", status="amended", version="2", study_uid="1.8.1"
    )
    assert _post(receiver, fhir_body(corrected))[1]["diagnostics"] == (
        "stored as version 2; supersedes version 1"
    )
    preliminary = diagnostic_report("Draft.", status="preliminary", accession="ACC-2")
    assert _post(receiver, fhir_body(preliminary))[0] == 200
    unmatched = diagnostic_report("Other.", resource_id="r9", accession="ACC-9")
    assert _post(receiver, fhir_body(unmatched))[1]["diagnostics"] == (
        "recorded; no matching study (none)"
    )
    status, issue = _post(receiver, fhir_body(diagnostic_report(None, accession="ACC-2")))
    assert (status, issue["severity"]) == (422, "error")
    assert "presentedForm" in issue["diagnostics"]
    assert _post(receiver, b'{"resourceType": "Bundle"}', user="other")[0] == 400

    reports = store.signed_reports("1.8.1")
    assert [(r.version, r.result_status, r.report_text, r.source) for r in reports] == [
        (1, "F", "Clear lungs.", "fhir:ris"),
        (2, "C", "Small effusion.", "fhir:ris"),
    ]
    assert reports[1].message_control_id == "r1/_history/2"
    assert store.signed_reports("1.8.2") == []
    messages = store.report_messages()
    assert [(m.outcome, m.ack_code, m.study_instance_uid) for m in messages] == [
        ("stored", "AA", "1.8.1"),
        ("repeat", "AA", "1.8.1"),
        ("corrected", "AA", "1.8.1"),
        ("not-final", "AA", "1.8.2"),
        ("unmatched", "AA", None),
        ("rejected", "AE", "1.8.2"),
        ("rejected", "AR", None),
    ]
    assert messages[3].result_status == "P" and messages[3].report_text == "Draft."
    assert messages[-1].source == "fhir:other"


def test_the_endpoint_bounds_and_checks_what_it_reads(store: StudyStore) -> None:
    receiver = FhirReceiver(store, max_bytes=2048)
    body = fhir_body(diagnostic_report("x" * 4000, accession="ACC-1"))
    assert _post(receiver, body)[0] == 413  # by Content-Length, nothing read
    assert _post(receiver, body, headers={**HEADERS, "content-length": ""})[0] == 413
    small = fhir_body(diagnostic_report("Clear.", accession="ACC-1"))
    assert _post(receiver, small, headers={"content-type": "text/plain"})[0] == 415
    assert _post(receiver, small, headers={"content-type": "application/json"})[0] == 201
    assert len(store.report_messages()) == 1  # 413 and 415: not read, not recorded


class _Cut:
    def read(self, size: int = -1, /) -> bytes:
        raise ValueError("chunked body cut off")


def test_a_cut_off_body_is_a_bad_request(store: StudyStore) -> None:
    receiver = FhirReceiver(store, max_bytes=2048)
    status, _, _ = receiver("POST", "/fhir/DiagnosticReport", HEADERS, _Cut(), "127.0.0.1", "ris")
    assert status == 400


class _Down:
    """A study database that does not answer."""

    def known_studies(self, study_uids: Sequence[str]) -> list[str]:
        raise DatabaseUnavailable("down")

    def studies_with_accession(self, accession_number: str) -> list[str]:
        raise DatabaseUnavailable("down")

    def store_signed_report(self, report: SignedReport) -> StoredReport:
        raise DatabaseUnavailable("down")

    def record_report_message(self, message: ReportMessage) -> None:
        raise DatabaseUnavailable("down")


def test_an_unreachable_database_asks_the_sender_to_send_again() -> None:
    receiver = FhirReceiver(_Down(), max_bytes=2048, wait_seconds=0.0)
    status, issue = _post(receiver, fhir_body(diagnostic_report("x", accession="ACC-1")))
    assert (status, issue["code"]) == (503, "transient")
    assert _post(receiver, b"not json")[0] == 400  # a rejection that cannot be recorded
