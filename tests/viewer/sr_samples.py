"""Sample inputs for the viewer tests: the real chest CR and TID 1500 SRs built inline.

The SRs built here follow the structure of the product's result SR (TID 1500,
one TID 1410 planar ROI group per lesion with a closed 5-point POLYLINE box
and a Certainty of Finding NUM). They let the viewer harness be checked
independently of ``report.build``, and they encode the structural variants
whose display and hydration in OHIF the tests pin down.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

CHEST_CR = "RG1_UNCR.dcm"
"""Real chest CR in pydicom-data: 1841 columns x 1955 rows, PixelSpacing 0\\0."""

SR_SERIES_NUMBER = 900
CERTAINTY_OF_FINDING = hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding")
PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
BOUNDED_BY = hd.sr.CodedConcept("75958009", "SCT", "Bounded by")


@dataclass(frozen=True)
class Box:
    """A lesion box in source pixels: (x_min, y_min, x_max, y_max), (column, row)."""

    finding: hd.sr.CodedConcept
    site: hd.sr.CodedConcept
    score: float
    x_min: float
    y_min: float
    x_max: float
    y_max: float

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """The box as (x_min, y_min, x_max, y_max)."""
        return self.x_min, self.y_min, self.x_max, self.y_max

    def polyline(self) -> np.ndarray:
        """Closed 5-point POLYLINE, first point repeated."""
        x0, y0, x1, y1 = self.bounds
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


CHEST_BOXES = (
    Box(
        hd.sr.CodedConcept("8186001", "SCT", "Cardiomegaly"),
        codes.SCT.Heart,
        0.87,
        820,
        1250,
        1420,
        1850,
    ),
    Box(
        hd.sr.CodedConcept("60046008", "SCT", "Pleural effusion"),
        codes.SCT.Pleura,
        0.64,
        1350,
        1500,
        1750,
        1900,
    ),
)
"""Two boxes of different sizes inside the 1841 x 1955 chest CR."""


class Layout(enum.Enum):
    """Where the box sits inside each measurement group."""

    GROUP_SCOORD = "group-scoord"
    """highdicom default: group-level SCOORD; NUM Certainty of Finding without coordinates."""
    NUM_INFERRED_FROM = "num-inferred-from"
    """Group-level SCOORD, and the Certainty NUM also has an INFERRED FROM SCOORD child."""
    NO_NUM = "no-num"
    """Group-level SCOORD only; the certainty is left out."""
    TID1501_NUM_INFERRED_FROM = "tid1501"
    """TID 1501 group (no group-level SCOORD); the NUM has an INFERRED FROM SCOORD child."""


def chest_image(directory: Path) -> Path:
    """Write a viewable copy of the real chest CR and return its path.

    The pydicom-data file has ``PixelSpacing = 0\\0``. OHIF 3.13 then renders
    the image black and maps SR coordinates to NaN, so nothing is visible.
    The copy deletes PixelSpacing (absent is allowed: spacing unknown) and
    keeps every UID, so the SR references the same SOP Instance.
    """
    source = get_testdata_file(CHEST_CR)
    if source is None:
        raise FileNotFoundError(f"{CHEST_CR} not found; install pydicom-data")
    ds = pydicom.dcmread(source)
    if "PixelSpacing" in ds:
        del ds.PixelSpacing
    path = directory / "chest-cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _coordinates(box: Box, source: hd.sr.SourceImageForRegion) -> hd.sr.CoordinatesForMeasurement:
    """The box as an INFERRED FROM SCOORD child of a measurement."""
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=box.polyline(),
        source_image=source,
    )


def _group(
    index: int,
    box: Box,
    image: pydicom.Dataset,
    algorithm: hd.sr.AlgorithmIdentification,
    layout: Layout,
) -> (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
):
    source = hd.sr.SourceImageForRegion.from_source_image(image)
    tracking = hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"lesion-{index}")
    certainty = hd.sr.Measurement(
        name=CERTAINTY_OF_FINDING,
        value=round(box.score * 100, 1),
        unit=codes.UCUM.Percent,
        referenced_coordinates=(
            [_coordinates(box, source)] if layout is Layout.TID1501_NUM_INFERRED_FROM else None
        ),
    )
    evaluations = [hd.sr.QualitativeEvaluation(name=box.finding, value=codes.SCT.Present)]
    if layout is Layout.TID1501_NUM_INFERRED_FROM:
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            finding_type=box.finding,
            finding_sites=[hd.sr.FindingSite(box.site)],
            algorithm_id=algorithm,
            measurements=[certainty],
            qualitative_evaluations=evaluations,
        )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=box.polyline(),
            source_image=source,
        ),
        finding_type=box.finding,
        finding_sites=[hd.sr.FindingSite(box.site)],
        algorithm_id=algorithm,
        geometric_purpose=BOUNDED_BY,
        measurements=[] if layout is Layout.NO_NUM else [certainty],
        qualitative_evaluations=evaluations,
    )
    if layout is Layout.NUM_INFERRED_FROM:
        # highdicom refuses coordinates on measurements of a planar ROI group, so the
        # INFERRED FROM SCOORD is added to the Certainty NUM after construction.
        num = next(item for item in group[0].ContentSequence if item.ValueType == "NUM")
        num.ContentSequence = hd.sr.ContentSequence([_coordinates(box, source)])
    return group


def build_sr(
    image: pydicom.Dataset,
    boxes: Sequence[Box] = CHEST_BOXES,
    *,
    layout: Layout = Layout.NUM_INFERRED_FROM,
    series_number: int = SR_SERIES_NUMBER,
) -> pydicom.Dataset:
    """Build a TID 1500 Comprehensive SR with one planar ROI group per box."""
    algorithm = hd.sr.AlgorithmIdentification(name="d2r-test", version="0.0.0", manufacturer="d2r")
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="d2r-test", manufacturer_name="d2r", model_name="d2r-test"
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=[
            _group(i, box, image, algorithm, layout) for i, box in enumerate(boxes, start=1)
        ],
    )
    return hd.sr.ComprehensiveSR(
        evidence=[image],
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="d2r",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="AI CXR report (test)",
        specific_character_set="ISO_IR 192",
    )
