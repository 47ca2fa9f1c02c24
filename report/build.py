"""Build the result Structured Reports for one chest radiograph study.

:func:`build_reports` is pure: it takes the generated text, the detected lesions and the
source image headers and returns pydicom datasets; it never reads or sends anything.

The first document is a Comprehensive SR (1.2.840.10008.5.1.4.1.1.88.33) holding a
DICOM PS3.16 TID 1500 "Imaging Measurement Report"::

    CONTAINER (126000,DCM,"Imaging Measurement Report")                     TID 1500
     |- language, observer context (Device), procedure reported (43468-8,LN), CID 100
     |- CONTAINER (111028,DCM,"Image Library") > (126200,DCM,"Image Library Group") > IMAGE
     |- CONTAINER (126010,DCM,"Imaging Measurements")                        (only with lesions)
     |   '- CONTAINER (125007,DCM,"Measurement Group") per lesion               TID 1410
     |       tracking identifier + UID, finding, finding site, algorithm,
     |       geometric purpose = (75958009,SCT,"Bounded by"),
     |       SCOORD (111030,DCM,"Image Region") closed 5-point POLYLINE > SELECTED FROM IMAGE,
     |       NUM (111012,DCM,"Certainty of Finding") % > INFERRED FROM SCOORD (same box),
     |       TEXT (C0034375,UMLS,"Qualitative Evaluations") = the findings sentence it supports
     '- CONTAINER (C0034375,UMLS,"Qualitative Evaluations")
         TEXT (121070,DCM,"Findings"), TEXT (121073,DCM,"Impression")

With ``roi_encoding=RoiEncoding.TID1501`` each lesion group is instead a TID 1501
"Measurement and Qualitative Evaluation Group" without a group-level SCOORD: the box is
only the NUM's INFERRED FROM SCOORD (TID 300 / TID 320), the group lists its source image,
and two TEXT (121106,DCM,"Comment") items carry the label "<finding> <NN> %" and the
grounded sentence. That is the form OHIF 3.13 draws labels from (docs/air-conformance.md,
"Box labels in OHIF"); the default TID 1410 form is what 3D Slicer and highdicom read as a
planar ROI.

The second (optional, on by default) is a Basic Text SR (…88.11) holding a PS3.16 TID 2000
"Basic Diagnostic Imaging Report", in its own series::

    CONTAINER (18748-4,LN,"Diagnostic Imaging Report")                      TID 2000
     |- language, observer context (Device)
     |- CONTAINER (59776-5,LN,"Findings") > TEXT (121071,DCM,"Finding")     TID 2001/2002
     |- CONTAINER (19005-8,LN,"Impressions") > TEXT (121073,DCM,"Impression")
     '- [CONTAINER (55111-9,LN,"Current Procedure Descriptions")
           > TEXT (121065,DCM,"Procedure Description") per comment]

Values a source image carries that its VR forbids (:mod:`report.source_values`) are not
copied into either document.

Both are COMPLETE, UNVERIFIED, PRELIMINARY drafts in UTF-8 (ISO_IR 192), Explicit VR
Little Endian, with Series and SOP Instance UIDs derived from (StudyInstanceUID,
algorithm name, algorithm version), so a redelivered job yields the same identity.
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from numbers import Real
from typing import Any, Final

import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from d2r_core.geometry import Box
from report.codes import (
    AIR_PROCESSING_ALGORITHM,
    BOUNDED_BY,
    CERTAINTY_OF_FINDING,
    DEVICE,
    DIAGNOSTIC_IMAGING_REPORT,
    FINDING,
    FINDINGS,
    FINDINGS_HEADING,
    IMAGING_MEASUREMENT_REPORT,
    IMPRESSION,
    IMPRESSIONS_HEADING,
    PERCENT,
    PROCEDURE_DESCRIPTION,
    PROCEDURE_DESCRIPTIONS_HEADING,
    PROCEDURE_REPORTED,
    PROCESSING_EQUIPMENT,
    QUALITATIVE_EVALUATIONS,
    finding_codes,
    private_coding_scheme,
)
from report.errors import ReportBuildError, SourceImageError
from report.sop import BASIC_TEXT_SR_VALUE_TYPES, BasicTextSR
from report.source_values import source_header

__all__ = [
    "COMPREHENSIVE_SR_SERIES_NUMBER",
    "NO_FINDINGS_TEXT",
    "NO_IMPRESSION_TEXT",
    "OHIF_RECTANGLE_ROI_TRACKING_IDENTIFIER",
    "REFERENCEABLE_SOP_CLASSES",
    "RoiEncoding",
    "SR_SPECIFIC_CHARACTER_SET",
    "TEXT_SR_SERIES_NUMBER",
    "AlgorithmInfo",
    "algorithm_equipment",
    "LesionFinding",
    "ReportContent",
    "build_reports",
    "clip_box",
    "closed_polyline",
    "default_series_description",
    "derive_uid",
    "finding_label",
    "source_modality",
]

logger = logging.getLogger(__name__)

COMPREHENSIVE_SR_SERIES_NUMBER: Final = 990
TEXT_SR_SERIES_NUMBER: Final = 991
SR_SPECIFIC_CHARACTER_SET: Final = "ISO_IR 192"
#: Written instead of an empty TEXT value.
NO_FINDINGS_TEXT: Final = "No findings generated."
NO_IMPRESSION_TEXT: Final = "No impression generated."
#: Tracking identifier that makes OHIF offer a group as an editable rectangle. An
#: identifier prefix containing ``":"`` names such a viewer tool and is used verbatim.
OHIF_RECTANGLE_ROI_TRACKING_IDENTIFIER: Final = "Cornerstone3DTools@^0.1.0:RectangleROI"


class RoiEncoding(StrEnum):
    """How a lesion box is written in its TID 1500 measurement group."""

    #: TID 1410 planar ROI group: SCOORD at group level (3D Slicer, highdicom, IHE AIR)
    TID1410 = "tid1410"
    #: TID 1501 group: the box only as the Certainty NUM's INFERRED FROM SCOORD, plus
    #: Comment TEXT items "<finding> <NN> %" and the sentence (what OHIF labels boxes with)
    TID1501 = "tid1501"


#: a lesion's measurement group in either encoding
_LesionGroup = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)

#: Words in an algorithm name that mark a model not fit for clinical use.
_NOT_FOR_DIAGNOSTIC_USE_MARKERS: Final = ("demo", "synthetic", "phantom", "random", "untrained")
_LO_MAX: Final = 64  # Long String (LO) value length
_UT_MAX: Final = 10_000  # a comment is one short statement, far below the UT limit

#: Source image SOP classes the report may reference, with their coded modality (CID 29).
_SOURCE_MODALITIES: Final[dict[str, Code]] = {
    ComputedRadiographyImageStorage: codes.DCM.ComputedRadiography,
    DigitalXRayImageStorageForPresentation: codes.DCM.DigitalRadiography,
    DigitalXRayImageStorageForProcessing: codes.DCM.DigitalRadiography,
}
#: A Secondary Capture (a digitised film, a forwarded image) is referenced when its Modality
#: says it is a radiograph; it has no Pixel Spacing, so its Image Library entry has none.
_SECONDARY_CAPTURE_MODALITIES: Final[dict[str, Code]] = {
    "CR": codes.DCM.ComputedRadiography,
    "DX": codes.DCM.DigitalRadiography,
}
#: every SOP class :func:`build_reports` may reference (with the Modality rule above for SC)
REFERENCEABLE_SOP_CLASSES: Final = frozenset({*_SOURCE_MODALITIES, SecondaryCaptureImageStorage})


def source_modality(ds: Dataset) -> Code | None:
    """The coded modality (CID 29) of a source image, or None when it cannot be referenced.

    >>> from pydicom.uid import SecondaryCaptureImageStorage
    >>> ds = Dataset(); ds.SOPClassUID = SecondaryCaptureImageStorage; ds.Modality = "cr"
    >>> source_modality(ds).meaning
    'Computed Radiography'
    >>> ds.Modality = "OT"; source_modality(ds) is None
    True
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == SecondaryCaptureImageStorage:
        return _SECONDARY_CAPTURE_MODALITIES.get(str(ds.get("Modality", "")).strip().upper())
    return _SOURCE_MODALITIES.get(sop_class)


