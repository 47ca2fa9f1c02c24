"""The result SR in the real OHIF viewer: boxes drawn where the model put them.

Each test stores the real chest CR from pydicom-data and an SR in a real Orthanc
with DICOMweb, opens the study in OHIF 3.13.2 (headless Chromium) and checks
what the page drew: one finite polyline per lesion inside the viewport, at the
canvas position the SR box maps to, and, after answering *Yes* to "continue
tracking", one editable rectangle per lesion.

The chest CR (``RG1_UNCR``) carries ``PixelSpacing = 0\\0``. OHIF renders such
an image black and maps every SR coordinate to NaN, so the copy the tests
store has PixelSpacing deleted (same SOP Instance UID). That is a defect of the
sample image, not of the SR.

Screenshots go to ``$D2R_TEST_ARTIFACTS`` (default ``<repo>/test-artifacts``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from d2r_core.classes import VINDR_CLASSES
from report.build import (
    OHIF_RECTANGLE_ROI_TRACKING_IDENTIFIER,
    AlgorithmInfo,
    LesionFinding,
    ReportContent,
    RoiEncoding,
    build_reports,
    finding_label,
)
from report.codes import finding_codes
from tests.support.dicom_files import make_sc
from tests.support.fixtures import OrthancFactory
from tests.support.ohif import (
    OHIF_VERSION,
    ViewerResult,
    artifacts_dir,
    check_sr_in_ohif,
    find_chromium,
    ohif_dist,
)
from tests.support.orthanc import OrthancServer
from tests.viewer.sr_samples import (
    CHEST_BOXES,
    CHEST_CR,
    Box,
    Layout,
    build_sr,
    chest_image,
)

pytestmark = [pytest.mark.viewer, pytest.mark.integration, pytest.mark.timeout(150)]

PIXEL_TOLERANCE = 3.0
"""Allowed distance, in canvas pixels, between a drawn box edge and the mapped SR box edge."""

LESIONS = (
    LesionFinding("Cardiomegaly", 0.87, (820.0, 1250.0, 1420.0, 1850.0)),
    LesionFinding("Pleural effusion", 0.64, (1350.0, 1500.0, 1750.0, 1900.0)),
)
#: "<Finding name> <NN> %", the box label of the TID 1501 encoding
LABEL_PATTERN = re.compile(
    "(?P<finding>{}) (?P<percent>100|[1-9]?[0-9]) %".format("|".join(map(re.escape, VINDR_CLASSES)))
)
#: the same boxes with the findings sentence each one supports (report.grounding)
GROUNDED_LESIONS = (
    dataclasses.replace(LESIONS[0], sentence="Enlarged cardiac silhouette."),
    dataclasses.replace(LESIONS[1], sentence="Small right pleural effusion."),
)


@pytest.fixture
def viewer_ready() -> None:
    """Skip when the viewer build or the browser is not installed."""
    if ohif_dist() is None:
        pytest.skip(f"OHIF {OHIF_VERSION} not unpacked: run tests/support/install-viewer.sh")
    if find_chromium() is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium')")


@pytest.fixture
def chest(tmp_path: Path) -> tuple[Path, pydicom.Dataset]:
    """The viewable chest CR copy and its header."""
    path = chest_image(tmp_path)
    return path, pydicom.dcmread(path, stop_before_pixels=True)


# -- geometry helpers (pure) ---------------------------------------------------------


def bounding_box(points: Sequence[tuple[float, float]]) -> tuple[float, float, float, float]:
    """(x_min, y_min, x_max, y_max) of a polyline."""
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    return min(xs), min(ys), max(xs), max(ys)


def fit_axis(image: Sequence[float], canvas: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``canvas = scale * image + offset``; returns (scale, offset, max residual)."""
    n = len(image)
    mean_i = sum(image) / n
    mean_c = sum(canvas) / n
    var = sum((i - mean_i) ** 2 for i in image)
    scale = sum((i - mean_i) * (c - mean_c) for i, c in zip(image, canvas, strict=True)) / var
    offset = mean_c - scale * mean_i
    residual = max(abs(scale * i + offset - c) for i, c in zip(image, canvas, strict=True))
    return scale, offset, residual


