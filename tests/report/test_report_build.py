"""Building the TID 1500 Comprehensive SR and the Basic Text SR (report.build)."""

from __future__ import annotations

import copy
import datetime
import logging
import math
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from report.build import (
    NO_FINDINGS_TEXT,
    NO_IMPRESSION_TEXT,
    OHIF_RECTANGLE_ROI_TRACKING_IDENTIFIER,
    AlgorithmInfo,
    LesionFinding,
    ReportContent,
    RoiEncoding,
    build_reports,
    clip_box,
    finding_label,
)
from report.codes import PRIVATE_SCHEME_DESIGNATOR, finding_codes
from report.errors import SourceImageError

DciodvfyErrors = Callable[[Path], list[str]]
Dsrdump = Callable[[Path], "subprocess.CompletedProcess[str]"]

CLASSES = ("Cardiomegaly", "Aortic enlargement", "Pleural effusion", "Nodule/Mass", "ILD")


def lesions_inside(image: Dataset, count: int) -> list[LesionFinding]:
    """`count` lesions with boxes inside the image, sized from its matrix."""
    columns, rows = float(image.Columns), float(image.Rows)
    found = []
    for i in range(count):
        x0 = columns * (0.10 + 0.15 * i)
        y0 = rows * (0.20 + 0.10 * i)
        box = (x0, y0, x0 + columns * 0.12, y0 + rows * 0.15)
        found.append(LesionFinding(CLASSES[i % len(CLASSES)], 0.9 - 0.2 * i, box))
    return found