_REQUIRED_SOURCE_ATTRIBUTES: Final = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
)
_PIXELS: Final = Code("{pixels}", "UCUM", "Pixels")
_CONTAINS: Final = hd.sr.RelationshipTypeValues.CONTAINS
_HAS_ACQ_CONTEXT: Final = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
_HAS_CONCEPT_MOD: Final = hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD


def _check_text(value: object, name: str, *, max_length: int | None = None) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if max_length is not None and not value.strip():
        raise ValueError(f"{name} must not be empty")
    if max_length is not None and (len(value) > max_length or "\\" in value):
        raise ValueError(f"{name} must be at most {max_length} characters without '\\'")
    return value


@dataclass(frozen=True)
class LesionFinding:
    """One detected lesion.

    Parameters
    ----------
    class_name : str
        VinDr-CXR class string (see :data:`report.codes.VINDR_CLASSES`).
    score : float
        Detector confidence in [0, 1].
    box : tuple of 4 float
        ``(x_min, y_min, x_max, y_max)`` in continuous source-image pixel coordinates,
        (0, 0) being the top-left corner of the first pixel.
    sentence : str or None
        The findings sentence that states this lesion (:mod:`report.grounding`); written in
        the lesion's measurement group as TEXT (C0034375, UMLS, "Qualitative Evaluations").
    """

    class_name: str
    score: float
    box: Box
    sentence: str | None = None

    def __post_init__(self) -> None:
        _check_text(self.class_name, "class_name")
        if self.sentence is not None:
            _check_text(self.sentence, "sentence", max_length=_UT_MAX)
        finding_codes(self.class_name)  # ValueError naming class_name
        score: object = self.score
        if isinstance(score, bool) or not isinstance(score, Real):
            raise TypeError(f"score must be a real number, not {type(score).__name__}")
        if not 0.0 <= float(self.score) <= 1.0:
            raise ValueError(f"score must be in [0, 1], got {self.score!r}")
        box: object = self.box
        if isinstance(box, (str, bytes)) or not isinstance(box, Sequence):
            raise TypeError(f"box must be a sequence of 4 numbers, not {type(box).__name__}")
        if len(box) != 4:
            raise ValueError(f"box must have 4 values (x_min, y_min, x_max, y_max), got {box!r}")
        values: list[object] = list(box)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"box values must be real numbers, got {box!r}")
            if not math.isfinite(value):
                raise ValueError(f"box values must be finite, got {box!r}")
        object.__setattr__(self, "score", float(self.score))
        object.__setattr__(self, "box", tuple(float(v) for v in self.box))


