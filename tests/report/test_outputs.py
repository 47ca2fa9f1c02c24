"""Every object d2r writes for a study (``D2R_OUTPUTS``): the SRs, the presentation state and the
overlay image, built from CR, DX, MONOCHROME1 and Secondary Capture sources.

Each must pass dciodvfy (and, for the presentation state and the overlay, dcmpschk); every SR
must pass the template check (tests/support/sr_templates.py) without an error; the GSPS boxes
and the burned-in boxes must sit where the TID 1500 SR says; an abstention has its documented
form; a rerun gives the same UIDs; and invalid source values never reach an object.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.uid import (
    ColorSoftcopyPresentationStateStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
)

from d2r_core.outputs import OUTPUT_NAMES
from report.build import AlgorithmInfo, LesionFinding, ReportContent, RoiEncoding
from report.outputs import DEFAULT_OUTPUTS, Output, build_outputs, parse_outputs
from report.overlay import box_edge_pixels
from report.presentation import DRAFT_NOTICE_PREFIX, LAYER_NAME, NOT_ASSESSED_PREFIX
from tests.support.dicom_files import make_cr, make_dx, make_sc, rg1_path
from tests.support.sr_templates import check_sr, errors
from worker.results import encode

#: RG1's Referring Physician's Name is "ward": highdicom warns about it and still copies it
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")

DCMPSCHK = Path("/usr/bin/dcmpschk")
DCIODVFY = Path("/usr/bin/dciodvfy")
DCMP2PGM = Path("/usr/bin/dcmp2pgm")
ALL = tuple(Output)
LESIONS = (
    ("Pleural effusion", 0.465, (20.3, 40.7, 90.2, 150.5)),
    ("Cardiomegaly", 0.81, (60.0, 120.0, 170.0, 230.0)),
    ("Nodule/Mass", 0.5, (150.0, -10.0, 400.0, 60.0)),  # clipped to the image
)


def _rg1() -> Dataset:
    """The real chest CR: MONOCHROME1, 15 bit, PixelSpacing 0\\0 (removed: no spacing at all)."""
    ds = pydicom.dcmread(str(rg1_path()))
    del ds.PixelSpacing
    return ds


def _mono1_8bit() -> Dataset:
    ds = make_cr(None, rows=256, cols=208, bits_stored=8, seed=5)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = (255 - ds.pixel_array).astype(np.uint8).tobytes()
    return ds


def _sc_rgb() -> Dataset:
    ds = make_sc(None, rows=256, cols=208, modality="CR", body_part="CHEST", seed=3)
    grey = ds.pixel_array
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.PixelData = np.stack([grey, grey, grey], axis=-1).tobytes()
    return ds


SOURCES: dict[str, Callable[[], Dataset]] = {
    "cr-rg1-monochrome1-no-spacing": _rg1,
    "dx": lambda: make_dx(None, rows=256, cols=208, seed=1),
    "cr-monochrome1-8bit": _mono1_8bit,
    "sc-cr-8bit": lambda: make_sc(None, rows=256, cols=208, modality="CR", seed=2),
    "sc-cr-rgb": _sc_rgb,
}


@pytest.fixture(scope="module")
def algorithm() -> AlgorithmInfo:
    return AlgorithmInfo(name="d2r-net-demo", version="0.1.0", parameters=("score >= 0.3",))


def _content(image: Dataset, **kw: object) -> ReportContent:
    lesions = [LesionFinding(n, s, b, sentence=f"{n}.") for n, s, b in LESIONS]
    findings = " ".join(f"{n}." for n, _, _ in LESIONS)
    return ReportContent(findings, "Impression.", lesions, image, [image], **kw)  # type: ignore[arg-type]


def _abstained(image: Dataset) -> ReportContent:
    return ReportContent(
        "Not assessed.", "Not assessed.", [], image, [image], abstain_reason="image too dark"
    )


def _run(tool: Path, path: Path) -> list[str]:
    if shutil.which(str(tool)) is None:
        pytest.fail(f"{tool} is required (Debian packages dicom3tools / dcmtk)")
    res = subprocess.run([str(tool), str(path)], capture_output=True, text=True, timeout=120)
    out = (res.stdout + res.stderr).splitlines()
    if tool == DCMPSCHK:
        bad = [ln for ln in out if ln.startswith(("E:", "F:")) or "Test failed" in ln]
        return bad if res.returncode == 0 else [*bad, f"exit {res.returncode}"]
    return [ln for ln in out if ln.startswith("Error")]


def _write(ds: Dataset, path: Path) -> Path:
    path.write_bytes(encode(ds))
    return path


def _by_class(datasets: list[Dataset]) -> dict[str, Dataset]:
    return {str(ds.SOPClassUID): ds for ds in datasets}


def _sr_boxes(sr: Dataset) -> list[np.ndarray]:
    """The group-level SCOORD polylines of a TID 1410 SR, in group order."""
    boxes = []
    for group in sr.ContentSequence:
        for measurements in group.get("ContentSequence", []):
            for item in measurements.get("ContentSequence", []):
                if str(item.ValueType) == "SCOORD":
                    boxes.append(np.array(item.GraphicData, dtype=float).reshape(-1, 2))
    return boxes


def _gsps_boxes(pr: Dataset) -> list[np.ndarray]:
    return [
        np.array(obj.GraphicData, dtype=float).reshape(-1, 2)
        for ann in pr.GraphicAnnotationSequence
        for obj in ann.get("GraphicObjectSequence", [])
    ]


def _texts(pr: Dataset) -> list[str]:
    return [
        str(obj.UnformattedTextValue)
        for ann in pr.GraphicAnnotationSequence
        for obj in ann.get("TextObjectSequence", [])
    ]


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_output_validates_and_the_boxes_agree(
    name: str, algorithm: AlgorithmInfo, tmp_path: Path
) -> None:
    image = SOURCES[name]()
    built = build_outputs(_content(image), algorithm, ALL)
    sr, text_sr, pr, sc = built.datasets
    assert [ds.Modality for ds in built.datasets] == ["SR", "SR", "PR", "OT"]
    assert len({ds.SeriesInstanceUID for ds in built.datasets}) == 4
    assert {str(ds.StudyInstanceUID) for ds in built.datasets} == {str(image.StudyInstanceUID)}
    for ds in (sr, text_sr):
        assert errors(check_sr(ds)) == [], name
    for ds, kind in ((sr, "sr"), (text_sr, "text"), (pr, "pr"), (sc, "sc")):
        path = _write(ds, tmp_path / f"{kind}.dcm")
        assert _run(DCIODVFY, path) == [], (name, kind)
        if kind in ("pr", "sc"):
            assert _run(DCMPSCHK, path) == [], (name, kind)

    colour = int(image.SamplesPerPixel) == 3
    expected = (
        ColorSoftcopyPresentationStateStorage
        if colour
        else (GrayscaleSoftcopyPresentationStateStorage)
    )
    assert pr.SOPClassUID == expected
    if not colour:
        inverse = image.PhotometricInterpretation == "MONOCHROME1"
        assert pr.PresentationLUTShape == ("INVERSE" if inverse else "IDENTITY")
    ref = pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        image.SOPClassUID,
        image.SOPInstanceUID,
    )
    assert pr.GraphicLayerSequence[0].GraphicLayer == LAYER_NAME
    assert str(pr.PatientName) == str(image.PatientName)
    # the presentation state draws exactly the SR's boxes (within 1 px), in PIXEL units
    sr_boxes, pr_boxes = _sr_boxes(sr), _gsps_boxes(pr)
    assert len(sr_boxes) == len(pr_boxes) == 3
    for a, b in zip(sr_boxes, pr_boxes, strict=True):
        assert np.abs(a - b).max() <= 1.0
    labels = _texts(pr)
    assert "Pleural effusion 47 %" in labels
    assert any(t.startswith(DRAFT_NOTICE_PREFIX) and "d2r-net-demo 0.1.0" in t for t in labels)

    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert (sc.Rows, sc.Columns) == (image.Rows, image.Columns)
    assert (sc.BurnedInAnnotation, list(sc.ImageType)) == ("YES", ["DERIVED", "SECONDARY"])
    assert (sc.PhotometricInterpretation, sc.BitsAllocated) == ("MONOCHROME2", 8)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == image.SOPInstanceUID
    assert sc.DerivationDescription
    _assert_burned_in(sc.pixel_array, sr_boxes)


def _assert_burned_in(pixels: np.ndarray, boxes: list[np.ndarray]) -> None:
    """Every pixel the SR box's edges pass through is white in the overlay."""
    rows, columns = pixels.shape
    for polyline in boxes:
        x_min, y_min = polyline.min(axis=0)
        x_max, y_max = polyline.max(axis=0)
        left, top, right, bottom = box_edge_pixels((x_min, y_min, x_max, y_max), columns, rows)
        edges = (
            pixels[top, left : right + 1],
            pixels[bottom, left : right + 1],
            pixels[top : bottom + 1, left],
            pixels[top : bottom + 1, right],
        )
        for edge in edges:
            assert (edge == 255).all(), (left, top, right, bottom)
        if right - left > 6 and bottom - top > 6:  # and the box is not filled in
            assert (pixels[top + 3 : bottom - 2, left + 3 : right - 2] != 255).any()