def write_read(ds: Dataset, path: Path) -> Dataset:
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def walk(items: list[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from walk(list(item.get("ContentSequence", [])))


def find_concept(ds: Dataset, value: str) -> list[Dataset]:
    return [
        item
        for item in walk(list(ds.ContentSequence))
        if item.ConceptNameCodeSequence[0].CodeValue == value
    ]


#: the findings and impression TEXT items: (121070) in the TID 1500 SR, (121071) "Finding" in
#: the TID 2000 text SR's Findings section
_TEXT_KEYS = {"121070": "Findings", "121071": "Findings", "121073": "Impression"}


def text_values(ds: Dataset) -> dict[str, str]:
    return {
        _TEXT_KEYS[item.ConceptNameCodeSequence[0].CodeValue]: item.TextValue
        for item in walk(list(ds.ContentSequence))
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue in _TEXT_KEYS
    }


def planar_groups(ds: Dataset) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """highdicom round trip: parse the SR and return its TID 1410 groups."""
    content = hd.sr.ComprehensiveSR.from_dataset(ds).content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content.get_planar_roi_measurement_groups()


def check_polyline(data: object, image: Dataset) -> np.ndarray:
    points = np.asarray(data, dtype=np.float64).reshape(-1, 2)
    assert points.shape == (5, 2), "a box is a 5-point polyline"
    assert np.array_equal(points[0], points[-1]), "the polyline is closed"
    assert np.all(points[:, 0] >= 0) and np.all(points[:, 0] <= image.Columns)
    assert np.all(points[:, 1] >= 0) and np.all(points[:, 1] <= image.Rows)
    width = points[:, 0].max() - points[:, 0].min()
    height = points[:, 1].max() - points[:, 1].min()
    assert width > 0 and height > 0
    return points


@pytest.fixture(params=["rg1", "dx"])
def source(request: pytest.FixtureRequest) -> Dataset:
    """Header-only source image: the real chest CR or the synthetic DX."""
    header: Dataset = request.getfixturevalue(f"{request.param}_header")
    return header


@pytest.mark.parametrize("n_lesions", [0, 1, 3])
def test_comprehensive_sr_validates_and_round_trips(
    source: Dataset,
    n_lesions: int,
    algorithm: AlgorithmInfo,
    utf8_texts: tuple[str, str],
    tmp_path: Path,
    dciodvfy_errors: DciodvfyErrors,
    dsrdump: Dsrdump,
) -> None:
    findings, impression = utf8_texts
    lesions = lesions_inside(source, n_lesions)
    content = ReportContent(findings, impression, lesions, source, [source])
    sr, text_sr = build_reports(content, algorithm)
    path = tmp_path / "sr.dcm"
    ds = write_read(sr, path)

    assert dciodvfy_errors(path) == []
    dump = dsrdump(path)
    assert dump.returncode == 0, dump.stderr

    assert ds.SOPClassUID == ComprehensiveSRStorage
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert ds.Modality == "SR"
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID not in {source.SeriesInstanceUID, text_sr.SeriesInstanceUID}
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
    ):
        assert str(ds[keyword].value) == str(source[keyword].value)
    assert "not for diagnostic use" in ds.SeriesDescription
    assert text_values(ds) == {"Findings": findings, "Impression": impression}
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    referenced = evidence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert referenced.ReferencedSOPClassUID == source.SOPClassUID
    library_images = [i for i in find_concept(ds, "260753009") if i.ValueType == "IMAGE"]
    assert library_images, "Image Library lists the source image"

    groups = planar_groups(ds)
    assert len(groups) == n_lesions
    assert len(find_concept(ds, "126010")) == (1 if n_lesions else 0)  # Imaging Measurements
    assert len(find_concept(ds, "C0034375")) == 1  # Qualitative Evaluations
    for number, (group, lesion) in enumerate(zip(groups, lesions, strict=True), start=1):
        assert group.finding_type is not None and group.roi is not None
        expected = finding_codes(lesion.class_name)
        assert group.finding_type.value == expected.finding.value
        assert group.finding_type.scheme_designator == expected.finding.scheme_designator
        if expected.finding_site is not None:
            assert group.finding_sites[0].value.value == expected.finding_site.value
        assert group.tracking_identifier == f"lesion-{number}"
        assert str(group.tracking_uid).replace(".", "").isdigit()
        assert group.roi.GraphicType == "POLYLINE"
        points = check_polyline(group.roi.value, source)
        np.testing.assert_allclose(points[[0, 2]].ravel(), lesion.box, rtol=0, atol=1e-3)
        image_ref = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert image_ref.ReferencedSOPClassUID == source.SOPClassUID
        assert image_ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        (certainty,) = group.get_measurements()
        assert certainty.name.value == "111012"
        assert certainty.unit.value == "%"
        assert math.isclose(certainty.value, lesion.score * 100, abs_tol=0.01)
        # the first NUM carries the box itself (viewers hydrate tools from it)
        (inferred,) = certainty.referenced_coordinates
        assert inferred.RelationshipType == "INFERRED FROM"
        np.testing.assert_array_equal(np.asarray(inferred.value), points)
        assert inferred.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPClassUID == (
            source.SOPClassUID
        )
    purposes = find_concept(ds, "130400")
    assert len(purposes) == n_lesions
    assert all(p.ConceptCodeSequence[0].CodeValue == "75958009" for p in purposes)
    algorithm_names = find_concept(ds, "111001")
    assert len(algorithm_names) == n_lesions, "algorithm identification only on each group"


@pytest.mark.parametrize("n_lesions", [1, 3])
def test_tid1501_encoding_validates_and_round_trips(
    source: Dataset,
    n_lesions: int,
    algorithm: AlgorithmInfo,
    tmp_path: Path,
    dciodvfy_errors: DciodvfyErrors,
    dsrdump: Dsrdump,
) -> None:
    """``roi_encoding=TID1501``: same groups, the box only under the Certainty NUM, and the
    Comment labels; valid, and highdicom reads the groups back as TID 1501 groups."""
    lesions = [
        LesionFinding(les.class_name, les.score, les.box, sentence=f"Sentence {i}.")
        for i, les in enumerate(lesions_inside(source, n_lesions), start=1)
    ]
    content = ReportContent("Findings.", "Impression.", lesions, source, [source])
    tid1410 = build_reports(content, algorithm, text_sr=False)[0]
    sr = build_reports(content, algorithm, text_sr=False, roi_encoding=RoiEncoding.TID1501)[0]
    path = tmp_path / "sr.dcm"
    ds = write_read(sr, path)

    assert dciodvfy_errors(path) == []
    dump = dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert ds.SOPInstanceUID == tid1410.SOPInstanceUID  # one identity whatever the encoding
    assert find_concept(ds, "130400") == []  # geometric purpose belongs to TID 1410
    content_item = hd.sr.ComprehensiveSR.from_dataset(ds).content
    assert isinstance(content_item, hd.sr.MeasurementReport)
    assert content_item.get_planar_roi_measurement_groups() == []
    groups = content_item.get_image_measurement_groups()
    assert len(groups) == n_lesions
    for group, planar, lesion in zip(groups, planar_groups(tid1410), lesions, strict=True):
        assert group.finding_type == planar.finding_type
        assert [s.value for s in group.finding_sites] == [s.value for s in planar.finding_sites]
        assert (group.tracking_identifier, group.tracking_uid) == (
            planar.tracking_identifier,
            planar.tracking_uid,
        )
        algorithm_names = [
            item.TextValue
            for item in group[0].ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == "111001"
        ]
        assert algorithm_names == [algorithm.name]
        (source_image,) = group.source_images
        assert source_image.referenced_sop_instance_uid == source.SOPInstanceUID
        assert not any(item.ValueType == "SCOORD" for item in group[0].ContentSequence)
        (certainty,) = group.get_measurements()
        assert math.isclose(certainty.value, lesion.score * 100, abs_tol=0.01)
        (inferred,) = certainty.referenced_coordinates
        points = check_polyline(inferred.value, source)
        np.testing.assert_allclose(points[[0, 2]].ravel(), lesion.box, rtol=0, atol=1e-3)
        image_ref = inferred.ContentSequence[0].ReferencedSOPSequence[0]
        assert image_ref.ReferencedSOPClassUID == source.SOPClassUID
        assert image_ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        texts = [
            (item.ConceptNameCodeSequence[0].CodeValue, item.TextValue)
            for item in group[0].ContentSequence
            if item.ValueType == "TEXT" and item.RelationshipType == "CONTAINS"
        ]
        assert texts == [
            ("121106", finding_label(lesion.class_name, lesion.score)),
            ("121106", lesion.sentence),
            ("C0034375", lesion.sentence),
        ]


def test_finding_label_rounds_half_up() -> None:
    assert finding_label("Pleural effusion", 0.47) == "Pleural effusion 47 %"
    assert finding_label("Nodule/Mass", 0.125) == "Nodule/Mass 13 %"
    assert finding_label("ILD", 0.995) == "ILD 100 %"
    assert finding_label("Cardiomegaly", 0.004) == "Cardiomegaly 0 %"


def test_basic_text_sr_validates(
    source: Dataset,
    algorithm: AlgorithmInfo,
    utf8_texts: tuple[str, str],
    tmp_path: Path,
    dciodvfy_errors: DciodvfyErrors,
    dsrdump: Dsrdump,
) -> None:
    findings, impression = utf8_texts
    content = ReportContent(findings, impression, lesions_inside(source, 2), source, [source])
    sr, text_sr = build_reports(content, algorithm)
    path = tmp_path / "text.dcm"
    ds = write_read(text_sr, path)

    assert dciodvfy_errors(path) == []
    dump = dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert ds.SOPClassUID == BasicTextSRStorage
    assert ds.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert ds.ConceptNameCodeSequence[0].CodingSchemeDesignator == "LN"
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.SeriesInstanceUID != sr.SeriesInstanceUID
    assert ds.SeriesNumber != sr.SeriesNumber
    assert str(ds.PatientName) == str(source.PatientName)
    assert text_values(ds) == {"Findings": findings, "Impression": impression}
    refs = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert refs.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_text_sr_can_be_turned_off(rg1_header: Dataset, algorithm: AlgorithmInfo) -> None:
    content = ReportContent("f", "i", [], rg1_header, [rg1_header])
    reports = build_reports(content, algorithm, text_sr=False)
    assert [r.SOPClassUID for r in reports] == [ComprehensiveSRStorage]


def test_uids_are_deterministic(
    dx_header: Dataset, algorithm: AlgorithmInfo, fixed_time: datetime.datetime
) -> None:
    content = ReportContent("f", "i", lesions_inside(dx_header, 2), dx_header, [dx_header])

    def identity(reports: list[Dataset]) -> list[str]:
        uids = [str(r[k].value) for r in reports for k in ("SeriesInstanceUID", "SOPInstanceUID")]
        uids += [str(i.UID) for i in walk(list(reports[0].ContentSequence)) if "UID" in i]
        return uids

    first = identity(build_reports(content, algorithm, content_datetime=fixed_time))
    later = fixed_time + datetime.timedelta(hours=3)
    again = identity(build_reports(content, algorithm, content_datetime=later))
    assert first == again
    assert len(first) == 4 + 1 + 2  # 2 series + 2 instances, device observer, 2 tracking UIDs

    newer = AlgorithmInfo(algorithm.name, "0.2.0", algorithm.manufacturer)
    other = identity(build_reports(content, newer, content_datetime=fixed_time))
    assert len(set(first) & set(other)) == 0

    other_study = copy.deepcopy(dx_header)
    other_study.StudyInstanceUID = generate_uid()
    moved = ReportContent("f", "i", content.lesions, other_study, [other_study])
    moved_ids = identity(build_reports(moved, algorithm, content_datetime=fixed_time))
    assert moved_ids[:4] != first[:4]


def test_out_of_image_boxes_are_clipped(
    dx_header: Dataset, algorithm: AlgorithmInfo, tmp_path: Path, dciodvfy_errors: DciodvfyErrors
) -> None:
    columns, rows = int(dx_header.Columns), int(dx_header.Rows)
    lesion = LesionFinding(
        "Pleural effusion", 0.7, (-20.0, rows - 30.0, columns + 50.0, rows + 9.5)
    )
    content = ReportContent("f", "i", [lesion], dx_header, [dx_header])
    path = tmp_path / "sr.dcm"
    ds = write_read(build_reports(content, algorithm, text_sr=False)[0], path)
    assert dciodvfy_errors(path) == []
    (group,) = planar_groups(ds)
    assert group.roi is not None
    points = check_polyline(group.roi.value, dx_header)
    assert points[:, 0].min() == 0 and points[:, 0].max() == columns
    assert points[:, 1].min() == rows - 30 and points[:, 1].max() == rows


@pytest.mark.parametrize(
    "box",
    [
        (50.0, 50.0, 50.0, 80.0),  # zero width
        (60.0, 80.0, 40.0, 90.0),  # inverted
        (5000.0, 10.0, 6000.0, 20.0),  # right of the image
        (10.0, -40.0, 30.0, -1.0),  # above the image
    ],
)
def test_degenerate_box_is_skipped_and_logged(
    dx_header: Dataset,
    algorithm: AlgorithmInfo,
    box: tuple[float, float, float, float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = LesionFinding("Cardiomegaly", 0.8, (20.0, 30.0, 120.0, 150.0))
    bad = LesionFinding("Pneumothorax", 0.6, box)
    content = ReportContent("f", "i", [bad, good], dx_header, [dx_header])
    with caplog.at_level(logging.WARNING, logger="report.build"):
        ds = build_reports(content, algorithm, text_sr=False)[0]
    groups = planar_groups(ds)
    assert [g.finding_type.value for g in groups if g.finding_type] == ["8186001"]
    assert groups[0].tracking_identifier == "lesion-1"
    assert any(
        "skipped" in r.getMessage() and "Pneumothorax" in r.getMessage() for r in caplog.records
    )


def test_clip_box_helper() -> None:
    assert clip_box((-1.0, -2.0, 10.0, 20.0), 5, 8) == (0.0, 0.0, 5.0, 8.0)
    assert clip_box((1.0, 2.0, 1.00000001, 3.0), 5, 8) is None  # below float32 resolution


def test_empty_texts_get_placeholders(rg1_header: Dataset, algorithm: AlgorithmInfo) -> None:
    content = ReportContent("", "  ", [], rg1_header, [rg1_header])
    for ds in build_reports(content, algorithm):
        assert text_values(ds) == {"Findings": NO_FINDINGS_TEXT, "Impression": NO_IMPRESSION_TEXT}


def test_ohif_tracking_identifier_is_used_verbatim(
    dx_header: Dataset, algorithm: AlgorithmInfo
) -> None:
    content = ReportContent("f", "i", lesions_inside(dx_header, 2), dx_header, [dx_header])
    ds = build_reports(
        content,
        algorithm,
        text_sr=False,
        tracking_identifier_prefix=OHIF_RECTANGLE_ROI_TRACKING_IDENTIFIER,
    )[0]
    groups = planar_groups(ds)
    assert [g.tracking_identifier for g in groups] == [OHIF_RECTANGLE_ROI_TRACKING_IDENTIFIER] * 2
    assert len({str(g.tracking_uid) for g in groups}) == 2
    custom = build_reports(content, algorithm, text_sr=False, tracking_identifier_prefix="roi")[0]
    assert [g.tracking_identifier for g in planar_groups(custom)] == [
        "roi-1",
        "roi-2",
    ]


def test_image_library_spacing_only_when_usable(
    rg1_header: Dataset, dx_header: Dataset, algorithm: AlgorithmInfo
) -> None:
    rg1_sr = build_reports(ReportContent("f", "i", [], rg1_header, [rg1_header]), algorithm)[0]
    assert find_concept(rg1_sr, "111026") == []  # Horizontal Pixel Spacing
    rows_item = find_concept(rg1_sr, "110910")  # Pixel Data Rows
    assert float(rows_item[0].MeasuredValueSequence[0].NumericValue) == rg1_header.Rows

    dx_sr = build_reports(ReportContent("f", "i", [], dx_header, [dx_header]), algorithm)[0]
    (horizontal,) = find_concept(dx_sr, "111026")
    assert float(horizontal.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.2)


def test_private_coding_scheme_declared_only_when_used(
    dx_header: Dataset, algorithm: AlgorithmInfo
) -> None:
    private = LesionFinding("Aortic enlargement", 0.5, (10.0, 10.0, 60.0, 60.0))
    standard = LesionFinding("Pleural effusion", 0.5, (10.0, 10.0, 60.0, 60.0))
    with_private = build_reports(
        ReportContent("f", "i", [private, standard], dx_header, [dx_header]), algorithm
    )[0]
    designators = [
        i.CodingSchemeDesignator for i in with_private.CodingSchemeIdentificationSequence
    ]
    assert PRIVATE_SCHEME_DESIGNATOR in designators
    only_standard = build_reports(
        ReportContent("f", "i", [standard], dx_header, [dx_header]), algorithm
    )[0]
    declared = [
        i.CodingSchemeDesignator
        for i in only_standard.get("CodingSchemeIdentificationSequence", [])
    ]
    assert PRIVATE_SCHEME_DESIGNATOR not in declared


def test_series_description_and_equipment(
    dx_header: Dataset, fixed_time: datetime.datetime
) -> None:
    content = ReportContent("f", "i", [], dx_header, [dx_header])
    cleared = AlgorithmInfo("d2r-net", "1.0.0", "Example Medical")
    sr, text_sr = build_reports(content, cleared)
    assert (
        "AI draft" in sr.SeriesDescription and "not for diagnostic use" not in sr.SeriesDescription
    )
    assert sr.SeriesDescription != text_sr.SeriesDescription
    assert sr.Manufacturer == "Example Medical"
    processing = [
        item
        for item in sr.ContributingEquipmentSequence
        if (
            item.PurposeOfReferenceCodeSequence[0].CodeValue,
            item.PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator,
            item.PurposeOfReferenceCodeSequence[0].CodeMeaning,
        )
        == ("Newcode1", "99IHE", "Processing Algorithm")  # IHE AIR 6.5.3.1
        and item.Manufacturer == "Example Medical"
    ]
    assert processing and processing[0].SoftwareVersions == "1.0.0"
    assert processing[0].ManufacturerModelName == "d2r-net"
    # the Device UID changes with every model version
    (newer,) = build_reports(
        content, AlgorithmInfo("d2r-net", "1.0.1", "Example Medical"), text_sr=False
    )
    newer_uids = [i.DeviceUID for i in newer.ContributingEquipmentSequence if "DeviceUID" in i]
    assert newer_uids and processing[0].DeviceUID not in newer_uids

    own = build_reports(
        content,
        cleared,
        series_description="Site AI draft",
        series_number=77,
        content_datetime=fixed_time,
    )[0]
    assert own.SeriesDescription == "Site AI draft"
    assert own.SeriesNumber == 77
    assert (str(own.ContentDate), str(own.ContentTime)) == ("20261127", "210000")


def test_full_dataset_with_pixels_is_accepted(
    dx_path: Path, algorithm: AlgorithmInfo, tmp_path: Path
) -> None:
    image = pydicom.dcmread(dx_path)
    content = ReportContent("f", "i", lesions_inside(image, 1), image, [image])
    for i, ds in enumerate(build_reports(content, algorithm)):
        assert "PixelData" not in ds
        assert write_read(ds, tmp_path / f"{i}.dcm").StudyInstanceUID == image.StudyInstanceUID


def test_several_evidence_images(
    dx_header: Dataset, algorithm: AlgorithmInfo, tmp_path: Path, dciodvfy_errors: DciodvfyErrors
) -> None:
    lateral = copy.deepcopy(dx_header)
    lateral.SOPInstanceUID = generate_uid()
    lateral.ViewPosition = "LL"
    content = ReportContent("f", "i", lesions_inside(dx_header, 1), dx_header, [lateral, dx_header])
    sr = build_reports(content, algorithm, text_sr=False)[0]
    path = tmp_path / "sr.dcm"
    ds = write_read(sr, path)
    assert dciodvfy_errors(path) == []
    referenced = {
        item.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == {dx_header.SOPInstanceUID, lateral.SOPInstanceUID}
    library = [i for i in find_concept(ds, "126200")][0]
    assert len(library.ContentSequence) == 2


# --- input validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"class_name": "Tumour"}, ValueError, "class_name"),
        ({"class_name": 3}, TypeError, "class_name"),
        ({"score": 1.5}, ValueError, "score"),
        ({"score": True}, TypeError, "score"),
        ({"score": float("nan")}, ValueError, "score"),
        ({"box": (1.0, 2.0, 3.0)}, ValueError, "box"),
        ({"box": (1.0, 2.0, float("inf"), 4.0)}, ValueError, "box"),
        ({"box": "1,2,3,4"}, TypeError, "box"),
    ],
)
def test_lesion_finding_validation(
    kwargs: dict[str, object], error: type[Exception], argument: str
) -> None:
    values: dict[str, object] = {"class_name": "ILD", "score": 0.5, "box": (1.0, 2.0, 3.0, 4.0)}
    values.update(kwargs)
    with pytest.raises(error, match=argument):
        LesionFinding(**values)  # type: ignore[arg-type]


def test_algorithm_info_validation() -> None:
    with pytest.raises(ValueError, match="name"):
        AlgorithmInfo("", "1")
    with pytest.raises(ValueError, match="version"):
        AlgorithmInfo("d2r", "x" * 65)
    with pytest.raises(TypeError, match="manufacturer"):
        AlgorithmInfo("d2r", "1", None)  # type: ignore[arg-type]


def test_report_content_validation(rg1_header: Dataset, dx_header: Dataset) -> None:
    with pytest.raises(TypeError, match="findings"):
        ReportContent(None, "i", [], rg1_header, [])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="lesions"):
        ReportContent("f", "i", [("ILD", 0.5, (1, 2, 3, 4))], rg1_header, [])  # type: ignore[list-item]
    with pytest.raises(SourceImageError, match="study"):
        ReportContent("f", "i", [], rg1_header, [dx_header])
    not_xray = copy.deepcopy(rg1_header)
    not_xray.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    with pytest.raises(SourceImageError, match="image"):
        ReportContent("f", "i", [], not_xray, [])
    no_rows = copy.deepcopy(rg1_header)
    del no_rows.Rows
    with pytest.raises(SourceImageError, match="Rows"):
        ReportContent("f", "i", [], no_rows, [])


def test_build_reports_validation(rg1_header: Dataset, algorithm: AlgorithmInfo) -> None:
    content = ReportContent("f", "i", [], rg1_header, [])
    with pytest.raises(TypeError, match="content"):
        build_reports("content", algorithm)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="algorithm"):
        build_reports(content, "d2r")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="series_description"):
        build_reports(content, algorithm, series_description="x" * 65)
    with pytest.raises(ValueError, match="tracking_identifier_prefix"):
        build_reports(content, algorithm, tracking_identifier_prefix="")
    with pytest.raises(ValueError, match="tid1411"):
        build_reports(content, algorithm, roi_encoding="tid1411")  # type: ignore[arg-type]


def test_missing_type2_patient_attributes_are_written_empty(
    dx_header: Dataset, algorithm: AlgorithmInfo, tmp_path: Path, dciodvfy_errors: DciodvfyErrors
) -> None:
    sparse = copy.deepcopy(dx_header)
    del sparse.PatientSex
    del sparse.AccessionNumber
    del sparse.ReferringPhysicianName
    content = ReportContent("f", "i", lesions_inside(sparse, 1), sparse, [sparse])
    for i, sr in enumerate(build_reports(content, algorithm)):
        path = tmp_path / f"{i}.dcm"
        ds = write_read(sr, path)
        assert dciodvfy_errors(path) == []
        assert "PatientSex" in ds and not ds.PatientSex
        assert "AccessionNumber" in ds and not ds.AccessionNumber