@dataclass(frozen=True)
class AlgorithmInfo:
    """The algorithm (device) that produced the report.

    Parameters
    ----------
    name : str
        Algorithm name, e.g. ``"d2r-net"``; a name containing "demo", "synthetic" or
        "untrained" marks the output as not for diagnostic use.
    version : str
        Algorithm version, e.g. a release or checkpoint version.
    manufacturer : str
        Manufacturer of the algorithm.
    parameters : Sequence[str]
        Settings that shape the result (score threshold, input gate), each written as TEXT
        (111002, DCM, "Algorithm Parameters") of the TID 4019 Algorithm Identification in
        every measurement group.
    """

    name: str
    version: str
    manufacturer: str = "d2r"
    parameters: Sequence[str] = ()

    def __post_init__(self) -> None:
        _check_text(self.name, "name", max_length=_LO_MAX)
        _check_text(self.version, "version", max_length=_LO_MAX)
        _check_text(self.manufacturer, "manufacturer", max_length=_LO_MAX)
        if isinstance(self.parameters, str) or not isinstance(self.parameters, Sequence):
            raise TypeError("parameters must be a sequence of str")
        for parameter in self.parameters:
            _check_text(parameter, "parameters", max_length=_UT_MAX)
        object.__setattr__(self, "parameters", tuple(self.parameters))

    @property
    def not_for_diagnostic_use(self) -> bool:
        """Whether the name marks a demo, synthetic or untrained model."""
        lowered = self.name.lower()
        return any(marker in lowered for marker in _NOT_FOR_DIAGNOSTIC_USE_MARKERS)


def _check_source(ds: object, name: str) -> Dataset:
    if not isinstance(ds, Dataset):
        raise TypeError(f"{name} must be a pydicom Dataset, not {type(ds).__name__}")
    missing = [kw for kw in _REQUIRED_SOURCE_ATTRIBUTES if not ds.get(kw)]
    if missing:
        raise SourceImageError(f"{name} lacks {', '.join(missing)}")
    if source_modality(ds) is None:
        raise SourceImageError(
            f"{name} has SOP Class UID {ds.SOPClassUID} and Modality "
            f"{ds.get('Modality', '') or '(empty)'}; expected a CR or DX image, or a Secondary "
            "Capture with Modality CR or DX"
        )
    return ds


@dataclass(frozen=True)
class ReportContent:
    """What the reports say.

    Parameters
    ----------
    findings : str
        Generated findings text (may be empty).
    impression : str
        Generated impression text (may be empty).
    lesions : Sequence[LesionFinding]
        Detected lesions; boxes refer to `image`.
    image : pydicom.dataset.Dataset
        Source image the boxes refer to (a header read with ``stop_before_pixels`` is enough).
    evidence : Sequence[pydicom.dataset.Dataset]
        Every source image the reports are about (headers); `image` is added if absent.
        All must belong to the study of `image`.
    comments : Sequence[str]
        Further statements about how the result was produced (e.g. that the input gate was
        off), each a TEXT (121106,DCM,"Comment") after the findings and impression.
    abstain_reason : str or None
        Set when the model declined the study (then `lesions` is empty): why. The presentation
        state then says "Not assessed by AI: <reason>" and no overlay image is made.
    """

    findings: str
    impression: str
    lesions: Sequence[LesionFinding]
    image: Dataset
    evidence: Sequence[Dataset] = field(default=())
    comments: Sequence[str] = field(default=())
    abstain_reason: str | None = None

    def __post_init__(self) -> None:
        _check_text(self.findings, "findings")
        _check_text(self.impression, "impression")
        lesions: object = self.lesions
        if isinstance(lesions, (str, bytes)) or not isinstance(lesions, Sequence):
            raise TypeError("lesions must be a sequence of LesionFinding")
        for lesion in self.lesions:
            if not isinstance(lesion, LesionFinding):
                raise TypeError(f"lesions must hold LesionFinding, not {type(lesion).__name__}")
        image = _check_source(self.image, "image")
        if not isinstance(self.evidence, Sequence):
            raise TypeError("evidence must be a sequence of pydicom Datasets")
        evidence = [image]
        seen = {image.SOPInstanceUID}
        for ds in self.evidence:
            _check_source(ds, "evidence")
            if ds.StudyInstanceUID != image.StudyInstanceUID:
                raise SourceImageError(
                    f"evidence instance {ds.SOPInstanceUID} belongs to study "
                    f"{ds.StudyInstanceUID}, not to the image's study {image.StudyInstanceUID}"
                )
            if ds.SOPInstanceUID not in seen:
                seen.add(ds.SOPInstanceUID)
                evidence.append(ds)
        for comment in self.comments:
            _check_text(comment, "comments", max_length=_UT_MAX)
        if self.abstain_reason is not None:
            _check_text(self.abstain_reason, "abstain_reason")
            if self.lesions:
                raise ValueError("an abstention (abstain_reason set) has no lesions")
        object.__setattr__(self, "lesions", tuple(self.lesions))
        object.__setattr__(self, "evidence", tuple(evidence))
        object.__setattr__(self, "comments", tuple(self.comments))


