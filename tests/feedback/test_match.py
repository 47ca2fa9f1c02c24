"""Matching signed reports to studies, storing them once per version, recording the rest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from feedback.match import receive
from feedback.oru import read_oru
from studydb.store import StudyStore
from tests.support.signed_reports import add_study, oru


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StudyStore]:
    s = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    add_study(s, "1.9.1", accession="ACC1")
    add_study(s, "1.9.2", accession="ACC2")
    add_study(s, "1.9.3", accession="SHARED")
    add_study(s, "1.9.4", accession="SHARED")
    yield s
    s.close()


def _receive(store: StudyStore, data: bytes) -> tuple[str, str, str | None, str]:
    answer = receive(store, read_oru(data), now=1000.0)
    return answer.code, answer.outcome, answer.study_instance_uid, answer.note


def test_final_then_corrected_are_versions_and_the_correction_supersedes(
    store: StudyStore,
) -> None:
    assert _receive(store, oru("Clear.", control_id="M1", accession="ACC1")) == (
        "AA",
        "stored",
        "1.9.1",
        "stored as version 1",
    )
    assert _receive(store, oru("Clear.", control_id="M1", accession="ACC1"))[1] == "repeat"
    assert _receive(store, oru("Clear.", control_id="M1b", accession="ACC1"))[1] == "repeat"
    corrected = oru("Small effusion.", control_id="M2", status="C", accession="ACC1")
    assert _receive(store, corrected) == (
        "AA",
        "corrected",
        "1.9.1",
        "stored as version 2; supersedes version 1",
    )
    reports = store.signed_reports("1.9.1")
    assert [(r.version, r.result_status, r.report_text) for r in reports] == [
        (1, "F", "Clear."),
        (2, "C", "Small effusion."),
    ]
    assert reports[0].superseded_at is not None and reports[1].superseded_at is None
    assert reports[1].message_control_id == "M2" and reports[1].source == "hl7:RIS^HOSPITAL"
    outcomes = [(m.outcome, m.ack_code) for m in store.report_messages()]
    assert outcomes == [("stored", "AA"), ("repeat", "AA"), ("repeat", "AA"), ("corrected", "AA")]


def test_a_study_uid_in_the_message_wins_over_the_accession_number(store: StudyStore) -> None:
    assert _receive(store, oru("a", accession="ACC1", study_uid="1.9.2"))[2] == "1.9.2"
    assert _receive(store, oru("b", control_id="Z", zds_uid="1.9.3", accession="SHARED"))[2] == (
        "1.9.3"
    )


def test_preliminary_unmatched_and_ambiguous_reports_are_recorded_not_stored(
    store: StudyStore,
) -> None:
    code, outcome, uid, note = _receive(store, oru("Draft.", status="P", accession="ACC2"))
    assert (code, outcome, uid) == ("AA", "not-final", "1.9.2")
    assert "status P" in note
    assert _receive(store, oru("Other.", accession="NOPE"))[:3] == ("AA", "unmatched", None)
    assert _receive(store, oru("Two.", accession="SHARED"))[:3] == ("AA", "ambiguous", None)
    assert _receive(store, oru("", accession="ACC2"))[:2] == ("AE", "rejected")
    assert all(not store.signed_reports(u) for u in ("1.9.2", "1.9.3", "1.9.4"))
    messages = store.report_messages()
    assert [(m.outcome, m.report_text) for m in messages] == [
        ("not-final", "Draft."),
        ("unmatched", "Other."),
        ("ambiguous", "Two."),
        ("rejected", None),
    ]
    assert messages[0].accession_number == "ACC2" and messages[0].result_status == "P"