def match_boxes(
    drawn: Sequence[tuple[float, float, float, float]],
    expected: Sequence[tuple[float, float, float, float]],
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Pair drawn and expected boxes and fit one image-to-canvas map per axis.

    Tries every pairing and keeps the one with the smallest worst residual.
    Returns the (scale, offset, max residual) fits for x and for y.
    """
    best: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    for order in itertools.permutations(range(len(drawn))):
        pairs = [(drawn[k], expected[j]) for j, k in enumerate(order)]
        fit_x = fit_axis(
            [e[0] for _, e in pairs] + [e[2] for _, e in pairs],
            [d[0] for d, _ in pairs] + [d[2] for d, _ in pairs],
        )
        fit_y = fit_axis(
            [e[1] for _, e in pairs] + [e[3] for _, e in pairs],
            [d[1] for d, _ in pairs] + [d[3] for d, _ in pairs],
        )
        if best is None or max(fit_x[2], fit_y[2]) < max(best[0][2], best[1][2]):
            best = (fit_x, fit_y)
    assert best is not None
    return best


def assert_boxes_drawn(
    result: ViewerResult,
    expected: Sequence[tuple[float, float, float, float]],
    columns: int,
    rows: int,
) -> None:
    """The page drew every SR box, finite, inside the viewport, at the mapped position."""
    assert len(result.polylines) == len(expected), (result.polylines, result.notes)
    _, _, width, height = result.viewport
    assert width > 100 and height > 100, result.viewport
    for line in result.polylines:
        assert len(line) >= 4, line
        for x, y in line:
            assert math.isfinite(x) and math.isfinite(y), f"non-finite point in {line}"
            assert 0 <= x <= width and 0 <= y <= height, f"({x}, {y}) outside {result.viewport}"
    drawn = [bounding_box(line) for line in result.polylines]
    (sx, ox, rx), (sy, oy, ry) = match_boxes(drawn, expected)
    assert rx <= PIXEL_TOLERANCE and ry <= PIXEL_TOLERANCE, (rx, ry)
    # Square pixels, and the image fitted into the viewport and centred.
    assert sx == pytest.approx(sy, rel=0.01)
    fit = min(width / columns, height / rows)
    assert sx == pytest.approx(fit, rel=0.02)
    assert ox == pytest.approx((width - sx * columns) / 2, abs=PIXEL_TOLERANCE)
    assert oy == pytest.approx((height - sy * rows) / 2, abs=PIXEL_TOLERANCE)
    # The same map as the one the cornerstone viewport reports.
    page = result.image_to_canvas
    assert page is not None
    assert (page.columns, page.rows) == (columns, rows)
    for x_min, y_min, x_max, y_max in expected:
        for column, row in ((x_min, y_min), (x_max, y_max)):
            px, py = page(column, row)
            assert px == pytest.approx(sx * column + ox, abs=PIXEL_TOLERANCE)
            assert py == pytest.approx(sy * row + oy, abs=PIXEL_TOLERANCE)


def store(orthanc: OrthancServer, *paths: Path) -> None:
    for path in paths:
        assert orthanc.upload(path)["Status"] in {"Success", "AlreadyStored"}


# -- tests ---------------------------------------------------------------------------


@pytest.mark.usefixtures("viewer_ready")
def test_result_sr_boxes_drawn_and_editable(
    orthanc_factory: OrthancFactory, chest: tuple[Path, pydicom.Dataset], tmp_path: Path
) -> None:
    """The product SR (report.build) shows every box and hydrates into rectangles."""
    image_path, image = chest
    reports = build_reports(
        ReportContent(
            findings="Enlarged cardiac silhouette. Small right pleural effusion.",
            impression="Cardiomegaly; pleural effusion.",
            lesions=LESIONS,
            image=image,
        ),
        AlgorithmInfo(name="d2r-viewer-test", version="0.0.0"),
    )
    sr_paths = []
    for index, sr in enumerate(reports):
        path = tmp_path / f"sr-{index}.dcm"
        sr.save_as(path, enforce_file_format=True)
        sr_paths.append(path)
    orthanc = orthanc_factory(dicomweb=True)
    store(orthanc, image_path, *sr_paths)

    result = check_sr_in_ohif(
        orthanc,
        image.StudyInstanceUID,
        int(reports[0].SeriesNumber),
        artifacts_dir(),
        hydrate=True,
        name="ohif-result-sr",
    )

    assert result.screenshot.stat().st_size > 10_000
    assert_boxes_drawn(result, [lesion.box for lesion in LESIONS], image.Columns, image.Rows)
    # the label text the page drew beside each box: OHIF 3.13.2 builds it from the group's NUM
    # (concept meaning, value, unit) and its finding site; it reads no Finding code meaning
    # and no TEXT item of a TID 1410 group (docs/air-conformance.md, "Box labels in OHIF")
    assert len(result.labels) == len(LESIONS), result.labels
    drawn = sorted(" | ".join(box) for box in result.labels)
    expected = sorted(
        f"Certainty of Finding: {lesion.score * 100:.2f} % | 363698007: "
        f"{finding_codes(lesion.class_name).finding_site.meaning}"  # type: ignore[union-attr]
        for lesion in LESIONS
    )
    assert drawn == expected
    assert result.hydrated_rectangles == len(LESIONS)
    assert result.timings["total"] < 60


@pytest.mark.usefixtures("viewer_ready")
@pytest.mark.parametrize(
    ("tracking_identifier", "hydrated"),
    [
        # no "continue tracking": OHIF hydrates by graphic type (only read from a group-level
        # SCOORD) or by a cornerstone tool named in the Tracking Identifier
        pytest.param("lesion", None, id="display-only"),
        # D2R_SR_TRACKING_IDENTIFIER names the tool: the boxes also become editable rectangles
        pytest.param(OHIF_RECTANGLE_ROI_TRACKING_IDENTIFIER, 2, id="rectangle-roi"),
    ],
)
def test_tid1501_encoding_labels_boxes_with_finding_and_score(
    orthanc_factory: OrthancFactory,
    chest: tuple[Path, pydicom.Dataset],
    tmp_path: Path,
    tracking_identifier: str,
    hydrated: int | None,
) -> None:
    """With ``D2R_SR_ROI_ENCODING=tid1501`` OHIF labels each box "<finding> <NN> %" and
    shows the grounded sentence beside it."""
    image_path, image = chest
    (sr,) = build_reports(
        ReportContent(
            findings="Enlarged cardiac silhouette. Small right pleural effusion.",
            impression="Cardiomegaly; pleural effusion.",
            lesions=GROUNDED_LESIONS,
            image=image,
        ),
        AlgorithmInfo(name="d2r-viewer-test", version="0.0.0"),
        text_sr=False,
        tracking_identifier_prefix=tracking_identifier,
        roi_encoding=RoiEncoding.TID1501,
    )
    sr_path = tmp_path / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    orthanc = orthanc_factory(dicomweb=True)
    store(orthanc, image_path, sr_path)

    result = check_sr_in_ohif(
        orthanc,
        image.StudyInstanceUID,
        int(sr.SeriesNumber),
        artifacts_dir(),
        hydrate=True,
        hydration_timeout=6,
        name=f"ohif-result-sr-tid1501-{'tool' if ':' in tracking_identifier else 'plain'}",
    )

    assert result.screenshot.stat().st_size > 10_000
    assert_boxes_drawn(result, [les.box for les in GROUNDED_LESIONS], image.Columns, image.Rows)
    # OHIF 3.13.2 draws each label of a group without group-level SCOORD as "label: value":
    # first the Comment TEXT items (value empty, so the line ends in ":"), then the NUM
    assert len(result.labels) == len(GROUNDED_LESIONS), result.labels
    by_first_line = {box[0]: box for box in result.labels}
    for lesion in GROUNDED_LESIONS:
        label = finding_label(lesion.class_name, lesion.score)
        assert LABEL_PATTERN.fullmatch(label), label
        assert label == f"{lesion.class_name} {round(lesion.score * 100)} %"
        assert by_first_line.get(f"{label}:") == [
            f"{label}:",
            f"{lesion.sentence}:",
            f"Certainty of Finding: {lesion.score * 100:.2f} %",
        ], result.labels
    assert result.hydrated_rectangles == hydrated


@pytest.mark.usefixtures("viewer_ready")
def test_secondary_capture_film_boxes_drawn(
    orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    """A digitised chest film (SC, Modality CR, 8-bit, no pixel spacing at all) gets its boxes.

    OHIF matches the SCOORD's SELECTED FROM reference on SOP class and instance and draws in
    image pixels; a Secondary Capture needs no spacing for that.
    """
    source = get_testdata_file(CHEST_CR)
    assert source is not None
    pixels = pydicom.dcmread(source).pixel_array.astype(np.float64)
    film = (255.0 * (pixels.max() - pixels) / (pixels.max() - pixels.min())).astype(np.uint8)
    image = make_sc(None, modality="CR", body_part="CHEST", view_position="PA", seed=3)
    image.Rows, image.Columns = film.shape
    image.PixelData = film.tobytes()
    assert "PixelSpacing" not in image and "ImagerPixelSpacing" not in image
    image_path = tmp_path / "sc-film.dcm"
    image.save_as(image_path, enforce_file_format=True)
    reports = build_reports(
        ReportContent(findings="f", impression="i", lesions=LESIONS, image=image),
        AlgorithmInfo(name="d2r-viewer-test", version="0.0.0"),
    )
    sr_path = tmp_path / "sr.dcm"
    reports[0].save_as(sr_path, enforce_file_format=True)
    orthanc = orthanc_factory(dicomweb=True)
    store(orthanc, image_path, sr_path)

    result = check_sr_in_ohif(
        orthanc,
        image.StudyInstanceUID,
        int(reports[0].SeriesNumber),
        artifacts_dir(),
        hydrate=False,
        name="ohif-secondary-capture-sr",
    )

    assert_boxes_drawn(result, [lesion.box for lesion in LESIONS], image.Columns, image.Rows)


@pytest.mark.slow
@pytest.mark.usefixtures("viewer_ready")
@pytest.mark.parametrize(
    ("layout", "hydrated"),
    [
        # dcmjs takes the group's first NUM as the holder of the coordinates; a
        # Certainty NUM without an INFERRED FROM SCOORD makes hydration fail.
        pytest.param(Layout.GROUP_SCOORD, 0, id="tid1410-num-without-scoord"),
        # TID 1501 groups are drawn from the NUM's SCOORD, but OHIF offers no tracking.
        pytest.param(Layout.TID1501_NUM_INFERRED_FROM, None, id="tid1501-num-with-scoord"),
    ],
)
def test_other_layouts_drawn_but_not_editable(
    orthanc_factory: OrthancFactory,
    chest: tuple[Path, pydicom.Dataset],
    tmp_path: Path,
    layout: Layout,
    hydrated: int | None,
) -> None:
    """Alternative group layouts: boxes still drawn, but OHIF cannot make them editable."""
    image_path, image = chest
    sr = build_sr(image, CHEST_BOXES, layout=layout)
    sr_path = tmp_path / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    orthanc = orthanc_factory(dicomweb=True)
    store(orthanc, image_path, sr_path)

    result = check_sr_in_ohif(
        orthanc,
        image.StudyInstanceUID,
        int(sr.SeriesNumber),
        artifacts_dir(),
        hydrate=True,
        hydration_timeout=6,
        name=f"ohif-{layout.value}",
    )

    assert_boxes_drawn(result, [box.bounds for box in CHEST_BOXES], image.Columns, image.Rows)
    assert result.hydrated_rectangles == hydrated


@pytest.mark.slow
@pytest.mark.usefixtures("viewer_ready")
def test_zero_pixel_spacing_is_detected(orthanc_factory: OrthancFactory, tmp_path: Path) -> None:
    """The harness sees through boxes that exist in the DOM but are not visible.

    With the sample image's own ``PixelSpacing = 0\\0`` OHIF still creates the
    polylines, with NaN points; the check must report them as non-finite.
    """
    source = get_testdata_file(CHEST_CR)
    assert source is not None
    image = pydicom.dcmread(source, stop_before_pixels=True)
    assert [float(v) for v in image.PixelSpacing] == [0.0, 0.0]
    sr = build_sr(image, CHEST_BOXES, layout=Layout.NO_NUM)
    sr_path = tmp_path / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    orthanc = orthanc_factory(dicomweb=True)
    store(orthanc, Path(source), sr_path)

    result = check_sr_in_ohif(
        orthanc,
        image.StudyInstanceUID,
        int(sr.SeriesNumber),
        artifacts_dir(),
        hydrate=False,
        name="ohif-zero-pixel-spacing",
    )

    assert len(result.polylines) == len(CHEST_BOXES)
    points = [p for line in result.polylines for xy in line for p in xy]
    assert not any(math.isfinite(p) for p in points), points
    with pytest.raises(AssertionError, match="non-finite"):
        assert_boxes_drawn(result, [b.bounds for b in CHEST_BOXES], image.Columns, image.Rows)


def test_fit_axis_recovers_scale_and_offset() -> None:
    scale, offset, residual = fit_axis([0.0, 10.0, 20.0], [5.0, 10.0, 15.0])
    assert scale == pytest.approx(0.5)
    assert offset == pytest.approx(5.0)
    assert residual == pytest.approx(0.0, abs=1e-9)


def test_match_boxes_finds_the_pairing() -> None:
    expected = [(0.0, 0.0, 10.0, 10.0), (20.0, 30.0, 40.0, 50.0)]
    drawn = [(12.0, 17.0, 22.0, 27.0), (2.0, 2.0, 7.0, 7.0)]  # reversed order, scale 0.5, +2
    (sx, ox, rx), (sy, oy, ry) = match_boxes(drawn, expected)
    assert (sx, ox, sy, oy) == pytest.approx((0.5, 2.0, 0.5, 2.0))
    assert rx < 1e-9 and ry < 1e-9


def test_box_polyline_is_closed() -> None:
    box: Box = CHEST_BOXES[0]
    points = box.polyline()
    assert points.shape == (5, 2)
    assert (points[0] == points[-1]).all()