# --- pure helpers -------------------------------------------------------------------------


def derive_uid(*parts: str) -> str:
    """Return a UID determined by `parts` (pydicom ``generate_uid`` with entropy sources).

    Parameters
    ----------
    *parts : str
        Identity of the object, e.g. StudyInstanceUID, algorithm name, version, role.

    Returns
    -------
    str

    Examples
    --------
    >>> derive_uid("1.2.3", "d2r-net", "1.0") == derive_uid("1.2.3", "d2r-net", "1.0")
    True
    """
    return str(generate_uid(entropy_srcs=list(parts)))


def clip_box(box: Box, columns: int, rows: int) -> Box | None:
    """Clip a box to the image extent ``[0, columns] x [0, rows]``.

    Parameters
    ----------
    box : tuple of 4 float
        ``(x_min, y_min, x_max, y_max)`` in continuous pixel coordinates.
    columns, rows : int
        Image matrix size.

    Returns
    -------
    tuple of 4 float or None
        The clipped box, or None when nothing with a positive area is left.

    Examples
    --------
    >>> clip_box((-5.0, 10.0, 50.0, 900.0), 100, 200)
    (0.0, 10.0, 50.0, 200.0)
    >>> clip_box((120.0, 10.0, 150.0, 20.0), 100, 200) is None
    True
    """
    x_min, y_min, x_max, y_max = box
    cx_min, cx_max = (min(max(v, 0.0), float(columns)) for v in (x_min, x_max))
    cy_min, cy_max = (min(max(v, 0.0), float(rows)) for v in (y_min, y_max))
    # Compare in the precision the SR stores (FL, float32).
    xs = np.array([cx_min, cx_max], dtype=np.float32)
    ys = np.array([cy_min, cy_max], dtype=np.float32)
    if not (xs[1] > xs[0] and ys[1] > ys[0]):
        return None
    return (cx_min, cy_min, cx_max, cy_max)


def closed_polyline(box: Box) -> npt.NDArray[np.float32]:
    """Return the closed 5-point (column, row) POLYLINE of a box, first point repeated.

    Examples
    --------
    >>> closed_polyline((1.0, 2.0, 3.0, 4.0)).tolist()
    [[1.0, 2.0], [3.0, 2.0], [3.0, 4.0], [1.0, 4.0], [1.0, 2.0]]
    """
    x_min, y_min, x_max, y_max = box
    return np.array(
        [[x_min, y_min], [x_max, y_min], [x_max, y_max], [x_min, y_max], [x_min, y_min]],
        dtype=np.float32,
    )


def default_series_description(algorithm: AlgorithmInfo, *, text: bool = False) -> str:
    """Return the series description of an AI draft report (at most 64 characters).

    Examples
    --------
    >>> default_series_description(AlgorithmInfo("d2r-demo", "0.1"))
    'AI draft, not for diagnostic use: d2r-demo 0.1'
    """
    kind = "AI draft text" if text else "AI draft"
    if algorithm.not_for_diagnostic_use:
        kind += ", not for diagnostic use"
    return f"{kind}: {algorithm.name} {algorithm.version}"[:_LO_MAX]


def _tracking_identifier(prefix: str, number: int) -> str:
    return prefix if ":" in prefix else f"{prefix}-{number}"


def _source_header(image: Dataset) -> Dataset:
    """:func:`report.source_values.source_header`: no pixel data, no value its VR forbids."""
    return source_header(image)


def _usable_imager_pixel_spacing(image: Dataset) -> tuple[float, float] | None:
    spacing = image.get("ImagerPixelSpacing")
    try:
        row_spacing, column_spacing = (float(v) for v in spacing)
    except (TypeError, ValueError):
        return None
    if row_spacing > 0 and column_spacing > 0:
        return row_spacing, column_spacing
    return None