def _render(tmp: Path, image: Path, state: Path | None) -> np.ndarray:
    """dcmtk's rendering of ``image`` (8-bit PGM), through ``state`` when given."""
    out = tmp / f"{image.stem}-{'state' if state else 'plain'}.pgm"
    args = [str(DCMP2PGM), *(["-p", str(state)] if state else []), str(image), str(out)]
    subprocess.run(args, check=True, capture_output=True, timeout=120)
    with Image.open(out) as pgm:
        return np.asarray(pgm)


@pytest.mark.parametrize(
    "name", ["cr-rg1-monochrome1-no-spacing", "cr-monochrome1-8bit", "dx", "sc-cr-8bit"]
)
def test_the_presentation_state_shows_the_image_as_delivered(
    name: str, algorithm: AlgorithmInfo, tmp_path: Path
) -> None:
    """Modality LUT, VOI and Presentation LUT (INVERSE for MONOCHROME1): dcmtk renders the image
    through the presentation state exactly as it renders the image alone."""
    if shutil.which(str(DCMP2PGM)) is None:
        pytest.fail(f"{DCMP2PGM} is required (Debian package dcmtk)")
    image = SOURCES[name]()
    image_path = tmp_path / "image.dcm"
    image.save_as(image_path, enforce_file_format=True)
    (state,) = build_outputs(_content(image), algorithm, [Output.TID1500, Output.GSPS]).datasets[1:]
    state_path = _write(state, tmp_path / "state.dcm")
    plain = _render(tmp_path, image_path, None)
    through_state = _render(tmp_path, image_path, state_path)
    assert plain.shape == through_state.shape == (image.Rows, image.Columns)
    assert np.array_equal(plain, through_state)


