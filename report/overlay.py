"""The AI's boxes burned into a copy of the image: a Secondary Capture for any viewer at all.

:func:`build_overlay` is pure. The viewer that draws neither the TID 1500 SR nor a presentation
state still shows an image; this one is the source image windowed for display (8-bit
MONOCHROME2: Modality LUT, the image's own window or VOI LUT, else the 0.5-99.5 percentiles,
MONOCHROME1 inverted, colour averaged to grey) with, burned in:

* a banner across the top: ``"AI DRAFT - not for diagnosis - model <name> version <version>"``;
* every reported lesion box (the boxes of the TID 1500 SR, :func:`report.presentation.lesion_boxes`)
  as a white rectangle on a black edge, whose white line covers the pixels the box's edges pass
  through (pixel ``i`` spans ``[i, i + 1)``);
* each box's label ``"Pleural effusion 47 %"`` above it.

It is a Secondary Capture Image (PS3.3 A.8.1) in its own series of the study, with the same
Rows and Columns as the source (so the boxes sit at the SR's coordinates), ImageType
DERIVED\\SECONDARY, BurnedInAnnotation YES, a Source Image Sequence naming the source and a
Derivation Description. Series and SOP Instance UIDs are derived from (StudyInstanceUID,
algorithm name, version, ``"sc"``). An abstention gets no overlay.
"""

from __future__ import annotations

import datetime
import math
from typing import Final

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian

from d2r_core.geometry import Box
from report.build import (
    AlgorithmInfo,
    ReportContent,
    algorithm_equipment,
    derive_uid,
    finding_label,
)
from report.presentation import lesion_boxes
from report.source_values import source_header

__all__ = [
    "OVERLAY_SERIES_NUMBER",
    "banner_text",
    "box_edge_pixels",
    "build_overlay",
    "display_pixels",
]

OVERLAY_SERIES_NUMBER: Final = 993
_LO_MAX: Final = 64
_ST_MAX: Final = 1024
_WHITE: Final = 255
_BLACK: Final = 0


def banner_text(algorithm: AlgorithmInfo) -> str:
    """The banner burned into every overlay (ASCII, so any font has every character).

    >>> banner_text(AlgorithmInfo("d2r-net", "1.2"))
    'AI DRAFT - not for diagnosis - model d2r-net version 1.2'
    """
    return f"AI DRAFT - not for diagnosis - model {algorithm.name} version {algorithm.version}"