# Longer than a screen: TID 1601/1602/1603 items, one per descriptor of the template, in template
# order
def _image_library_entry(image: Dataset) -> hd.sr.ImageContentItem:
    """TID 1601 entry with TID 1602/1603 descriptors; spacing only when it is usable."""
    modality = source_modality(image)
    if modality is None:  # ReportContent checked it already
        raise SourceImageError(f"image {image.SOPInstanceUID} cannot be referenced")
    item = hd.sr.ImageContentItem(
        name=codes.SCT.Source,
        referenced_sop_class_uid=image.SOPClassUID,
        referenced_sop_instance_uid=image.SOPInstanceUID,
        relationship_type=_CONTAINS,
    )
    descriptors: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=codes.DCM.Modality,
            value=modality,
            relationship_type=_HAS_ACQ_CONTEXT,
        ),
        hd.sr.NumContentItem(
            name=codes.DCM.PixelDataRows,
            value=int(image.Rows),
            unit=_PIXELS,
            relationship_type=_HAS_ACQ_CONTEXT,
        ),
        hd.sr.NumContentItem(
            name=codes.DCM.PixelDataColumns,
            value=int(image.Columns),
            unit=_PIXELS,
            relationship_type=_HAS_ACQ_CONTEXT,
        ),
    ]
    orientation = image.get("PatientOrientation")
    if orientation is not None and len(orientation) == 2 and all(orientation):
        descriptors += [
            hd.sr.TextContentItem(
                name=codes.DCM.PatientOrientationRow,
                value=str(orientation[0]),
                relationship_type=_HAS_ACQ_CONTEXT,
            ),
            hd.sr.TextContentItem(
                name=codes.DCM.PatientOrientationColumn,
                value=str(orientation[1]),
                relationship_type=_HAS_ACQ_CONTEXT,
            ),
        ]
    spacing = _usable_imager_pixel_spacing(image)
    if spacing is not None:
        row_spacing, column_spacing = spacing
        descriptors += [
            hd.sr.NumContentItem(
                name=codes.DCM.HorizontalPixelSpacing,
                value=column_spacing,
                unit=codes.UCUM.Millimeter,
                relationship_type=_HAS_ACQ_CONTEXT,
            ),
            hd.sr.NumContentItem(
                name=codes.DCM.VerticalPixelSpacing,
                value=row_spacing,
                unit=codes.UCUM.Millimeter,
                relationship_type=_HAS_ACQ_CONTEXT,
            ),
        ]
    else:
        logger.debug(
            "image %s has no usable Imager Pixel Spacing; Image Library entry without spacing",
            image.SOPInstanceUID,
        )
    item.ContentSequence = hd.sr.ContentSequence(descriptors)
    return item


def _image_library(images: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library (one group), built without highdicom's spacing requirement."""
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=_CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence([_image_library_entry(ds) for ds in images])
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=_CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


@functools.lru_cache(maxsize=8)
def _observer_context(algorithm: AlgorithmInfo) -> hd.sr.ObservationContext:
    """TID 1002 observer context (the algorithm as Device), built once per algorithm: the
    same items go into every document (nothing changes a built document's items)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(algorithm),
        name=algorithm.name,
        manufacturer_name=algorithm.manufacturer,
        model_name=f"{algorithm.name} {algorithm.version}"[:_LO_MAX],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=DEVICE, observer_identifying_attributes=device
        )
    )


def _text_items(content: ReportContent) -> list[hd.sr.TextContentItem]:
    findings = content.findings if content.findings.strip() else NO_FINDINGS_TEXT
    impression = content.impression if content.impression.strip() else NO_IMPRESSION_TEXT
    return [
        hd.sr.TextContentItem(name=FINDINGS, value=findings, relationship_type=_CONTAINS),
        hd.sr.TextContentItem(name=IMPRESSION, value=impression, relationship_type=_CONTAINS),
        *(
            hd.sr.TextContentItem(name=codes.DCM.Comment, value=c, relationship_type=_CONTAINS)
            for c in content.comments
        ),
    ]


def _region_source(image: Dataset) -> hd.sr.SourceImageForRegion:
    """SELECTED FROM reference. CR, DX and SC are single-frame IODs: no frame number, even
    when a header claims Number of Frames (the model reads the first frame)."""
    return hd.sr.SourceImageForRegion.from_source_image(image)


@functools.lru_cache(maxsize=8)
def _algorithm_identification(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019 items of every measurement group, built once per algorithm (see
    :func:`_observer_context`)."""
    return hd.sr.AlgorithmIdentification(  # no manufacturer: TID 4019 has no such row
        name=algorithm.name,
        version=algorithm.version,
        parameters=list(algorithm.parameters) or None,
    )


def finding_label(class_name: str, score: float) -> str:
    """The box label of the TID 1501 encoding: the finding and its score as a whole percent.

    >>> finding_label("Pleural effusion", 0.465)
    'Pleural effusion 47 %'
    """
    return f"{class_name} {math.floor(score * 100.0 + 0.5):d} %"


def _box_coordinates(polyline: npt.NDArray[np.float32], image: Dataset) -> hd.sr.ContentSequence:
    """The box as a NUM's INFERRED FROM SCOORD (TID 320) > SELECTED FROM IMAGE."""
    return hd.sr.ContentSequence(
        [
            hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=polyline,
                source_image=_region_source(image),
                purpose=codes.DCM.ImageRegion,
            )
        ]
    )


