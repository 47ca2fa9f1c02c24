"""Signed reports as DICOM SRs from the PACS: read from the document's flags and content tree,
taken by the node's ingest service (here its STOW-RS receiver, in process) without touching the
study, and never confused with the SRs d2r made."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes

from dicom_node.ingest import SIGNED_REPORT
from dicom_node.spool import Spool
from dicom_node.stow import StowReceiver
from feedback.dicom_sr import (
    BASIC_TEXT_SR,
    COMPREHENSIVE_SR,
    ENHANCED_SR,
    MAX_DEPTH,
    SrIntake,
    is_own_report,
    read_sr_report,
)
from report.build import AlgorithmInfo, ReportContent, build_reports
from studydb.ingest import NodeRecorder
from studydb.store import StudyStore
from tests.support.dicom_files import make_dx
from tests.support.signed_reports import add_study, set_state, signed_sr

STUDY = "1.2.826.0.1.3680043.8.498.7001"
TEXT = ["Small left pleural effusion.", "No pneumothorax."]


@pytest.mark.parametrize(
    "kind,sop_class",
    [("basic", BASIC_TEXT_SR), ("enhanced", ENHANCED_SR), ("comprehensive", COMPREHENSIVE_SR)],
)
def test_a_verified_complete_sr_is_a_final_report(kind: str, sop_class: str) -> None:
    ds = signed_sr(TEXT, study_uid=STUDY, accession="ACC-7", kind=kind)
    assert ds.SOPClassUID == sop_class
    report = read_sr_report(ds, "PACS_AE")
    assert report is not None
    assert (report.result_status, report.flags) == ("F", "COMPLETE/VERIFIED")
    assert report.text == "\n".join(TEXT)  # the language (HAS CONCEPT MOD) is context
    assert report.study_uids == (STUDY,) and report.accession_numbers == ("ACC-7",)
    assert report.control_id == ds.SOPInstanceUID
    assert report.source == "dicom:PACS_AE"


def test_the_flags_decide_the_status() -> None:
    first = signed_sr(TEXT, study_uid=STUDY)
    corrected = signed_sr(["Effusion resolved."], study_uid=STUDY, predecessor=first)
    unverified = signed_sr(TEXT, study_uid=STUDY, verified=False)
    partial = signed_sr(TEXT, study_uid=STUDY, verified=False, complete=False)
    preliminary = signed_sr(TEXT, study_uid=STUDY)
    preliminary.PreliminaryFlag = "PRELIMINARY"
    statuses = [
        read_sr_report(ds, "PACS").result_status  # type: ignore[union-attr]
        for ds in (first, corrected, unverified, partial, preliminary)
    ]
    assert statuses == ["F", "C", "P", "I", "P"]


def test_coded_findings_the_report_contains_are_text_too() -> None:
    ds = signed_sr(["Left effusion."], study_uid=STUDY, coded=[codes.SCT.Pneumothorax])
    report = read_sr_report(ds, "PACS")
    assert report is not None and report.text == "Left effusion.\nFinding: Pneumothorax"


def _text_item(value: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = value
    return item


def _plain(ds: Dataset) -> Dataset:
    """``ds`` as pydicom reads it from a file (plain data sets, no highdicom items)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def test_the_content_tree_is_read_within_its_bounds() -> None:
    ds = _plain(signed_sr(["top"], study_uid=STUDY))
    node = ds.ContentSequence[-1]  # the findings container
    for level in range(MAX_DEPTH + 5):  # a chain deeper than the walk goes
        child = _text_item(f"level {level}")
        node.ContentSequence = Sequence([child])
        node = child
    report = read_sr_report(ds, "PACS")
    assert report is not None
    lines = report.text.split("\n")
    assert lines[0] == "level 0" and len(lines) == MAX_DEPTH - 1
    wide = _plain(signed_sr([], study_uid=STUDY))
    wide.ContentSequence[-1].ContentSequence = Sequence(
        [_text_item(f"item {n}") for n in range(20_000)]
    )
    report = read_sr_report(wide, "PACS")
    assert report is not None and len(report.text.split("\n")) < 10_000


def test_d2r_own_srs_and_other_classes_are_no_signed_report() -> None:
    image = make_dx(None, study_uid=STUDY, rows=64, cols=64)
    algorithm = AlgorithmInfo("d2r-net", "1.0")
    own = build_reports(
        ReportContent("Clear lungs.", "Normal chest.", [], image), algorithm, text_sr=True
    )
    assert {str(ds.SOPClassUID) for ds in own} == {COMPREHENSIVE_SR, BASIC_TEXT_SR}
    assert algorithm.manufacturer == "d2r"
    for ds in own:
        assert is_own_report(ds)
        assert read_sr_report(ds, "PACS") is None
    assert read_sr_report(image, "PACS") is None
    flagless = signed_sr(TEXT, study_uid=STUDY)
    del flagless.VerificationFlag  # type 1 in an SR document: without it, no document
    assert read_sr_report(flagless, "PACS") is None
    intake = SrIntake(_NoBook(), max_bytes=4096, wait_seconds=0.0)
    assert intake.accept(own[1], "PACS") is None