@pytest.mark.parametrize("name", ["cr-rg1-monochrome1-no-spacing", "sc-cr-8bit"])
def test_an_abstention_has_its_documented_form(
    name: str, algorithm: AlgorithmInfo, tmp_path: Path
) -> None:
    image = SOURCES[name]()
    built = build_outputs(_abstained(image), algorithm, ALL)
    assert [ds.Modality for ds in built.datasets] == ["SR", "SR", "PR"]  # no overlay image
    sr, text_sr, pr = built.datasets
    for ds in (sr, text_sr):
        assert errors(check_sr(ds)) == []
    assert _gsps_boxes(pr) == []
    assert _texts(pr) == [f"{NOT_ASSESSED_PREFIX}image too dark"]
    path = _write(pr, tmp_path / "pr.dcm")
    assert _run(DCMPSCHK, path) == [] and _run(DCIODVFY, path) == []


def test_a_rerun_gives_the_same_uids_and_each_output_its_own(algorithm: AlgorithmInfo) -> None:
    image = SOURCES["dx"]()
    first = build_outputs(_content(image), algorithm, ALL).datasets
    again = build_outputs(_content(image), algorithm, ALL).datasets
    uids = [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in first]
    assert uids == [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in again]
    assert len({uid for pair in uids for uid in pair}) == 8
    newer = AlgorithmInfo(name="d2r-net-demo", version="0.2.0")
    other = build_outputs(_content(image), newer, ALL).datasets
    assert not {ds.SOPInstanceUID for ds in other} & {ds.SOPInstanceUID for ds in first}