def display_pixels(image: Dataset) -> npt.NDArray[np.uint8]:
    """The first frame of ``image`` as displayed: 8-bit grey, 0 black."""
    pixels = np.asarray(image.pixel_array)
    colour = int(image.get("SamplesPerPixel", 1) or 1) > 1
    if pixels.ndim == (4 if colour else 3):
        pixels = pixels[0]
    if colour:
        return np.asarray(pixels.mean(axis=-1), dtype=np.float64).round().astype(np.uint8)
    modality = apply_modality_lut(pixels, image)
    values = np.asarray(modality, dtype=np.float64)
    center, width = _first(image.get("WindowCenter")), _first(image.get("WindowWidth"))
    if "VOILUTSequence" in image:
        values = np.asarray(apply_voi_lut(modality, image, prefer_lut=True), dtype=np.float64)
        low, high = 0.0, float(2 ** int(image.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    elif center is not None and width is not None and width > 1:
        low, high = center - width / 2.0, center + width / 2.0
    else:
        low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0) * 255.0
    if str(image.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 255.0 - scaled
    return scaled.round().astype(np.uint8)


def _first(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, MultiValue):
        return float(value[0]) if len(value) else None
    return float(value)  # type: ignore[arg-type]


def box_edge_pixels(box: Box, columns: int, rows: int) -> tuple[int, int, int, int]:
    """The pixels the edges of ``box`` pass through: first and last column, first and last row.

    >>> box_edge_pixels((10.0, 20.5, 30.0, 40.2), 100, 100)
    (10, 20, 29, 40)
    """
    x_min, y_min, x_max, y_max = box
    left = min(max(math.floor(x_min), 0), columns - 1)
    top = min(max(math.floor(y_min), 0), rows - 1)
    right = min(max(math.ceil(x_max) - 1, left), columns - 1)
    bottom = min(max(math.ceil(y_max) - 1, top), rows - 1)
    return left, top, right, bottom


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(8, size))


def _draw(
    pixels: npt.NDArray[np.uint8], content: ReportContent, algorithm: AlgorithmInfo
) -> npt.NDArray[np.uint8]:
    """Banner, labels, then boxes (last, so nothing covers a box edge)."""
    rows, columns = pixels.shape
    canvas = Image.fromarray(pixels, mode="L")
    draw = ImageDraw.Draw(canvas)
    size = max(8, rows // 40)
    font = _font(size)
    banner_height = size + size // 2
    draw.rectangle((0, 0, columns - 1, banner_height), fill=_BLACK)
    draw.text((size // 4, size // 4), banner_text(algorithm), fill=_WHITE, font=font)
    line = max(1, min(rows, columns) // 300)
    boxes = lesion_boxes(content)
    for class_name, score, box in boxes:
        left, top, _, _ = box_edge_pixels(box, columns, rows)
        label_top = top - size - 2 * line if top >= size + 2 * line else top + line + 1
        text = finding_label(class_name, score)
        bounds = draw.textbbox((left, label_top), text, font=font)
        draw.rectangle(bounds, fill=_BLACK)
        draw.text((left, label_top), text, fill=_WHITE, font=font)
    edges = [box_edge_pixels(box, columns, rows) for _, _, box in boxes]
    for left, top, right, bottom in edges:  # a black edge around the white line shows it on
        draw.rectangle(  # any background; every white line goes over every black edge
            (left - line, top - line, right + line, bottom + line), outline=_BLACK
        )
    for edge in edges:
        draw.rectangle(edge, outline=_WHITE, width=line)
    return np.asarray(canvas, dtype=np.uint8)


def build_overlay(
    content: ReportContent,
    algorithm: AlgorithmInfo,
    *,
    series_number: int = OVERLAY_SERIES_NUMBER,
) -> Dataset | None:
    """The Secondary Capture with ``content``'s boxes burned in; None for an abstention.

    ``content.image`` must hold its pixel data.
    """
    if content.abstain_reason is not None:
        return None
    header = source_header(content.image)
    pixels = _draw(display_pixels(content.image), content, algorithm)
    identity = (str(header.StudyInstanceUID), algorithm.name, algorithm.version, "sc")
    orientation = header.get("PatientOrientation")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.MONOCHROME2,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=derive_uid(*identity, "series"),
        series_number=series_number,
        sop_instance_uid=derive_uid(*identity, "instance"),
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        patient_orientation=("L", "F"),  # replaced below by the source's (or empty)
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=_series_description(algorithm),
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        specific_character_set="ISO_IR 192",
        contributing_equipment=[algorithm_equipment(algorithm, datetime.datetime.now())],
    )
    valid = orientation is not None and len(orientation) == 2 and all(orientation)
    sc.PatientOrientation = list(orientation) if valid else []
    sc.Modality = "OT"
    sc.BodyPartExamined = "CHEST"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.LossyImageCompression = "00"
    sc.DerivationDescription = (
        f"Windowed for display from the source image; AI draft boxes and labels burned in by "
        f"{algorithm.name} {algorithm.version}"
    )[:_ST_MAX]
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [source]
    return sc


def _series_description(algorithm: AlgorithmInfo) -> str:
    kind = "AI draft overlay"
    if algorithm.not_for_diagnostic_use:
        kind += ", not for diagnostic use"
    return f"{kind}: {algorithm.name} {algorithm.version}"[:_LO_MAX]