class _Malformed(Dataset):
    """A content item whose values cannot be converted (as pydicom raises for a bad value)."""

    def get(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("invalid value")


def test_an_unreadable_sr_is_left_to_the_instance_path() -> None:
    ds = _plain(signed_sr(TEXT, study_uid=STUDY))
    ds.ContentSequence = Sequence([_Malformed()])
    with pytest.raises(ValueError, match="unreadable SR"):
        read_sr_report(ds, "PACS")
    assert SrIntake(_NoBook(), max_bytes=4096, wait_seconds=0.0).accept(ds, "PACS") is None


class _NoBook:
    """A study database the test must never reach."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the intake called {name}")


# ------------------------------------------------------------- the ingest service, in process
@dataclass
class Site:
    store: StudyStore
    spool: Spool
    stow: StowReceiver

    def post(self, *datasets: Dataset) -> tuple[int, dict[str, Any]]:
        body = b""
        for ds in datasets:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            body += b"--b\r\nContent-Type: application/dicom\r\n\r\n" + buffer.getvalue() + b"\r\n"
        body += b"--b--\r\n"
        headers = {
            "content-type": 'multipart/related; type="application/dicom"; boundary=b',
            "content-length": str(len(body)),
        }
        status, _, answer = self.stow(
            "POST", "/dicom-web/studies", headers, io.BytesIO(body), "127.0.0.1", "pacs"
        )
        return status, json.loads(answer)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    store = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    spool = Spool(tmp_path / "spool")
    recorder = NodeRecorder(store, "node-1", wait_seconds=1.0)
    intake = SrIntake(store, max_bytes=64 * 1024, wait_seconds=1.0)
    yield Site(store, spool, StowReceiver(spool, recorder, ledger=recorder, reports=intake))
    store.close()


def test_a_signed_sr_is_stored_as_the_report_and_leaves_the_study_alone(site: Site) -> None:
    add_study(site.store, STUDY, accession="ACC-7")
    set_state(site.store, STUDY, "queued")
    events = len(site.store.events(STUDY))
    first = signed_sr(TEXT, study_uid=STUDY, accession="ACC-7")
    preliminary = signed_sr(["Draft only."], study_uid=STUDY, verified=False)
    corrected = signed_sr(["Effusion resolved."], study_uid=STUDY, predecessor=first)
    status, answer = site.post(first, preliminary, corrected)
    assert status == 200 and len(answer["00081199"]["Value"]) == 3  # every part stored
    assert site.post(first)[0] == 200  # sent again: a repeat

    view = site.store.get(STUDY)
    assert view is not None and view.state == "queued"  # not re-opened, not queued again
    assert [i.sop_instance_uid for i in site.store.instances(STUDY)] == [STUDY + ".1.1"]
    kinds = [e.kind for e in site.store.events(STUDY)[events:]]
    assert kinds == ["signed-report", "signed-report"]  # versions 1 and 2, nothing else
    reports = site.store.signed_reports(STUDY)
    assert [(r.version, r.result_status, r.report_text, r.source) for r in reports] == [
        (1, "F", "\n".join(TEXT), "dicom:STOW-RS"),
        (2, "C", "Effusion resolved.", "dicom:STOW-RS"),
    ]
    assert reports[0].message_control_id == first.SOPInstanceUID
    messages = site.store.report_messages()
    assert [(m.outcome, m.result_status) for m in messages] == [
        ("stored", "F"),
        ("not-final", "P"),
        ("corrected", "C"),
        ("repeat", "F"),
    ]
    folder = site.spool.reports_dir / STUDY
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{ds.SOPInstanceUID}.dcm" for ds in (first, preliminary, corrected)
    )
    assert not (site.spool.instances_dir / STUDY / f"{first.SOPInstanceUID}.dcm").exists()


def test_an_sr_of_an_unknown_study_is_recorded_unmatched(site: Site) -> None:
    ds = signed_sr(TEXT, study_uid="1.2.826.0.1.3680043.8.498.7999", accession="NONE")
    assert site.post(ds)[0] == 200
    assert [(m.outcome, m.study_instance_uid) for m in site.store.report_messages()] == [
        ("unmatched", None)
    ]
    assert site.store.get("1.2.826.0.1.3680043.8.498.7999") is None  # no study made for it


def test_own_and_oversized_srs_are_instances(site: Site) -> None:
    image = make_dx(None, study_uid=STUDY, rows=64, cols=64)
    own = build_reports(
        ReportContent("Clear.", "Normal.", [], image), AlgorithmInfo("d2r-net", "1.0")
    )
    large = signed_sr(["x" * 70_000], study_uid=STUDY)
    assert site.post(*own, large)[0] == 200
    recorded = {i.sop_instance_uid for i in site.store.instances(STUDY)}
    assert recorded == {
        str(own[0].SOPInstanceUID),
        str(own[1].SOPInstanceUID),
        large.SOPInstanceUID,
    }
    assert site.store.report_messages() == []


def test_the_outcome_is_named_for_the_audit() -> None:
    assert SIGNED_REPORT == "signed-report"
