"""The node and the report builder must not drift: every image ``dicom_node.selection`` passes to
the model is one ``report`` can reference (a property test over the selection's header space)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.selection import ACCEPTED_SOP_CLASSES, select_images
from report.build import (
    REFERENCEABLE_SOP_CLASSES,
    AlgorithmInfo,
    LesionFinding,
    ReportContent,
    build_reports,
    source_modality,
)
from studydb.records import InstanceRecord

STUDY = "1.2.826.0.1.3680043.8.498.1"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
MULTIFRAME_SC = "1.2.840.10008.5.1.4.1.1.7.2"

sop_classes = st.sampled_from([*ACCEPTED_SOP_CLASSES, CT, MULTIFRAME_SC])
modalities = st.sampled_from(["CR", "DX", "cr", "dx", "OT", "DOC", "CT", "SC", "", "MG"])
body_parts = st.sampled_from(["CHEST", "chest", "", "THORAX", "Lung", "CHEST_PA", "KNEE", "SKULL"])
views = st.sampled_from(["PA", "AP", "", "pa", "LL", "LATERAL", "RL", "LLO", "AP SUPINE"])
images = st.fixed_dictionaries(
    {
        "sop_class_uid": sop_classes,
        "modality": modalities,
        "body_part_examined": body_parts,
        "view_position": views,
        "rows": st.integers(min_value=2, max_value=4096),
        "columns": st.integers(min_value=2, max_value=4096),
        "frames": st.sampled_from([None, 1, 2]),
    }
)


def _record(n: int, header: dict[str, object]) -> InstanceRecord:
    return InstanceRecord(
        study_instance_uid=STUDY,
        series_instance_uid=f"{STUDY}.{n}",
        sop_instance_uid=f"{STUDY}.{n}.1",
        sop_class_uid=str(header["sop_class_uid"]),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality=str(header["modality"]),
        body_part_examined=str(header["body_part_examined"]),
        view_position=str(header["view_position"]),
        series_description="",
        path=f"/spool/{n}.dcm",
        size=1,
        sha256="0" * 64,
        calling_ae_title="MOD",
        received_at=T0 + timedelta(seconds=n),
    )


def _header(record: InstanceRecord, header: dict[str, object]) -> Dataset:
    """The image header a spooled file with these values has (no pixels needed)."""
    with config.disable_value_validation():  # real headers carry "chest", "cr", ...
        return _fill(Dataset(), record, header)


def _fill(ds: Dataset, record: InstanceRecord, header: dict[str, object]) -> Dataset:
    ds.SOPClassUID = record.sop_class_uid
    ds.SOPInstanceUID = record.sop_instance_uid
    ds.StudyInstanceUID = record.study_instance_uid
    ds.SeriesInstanceUID = record.series_instance_uid
    ds.Modality = record.modality
    if record.body_part_examined:
        ds.BodyPartExamined = record.body_part_examined
    if record.view_position:
        ds.ViewPosition = record.view_position
    ds.Rows = header["rows"]
    ds.Columns = header["columns"]
    if header["frames"] is not None:
        ds.NumberOfFrames = header["frames"]
    ds.PatientName = "INVARIANT^TEST"
    ds.PatientID = "INV-1"
    return ds


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(st.lists(images, min_size=1, max_size=4))
def test_every_selected_image_can_be_referenced_by_the_report(
    study: list[dict[str, object]],
) -> None:
    records = [_record(n, h) for n, h in enumerate(study)]
    selection = select_images(records)
    if selection.skip_reason is not None:
        return
    headers = {r.sop_instance_uid: _header(r, study[n]) for n, r in enumerate(records)}
    chosen = [headers[r.sop_instance_uid] for r in selection.images]
    for ds in chosen:
        assert ds.SOPClassUID in REFERENCEABLE_SOP_CLASSES
        assert source_modality(ds) is not None, (ds.SOPClassUID, ds.Modality)
    image = chosen[0]
    box = (0.0, 0.0, float(image.Columns), float(image.Rows))
    content = ReportContent(
        findings="f",
        impression="i",
        lesions=[LesionFinding("Nodule/Mass", 0.9, box)],
        image=image,
        evidence=chosen,
    )
    tid1500, *_ = build_reports(content, AlgorithmInfo("d2r-demo", "1"), text_sr=False)
    referenced = {
        (str(ref.ReferencedSOPClassUID), str(ref.ReferencedSOPInstanceUID))
        for item in tid1500.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert {(str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in chosen} <= referenced


def test_secondary_capture_chest_film_gets_a_report_with_a_drawable_box() -> None:
    """A digitised chest film (SC, Modality CR, no spacing) gets a TID 1500 box on its pixels."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.Rows, ds.Columns = 1024, 1024
    ds.PatientName = "SC^FILM"
    ds.PatientID = "SC-1"
    content = ReportContent("f", "i", [LesionFinding("Nodule/Mass", 0.8, (10, 20, 30, 40))], ds)
    tid1500, text = build_reports(content, AlgorithmInfo("d2r-demo", "1"))
    back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_encode(tid1500)))
    scoords = _items(back, "SCOORD")
    assert scoords, "no SCOORD in the report"
    for scoord in scoords:
        (ref,) = scoord.ContentSequence[0].ReferencedSOPSequence
        assert ref.ReferencedSOPClassUID == ds.SOPClassUID
        assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert scoord.GraphicData[:2] == [10.0, 20.0]
    assert text.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11"


def _encode(ds: Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _items(ds: Dataset, value_type: str) -> list[Dataset]:
    found = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == value_type:
            found.append(item)
        found += _items(item, value_type)
    return found