def test_outputs_are_chosen(algorithm: AlgorithmInfo) -> None:
    image = SOURCES["dx"]()
    default = build_outputs(_content(image), algorithm)
    assert [ds.Modality for ds in default.datasets] == ["SR", "SR", "PR"]
    assert DEFAULT_OUTPUTS == (Output.TID1500, Output.TEXT, Output.GSPS)
    assert tuple(o.value for o in Output) == OUTPUT_NAMES  # the settings parse these names
    only_text = build_outputs(_content(image), algorithm, [Output.TEXT, Output.SC])
    assert [ds.Modality for ds in only_text.datasets] == ["SR", "OT"]
    assert parse_outputs("sc , tid1500") == (Output.TID1500, Output.SC)
    for bad in ("tid1500,pdf", "", "gsps,sc"):
        with pytest.raises(ValueError):
            parse_outputs(bad)


@pytest.mark.parametrize("encoding", list(RoiEncoding))
def test_every_sr_passes_the_template_check(
    encoding: RoiEncoding, algorithm: AlgorithmInfo
) -> None:
    image = SOURCES["cr-rg1-monochrome1-no-spacing"]()
    content = _content(image, comments=("The input gate was off.",))
    sr, text_sr = build_outputs(
        content, algorithm, [Output.TID1500, Output.TEXT], roi_encoding=encoding
    ).datasets
    for ds in (sr, text_sr):
        assert errors(check_sr(ds)) == []
    assert text_sr.ContentTemplateSequence[0].TemplateIdentifier == "2000"
    # the rows the template check names: procedure reported from CID 100, no algorithm
    # manufacturer (not a TID 4019 row)
    codes = [
        (item.ConceptNameCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodeValue)
        for item in sr.ContentSequence
        if item.ValueType == "CODE"
    ]
    assert ("121058", "43468-8") in codes
    flat = str(sr)
    assert "Algorithm Manufacturer" not in flat


def test_the_template_check_finds_what_it_is_for(algorithm: AlgorithmInfo) -> None:
    image = SOURCES["dx"]()
    sr, text_sr = build_outputs(_content(image), algorithm, [Output.TID1500, Output.TEXT]).datasets
    procedure = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"
    )
    procedure.ConceptCodeSequence[0].CodeValue = "399208008"
    procedure.ConceptCodeSequence[0].CodingSchemeDesignator = "SCT"
    assert any("Procedure reported" in e for e in errors(check_sr(sr)))
    del text_sr.ContentTemplateSequence
    assert errors(check_sr(text_sr)) == ["error: /: no template declared (ContentTemplateSequence)"]


def test_invalid_source_values_are_left_out_of_every_output(
    algorithm: AlgorithmInfo, tmp_path: Path
) -> None:
    image = make_sc(None, rows=256, cols=208, modality="CR", seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on assigning the invalid values
        image.PatientAge = "51"
        image.StudyDate = "2023-01-01"
        image.InstitutionName = "X" * 70
    image.PatientSex = "F"
    built = build_outputs(_content(image), algorithm, ALL)
    assert built.dropped == ("InstitutionName", "PatientAge", "StudyDate")
    before = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.RAISE
    try:
        for n, ds in enumerate(built.datasets):
            assert "PatientAge" not in ds and ds.get("InstitutionName") in (None, "")
            assert ds.get("StudyDate") in (None, ""), ds.Modality
            assert ds.PatientSex == "F"  # valid values are still copied
            path = _write(ds, tmp_path / f"{n}.dcm")
            assert not [e for e in _run(DCIODVFY, path) if "Value invalid" in e]
    finally:
        config.settings.writing_validation_mode = before
