"""The accession number a signed report is matched by: read from each instance's header,
recorded with the instance, found again by the study database."""

from __future__ import annotations

import io
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.ingest import instance_record
from dicom_node.metadata import parse_header
from dicom_node.spool import SpooledInstance
from studydb.store import StudyStore
from tests.support.dicom_files import make_dx


def test_the_header_accession_number_is_recorded_and_matches_the_study(tmp_path: Path) -> None:
    ds = make_dx(None, seed=3)
    ds.AccessionNumber = "ACC\t42"  # a control character from a broken sender
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False, implicit_vr=False, little_endian=True)
    header = parse_header(buffer.getvalue(), ExplicitVRLittleEndian)
    assert header.accession_number == "ACC 42"
    spooled = SpooledInstance(tmp_path / "x.dcm", 1, "0" * 64, "stored")
    record = instance_record(header, spooled, ExplicitVRLittleEndian, "PACS")
    store = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    try:
        store.record_instance(record, outcome="stored")
        assert store.studies_with_accession("ACC 42") == [str(ds.StudyInstanceUID)]
        assert [i.accession_number for i in store.instances(str(ds.StudyInstanceUID))] == ["ACC 42"]
    finally:
        store.close()
