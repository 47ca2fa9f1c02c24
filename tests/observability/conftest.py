"""Fixtures for the observability tests: a study database, a synthetic image and its SRs."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

from studydb.records import InstanceRecord
from studydb.store import StudyStore
from tests.support.dicom_files import make_dx


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StudyStore]:
    s = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    yield s
    s.close()


def record_for(
    ds: pydicom.Dataset, path: Path, *, received_at: float | None = None
) -> InstanceRecord:
    """The instance record the listener would write for ``ds`` spooled at ``path``."""
    at = datetime.now(UTC) if received_at is None else datetime.fromtimestamp(received_at, UTC)
    return InstanceRecord(
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        modality=ds.Modality,
        body_part_examined=ds.get("BodyPartExamined", ""),
        view_position=ds.get("ViewPosition", ""),
        series_description=ds.get("SeriesDescription", ""),
        path=str(path),
        size=path.stat().st_size,
        sha256="0" * 64,
        calling_ae_title="MODALITY",
        received_at=at,
    )


def build_srs(
    image: pydicom.Dataset,
    boxes: list[tuple[float, float, float, float]],
    out: Path,
    roi_encoding: str = "tid1410",
) -> list[str]:
    """Write the TID 1500 and text SRs the worker would write for ``boxes`` on ``image``
    (``roi_encoding``: the ``D2R_SR_ROI_ENCODING`` value)."""
    from report.build import (
        AlgorithmInfo,
        LesionFinding,
        ReportContent,
        RoiEncoding,
        build_reports,
    )

    content = ReportContent(
        findings="Findings <b>text</b>",
        impression="Impression & more",
        lesions=[LesionFinding("Cardiomegaly", 0.9, box) for box in boxes],
        image=image,
        evidence=[image],
    )
    paths = []
    out.mkdir(parents=True, exist_ok=True)
    algorithm = AlgorithmInfo(name="d2r-net-random", version="0.0-test")
    for ds in build_reports(content, algorithm, roi_encoding=RoiEncoding(roi_encoding)):
        path = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    return paths


@pytest.fixture
def dx(tmp_path: Path) -> tuple[pydicom.Dataset, Path]:
    """A 256x208 synthetic DX chest image on disk."""
    path = tmp_path / "image.dcm"
    ds = make_dx(path, rows=256, cols=208)
    return ds, path