# Longer than a screen: the TID 1410/1501 items of one measurement group, in template order
def _lesion_group(
    lesion: LesionFinding,
    box: Box,
    number: int,
    image: Dataset,
    algorithm: AlgorithmInfo,
    tracking_identifier_prefix: str,
    encoding: RoiEncoding,
) -> _LesionGroup:
    """TID 1410 (or, with :attr:`RoiEncoding.TID1501`, TID 1501) group for one (clipped,
    non-degenerate) box."""
    polyline = closed_polyline(box)
    certainty = hd.sr.Measurement(
        name=CERTAINTY_OF_FINDING, value=round(lesion.score * 100.0, 2), unit=PERCENT
    )
    codes_ = finding_codes(lesion.class_name)
    tracking = hd.sr.TrackingIdentifier(
        uid=derive_uid(
            image.StudyInstanceUID,
            image.SOPInstanceUID,
            algorithm.name,
            algorithm.version,
            "lesion",
            str(number),
        ),
        identifier=_tracking_identifier(tracking_identifier_prefix, number),
    )
    common: dict[str, Any] = {
        "tracking_identifier": tracking,
        "finding_type": codes_.finding,
        "finding_sites": (
            [hd.sr.FindingSite(codes_.finding_site)] if codes_.finding_site is not None else None
        ),
        "algorithm_id": _algorithm_identification(algorithm),
        "measurements": [certainty],
    }
    group: _LesionGroup
    if encoding is RoiEncoding.TID1501:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(image)],
            **common,
        )
    else:
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            referenced_region=hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=polyline,
                source_image=_region_source(image),
            ),
            geometric_purpose=BOUNDED_BY,
            **common,
        )
    # The box as the Certainty NUM's INFERRED FROM SCOORD (TID 300 > TID 320): dcmjs reads it
    # there to make an editable tool, and in TID 1501 it is the only place of the box.
    # highdicom refuses it on a planar ROI group's measurement, so it is added here.
    num_items = [item for item in group[0].ContentSequence if item.ValueType == "NUM"]
    num_items[0].ContentSequence = _box_coordinates(polyline, image)
    items = group[0].ContentSequence
    if encoding is RoiEncoding.TID1501:
        # OHIF labels a group without a group-level SCOORD with each Comment TEXT's value;
        # the Comments extend TID 1501 (not among its rows) with a standard DCM concept
        items.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=finding_label(lesion.class_name, lesion.score),
                relationship_type=_CONTAINS,
            )
        )
        if lesion.sentence is not None:
            items.append(
                hd.sr.TextContentItem(
                    name=codes.DCM.Comment, value=lesion.sentence, relationship_type=_CONTAINS
                )
            )
    if lesion.sentence is not None:
        # TID 1410 row "Qualitative Evaluations" (TEXT): the grounded findings sentence (kept
        # in the same place in a TID 1501 group, so readers find it in either encoding)
        items.append(
            hd.sr.TextContentItem(
                name=QUALITATIVE_EVALUATIONS, value=lesion.sentence, relationship_type=_CONTAINS
            )
        )
    return group


def _measurement_groups(
    content: ReportContent,
    algorithm: AlgorithmInfo,
    tracking_identifier_prefix: str,
    encoding: RoiEncoding,
) -> list[_LesionGroup]:
    image = content.image
    groups: list[_LesionGroup] = []
    for index, lesion in enumerate(content.lesions, start=1):
        box = clip_box(lesion.box, int(image.Columns), int(image.Rows))
        if box is None:
            logger.warning(
                "lesion %d (%s) skipped: box %s has no area inside the %dx%d image %s",
                index,
                lesion.class_name,
                lesion.box,
                image.Columns,
                image.Rows,
                image.SOPInstanceUID,
            )
            continue
        if box != lesion.box:
            logger.info(
                "lesion %d (%s): box %s clipped to %s", index, lesion.class_name, lesion.box, box
            )
        groups.append(
            _lesion_group(
                lesion,
                box,
                len(groups) + 1,
                image,
                algorithm,
                tracking_identifier_prefix,
                encoding,
            )
        )
    return groups


def _measurement_report(
    content: ReportContent,
    algorithm: AlgorithmInfo,
    groups: Sequence[_LesionGroup],
) -> hd.sr.ContainerContentItem:
    """TID 1500 root container (assembled here so that zero lesions is allowed)."""
    root = hd.sr.ContainerContentItem(name=IMAGING_MEASUREMENT_REPORT, template_id="1500")
    items = hd.sr.ContentSequence()
    items.extend(hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    items.extend(_observer_context(algorithm))
    items.append(
        hd.sr.CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=PROCEDURE_REPORTED,
            relationship_type=_HAS_CONCEPT_MOD,
        )
    )
    items.append(_image_library(content.evidence))
    if groups:
        # Without lesions the container is left out (TID 1500 is satisfied by the
        # Qualitative Evaluations container; an empty one breaks highdicom's parser).
        measurements = hd.sr.ContainerContentItem(
            name=codes.DCM.ImagingMeasurements, relationship_type=_CONTAINS
        )
        measurements.ContentSequence = hd.sr.ContentSequence()
        for group in groups:
            measurements.ContentSequence.extend(group)
        items.append(measurements)
    evaluations = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=_CONTAINS
    )
    evaluations.ContentSequence = hd.sr.ContentSequence(_text_items(content))
    items.append(evaluations)
    root.ContentSequence = items
    return root


def _section(heading: Code, items: Sequence[hd.sr.ContentItem]) -> hd.sr.ContainerContentItem:
    """TID 2001 section: a CID 7001 heading CONTAINS its TID 2002 observations."""
    section = hd.sr.ContainerContentItem(name=heading, relationship_type=_CONTAINS)
    section.ContentSequence = hd.sr.ContentSequence(items)
    return section


def _text_report(content: ReportContent, algorithm: AlgorithmInfo) -> hd.sr.ContainerContentItem:
    """TID 2000 Basic Diagnostic Imaging Report: a Findings and an Impressions section."""
    root = hd.sr.ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT, template_id="2000")
    items = hd.sr.ContentSequence()
    items.extend(hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    items.extend(_observer_context(algorithm))
    findings, impression, *comments = _text_items(content)
    findings.ConceptNameCodeSequence = [hd.sr.CodedConcept.from_code(FINDING)]
    items.append(_section(FINDINGS_HEADING, [findings]))
    items.append(_section(IMPRESSIONS_HEADING, [impression]))
    if comments:  # how the result was produced: a procedure description (CID 7002)
        for comment in comments:
            comment.ConceptNameCodeSequence = [hd.sr.CodedConcept.from_code(PROCEDURE_DESCRIPTION)]
        items.append(_section(PROCEDURE_DESCRIPTIONS_HEADING, comments))
    root.ContentSequence = items
    return root


def device_uid(algorithm: AlgorithmInfo) -> str:
    """The algorithm's Device UID: one per manufacturer, name and version (IHE AIR 6.5.3.1
    wants it to change with every model version); also the observer device's UID."""
    return derive_uid(algorithm.manufacturer, algorithm.name, algorithm.version, "device")


def algorithm_equipment(
    algorithm: AlgorithmInfo, when: datetime.datetime
) -> hd.ContributingEquipment:
    """The Contributing Equipment item that IHE AIR 6.5.3.1 asks for: Purpose of Reference
    (Newcode1, 99IHE, "Processing Algorithm"), Manufacturer, Manufacturer's Model Name,
    Software Versions and Device UID."""
    equipment = hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=PROCESSING_EQUIPMENT,  # highdicom accepts CID 7005 codes only
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        contribution_datetime=when,
        contribution_description="AI processing algorithm: detection and report drafting",
    )
    equipment.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(AIR_PROCESSING_ALGORITHM)
    ]
    equipment.DeviceUID = device_uid(algorithm)
    return equipment


#: Value types a Comprehensive SR may contain (PS3.3 A.35.3.3.1): all but SCOORD3D.
COMPREHENSIVE_SR_VALUE_TYPES: Final = BASIC_TEXT_SR_VALUE_TYPES | {"NUM", "SCOORD", "TCOORD"}


def _check_tree(
    items: Iterable[Dataset], evidence_uids: Collection[str], value_types: Collection[str]
) -> None:
    """What highdicom's SR constructor checks, in one walk of the tree: every value type is
    allowed in the document, and every referenced instance is in the evidence."""
    for item in items:
        value_type = str(item.ValueType)
        if value_type not in value_types:
            raise ValueError(f"the SR content holds a {value_type} item, which it may not hold")
        if value_type in ("IMAGE", "COMPOSITE"):
            uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            if uid not in evidence_uids:
                raise ValueError(f"SOP Instance {uid} is referenced but not in the evidence")
        if "ContentSequence" in item:
            _check_tree(item.ContentSequence, evidence_uids, value_types)


def _document(
    make: Callable[..., Dataset],
    root: hd.sr.ContainerContentItem,
    evidence: Sequence[Dataset],
    value_types: Collection[str],
    **kwargs: Any,
) -> Dataset:
    """The SR document: highdicom's SR class ``make`` builds it around ``root``'s header, then
    ``root``'s content tree is attached once.

    highdicom's constructor deep-copies the content it is given, parses the copy back and
    searches it three times (referenced instances, forbidden value types): most of a report's
    build time. It gets the root container with an empty Content Sequence instead (it still
    writes patient, study, series, flags, evidence and equipment from its arguments); its
    checks run here in one walk of the tree (:func:`_check_tree`), and the tree is attached to
    a plain Dataset holding what the constructor wrote, so no highdicom accessor describes
    less than the document holds.
    """
    items = root.ContentSequence
    _check_tree(items, {str(ds.SOPInstanceUID) for ds in evidence}, value_types)
    root.ContentSequence = hd.sr.ContentSequence()
    try:
        built = make(evidence=evidence, content=root, **kwargs)
    finally:
        root.ContentSequence = items
    document = Dataset()
    document.file_meta = built.file_meta
    for element in built:
        document.add(element)
    document.ContentSequence = items
    return document


# Longer than a screen: the two SR documents and their shared header, in the order of the
# templates
def build_reports(
    content: ReportContent,
    algorithm: AlgorithmInfo,
    *,
    text_sr: bool = True,
    tracking_identifier_prefix: str = "lesion",
    roi_encoding: RoiEncoding = RoiEncoding.TID1410,
    series_number: int = COMPREHENSIVE_SR_SERIES_NUMBER,
    text_series_number: int = TEXT_SR_SERIES_NUMBER,
    series_description: str | None = None,
    text_series_description: str | None = None,
    content_datetime: datetime.datetime | None = None,
) -> list[Dataset]:
    """Build the TID 1500 Comprehensive SR and, by default, the Basic Text SR.

    Parameters
    ----------
    content : ReportContent
        Text, lesions and source image headers.
    algorithm : AlgorithmInfo
        The producing algorithm; with the StudyInstanceUID it determines every UID.
    text_sr : bool
        Also build the Basic Text SR (own series).
    tracking_identifier_prefix : str
        Tracking Identifier of lesion *n* is ``"<prefix>-<n>"``; a prefix containing ``":"``
        (a viewer tool tag such as :data:`OHIF_RECTANGLE_ROI_TRACKING_IDENTIFIER`) is used
        verbatim.
    roi_encoding : RoiEncoding
        How each lesion group holds its box: TID 1410 planar ROI (default) or TID 1501 with
        the box under the Certainty NUM and Comment labels for OHIF.
    series_number, text_series_number : int
        Series Numbers of the two SR series.
    series_description, text_series_description : str or None
        Series Descriptions; default :func:`default_series_description`.
    content_datetime : datetime.datetime or None
        Content (and series) date and time; default now.

    Returns
    -------
    list of pydicom.dataset.Dataset
        ``[comprehensive_sr]`` or ``[comprehensive_sr, basic_text_sr]``.

    Raises
    ------
    TypeError, ValueError
        On an invalid argument (named in the message).
    ReportBuildError
        If highdicom rejects the assembled document.

    Notes
    -----
    Boxes are clipped to the image; a box with no area inside the image is skipped and
    logged, never written.
    """
    if not isinstance(content, ReportContent):
        raise TypeError(f"content must be a ReportContent, not {type(content).__name__}")
    if not isinstance(algorithm, AlgorithmInfo):
        raise TypeError(f"algorithm must be an AlgorithmInfo, not {type(algorithm).__name__}")
    _check_text(tracking_identifier_prefix, "tracking_identifier_prefix", max_length=_LO_MAX)
    roi_encoding = RoiEncoding(roi_encoding)  # ValueError naming the bad value
    for name, number in (
        ("series_number", series_number),
        ("text_series_number", text_series_number),
    ):
        if isinstance(number, bool) or not isinstance(number, int):
            raise TypeError(f"{name} must be an int")
        if not 0 <= number <= 2**31 - 1:
            raise ValueError(f"{name} must be in [0, 2147483647], got {number}")
    if series_description is None:
        series_description = default_series_description(algorithm)
    if text_series_description is None:
        text_series_description = default_series_description(algorithm, text=True)
    _check_text(series_description, "series_description", max_length=_LO_MAX)
    _check_text(text_series_description, "text_series_description", max_length=_LO_MAX)
    if content_datetime is None:
        content_datetime = datetime.datetime.now()
    elif not isinstance(content_datetime, datetime.datetime):
        raise TypeError("content_datetime must be a datetime.datetime")

    study_uid = str(content.image.StudyInstanceUID)
    evidence = [_source_header(ds) for ds in content.evidence]
    groups = _measurement_groups(content, algorithm, tracking_identifier_prefix, roi_encoding)
    uses_private_codes = any(
        finding_codes(lesion.class_name).is_private
        for lesion in content.lesions
        if clip_box(lesion.box, int(content.image.Columns), int(content.image.Rows)) is not None
    )
    common: dict[str, Any] = {
        "instance_number": 1,
        "manufacturer": algorithm.manufacturer,
        "manufacturer_model_name": algorithm.name,
        "software_versions": algorithm.version,
        "is_complete": True,
        "is_final": False,
        "is_verified": False,
        "institution_name": evidence[0].get("InstitutionName") or None,
        "institutional_department_name": evidence[0].get("InstitutionalDepartmentName") or None,
        "specific_character_set": SR_SPECIFIC_CHARACTER_SET,
        "content_date": content_datetime.date(),
        "content_time": content_datetime.time(),
        "series_date": content_datetime.date(),
        "series_time": content_datetime.time(),
        "contributing_equipment": [algorithm_equipment(algorithm, content_datetime)],
    }
    identity = (study_uid, algorithm.name, algorithm.version)
    try:
        comprehensive = _document(
            hd.sr.ComprehensiveSR,
            _measurement_report(content, algorithm, groups),
            evidence,
            COMPREHENSIVE_SR_VALUE_TYPES,
            series_instance_uid=derive_uid(*identity, "comprehensive-sr-series"),
            series_number=series_number,
            sop_instance_uid=derive_uid(*identity, "comprehensive-sr-instance"),
            series_description=series_description,
            coding_schemes=[private_coding_scheme()] if uses_private_codes else None,
            **common,
        )
        reports: list[Dataset] = [comprehensive]
        if text_sr:
            reports.append(
                _document(
                    BasicTextSR,
                    _text_report(content, algorithm),
                    evidence,
                    BASIC_TEXT_SR_VALUE_TYPES,
                    series_instance_uid=derive_uid(*identity, "text-sr-series"),
                    series_number=text_series_number,
                    sop_instance_uid=derive_uid(*identity, "text-sr-instance"),
                    series_description=text_series_description,
                    **common,
                )
            )
    except (AttributeError, TypeError, ValueError) as e:
        raise ReportBuildError(f"SR construction failed for study {study_uid}: {e}") from e
    logger.info(
        "built %d SR(s) for study %s: %d lesion group(s) of %d lesion(s)",
        len(reports),
        study_uid,
        len(groups),
        len(content.lesions),
    )
    return reports
