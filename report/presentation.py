"""The AI's boxes as a Softcopy Presentation State: what most clinical viewers draw.

:func:`build_presentation_state` is pure. For a grayscale source image it returns a Grayscale
Softcopy Presentation State (GSPS, PS3.3 A.33.1); for a colour Secondary Capture a Colour
Softcopy Presentation State (A.33.4, sRGB) with the same annotations. It references the source
image, repeats its patient and study (values its VR forbids left out,
:mod:`report.source_values`) and holds one graphic layer, ``D2R AI FINDINGS``:

* one closed 5-point POLYLINE per reported lesion box, in PIXEL units of the source image,
  the same coordinates as the TID 1500 SR's SCOORD (:func:`report.build.closed_polyline`);
* a text annotation anchored to each box's top-left corner: ``"Pleural effusion 47 %"``;
* a text annotation across the top of the display: ``"Unverified AI draft: <model> <version>"``.

An abstention (the model declined the study) gets a presentation state with a single text
annotation, ``"Not assessed by AI: <reason>"``, and no graphics.

The image is shown as delivered: the Modality LUT and the VOI (window or VOI LUT) are those of
the image (highdicom copies them), and the Presentation LUT Shape is IDENTITY, or INVERSE for
a MONOCHROME1 image, so that its low values stay white as in the image itself.
"""

from __future__ import annotations

import datetime
import pkgutil
from typing import Final

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from d2r_core.geometry import Box
from report.build import (
    SR_SPECIFIC_CHARACTER_SET,
    AlgorithmInfo,
    ReportContent,
    algorithm_equipment,
    clip_box,
    closed_polyline,
    derive_uid,
    finding_label,
)
from report.source_values import source_header

__all__ = [
    "DRAFT_NOTICE_PREFIX",
    "LAYER_NAME",
    "NOT_ASSESSED_PREFIX",
    "PRESENTATION_SERIES_NUMBER",
    "build_presentation_state",
    "lesion_boxes",
]

PRESENTATION_SERIES_NUMBER: Final = 992
#: Graphic Layer (CS, at most 16 characters) holding every annotation
LAYER_NAME: Final = "D2R AI FINDINGS"
_LAYER_DESCRIPTION: Final = "D2R AI findings: unverified draft"
_CONTENT_LABEL: Final = "D2R AI DRAFT"
#: the draft notice starts with this
DRAFT_NOTICE_PREFIX: Final = "Unverified AI draft: "
#: the single annotation of an abstention
NOT_ASSESSED_PREFIX: Final = "Not assessed by AI: "
_ST_MAX: Final = 1024  # Unformatted Text Value (ST)
_LO_MAX: Final = 64
#: DISPLAY-unit box of the notice: across the top of the viewport
_NOTICE_BOX: Final = (0.02, 0.01, 0.98, 0.06)
#: label height as a fraction of the image height, and a character's width per height
_LABEL_HEIGHT: Final = 0.035
_CHAR_WIDTH: Final = 0.6


def lesion_boxes(content: ReportContent) -> list[tuple[str, float, Box]]:
    """(class name, score, clipped box) of each lesion the TID 1500 SR draws, in its order
    (boxes without area inside the image are left out, as the SR leaves them out)."""
    columns, rows = int(content.image.Columns), int(content.image.Rows)
    boxes = []
    for lesion in content.lesions:
        box = clip_box(lesion.box, columns, rows)
        if box is not None:
            boxes.append((lesion.class_name, lesion.score, box))
    return boxes


def _label_box(box: Box, text: str, columns: int, rows: int) -> tuple[float, float, float, float]:
    """Where a box's label goes (PIXEL units): just above the box, or inside its top edge
    when the box touches the top of the image; always inside the image."""
    x_min, y_min, _, _ = box
    height = max(8.0, rows * _LABEL_HEIGHT)
    width = min(float(columns), len(text) * height * _CHAR_WIDTH)
    left = min(x_min, columns - width)
    top = y_min - height if y_min >= height else y_min
    bottom = min(top + height, float(rows))
    return (max(left, 0.0), max(top, 0.0), max(left, 0.0) + width, bottom)


def _text(value: str, **kwargs: object) -> hd.pr.TextObject:
    return hd.pr.TextObject(text_value=value[:_ST_MAX], **kwargs)  # type: ignore[arg-type]


def _annotation(
    content: ReportContent, algorithm: AlgorithmInfo, image: Dataset
) -> tuple[list[hd.pr.GraphicObject], list[hd.pr.TextObject]]:
    """The graphics and texts of the layer: boxes and labels, or the abstention's notice."""
    display = hd.pr.AnnotationUnitsValues.DISPLAY
    if content.abstain_reason is not None:
        notice = NOT_ASSESSED_PREFIX + (content.abstain_reason or "no reason given")
        return [], [_text(notice, units=display, bounding_box=_NOTICE_BOX)]
    pixel = hd.pr.AnnotationUnitsValues.PIXEL
    columns, rows = int(image.Columns), int(image.Rows)
    graphics, texts = [], []
    for class_name, score, box in lesion_boxes(content):
        graphics.append(
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=closed_polyline(box),
                units=pixel,
            )
        )
        label = finding_label(class_name, score)
        texts.append(
            _text(
                label,
                units=pixel,
                bounding_box=_label_box(box, label, columns, rows),
                anchor_point=(box[0], box[1]),
                anchor_point_visible=False,
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
        )
    notice = f"{DRAFT_NOTICE_PREFIX}{algorithm.name} {algorithm.version}"
    texts.append(_text(notice, units=display, bounding_box=_NOTICE_BOX))
    return graphics, texts


def _with_voi_lut_bytes(header: Dataset) -> Dataset:
    """``header`` with each VOI LUT's data as bytes (highdicom copies a VOI LUT from bytes only;
    a file may hold LUT Data as US values). The source's own items are left untouched."""
    items = header.get("VOILUTSequence")
    if not items or all(isinstance(item.get("LUTData"), bytes) for item in items):
        return header
    copies = []
    for item in items:
        copy = Dataset()
        for element in item:
            copy.add(element)
        data = item.get("LUTData")
        if data is not None and not isinstance(data, bytes):
            bits = int(item.LUTDescriptor[2])
            dtype = np.uint8 if bits <= 8 else np.uint16
            values = np.atleast_1d(np.asarray(data, dtype=dtype))
            copy.add_new("LUTData", "OW", values.astype("<u2").tobytes())
        copies.append(copy)
    header.VOILUTSequence = copies
    return header


def _srgb_profile() -> bytes:
    """The sRGB ICC profile highdicom ships: a colour image without a profile is sRGB."""
    profile = pkgutil.get_data("highdicom", "_icc_profiles/sRGB_v4_ICC_preference.icc")
    if profile is None:  # pragma: no cover - part of the highdicom package
        raise ValueError("highdicom's sRGB ICC profile is missing")
    return profile


def _is_colour(image: Dataset) -> bool:
    return int(image.get("SamplesPerPixel", 1) or 1) > 1


def build_presentation_state(
    content: ReportContent,
    algorithm: AlgorithmInfo,
    *,
    series_number: int = PRESENTATION_SERIES_NUMBER,
    series_description: str | None = None,
) -> Dataset:
    """The presentation state of ``content``'s image: a GSPS, or for a colour image a Colour
    Softcopy Presentation State; Series and SOP Instance UIDs derived from (StudyInstanceUID,
    algorithm name, version, ``"gsps"``), so a repeated job writes the same object."""
    image = _with_voi_lut_bytes(source_header(content.image))
    graphics, texts = _annotation(content, algorithm, image)
    layer = hd.pr.GraphicLayer(layer_name=LAYER_NAME, order=1, description=_LAYER_DESCRIPTION)
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[image],
        graphic_layer=layer,
        graphic_objects=graphics or None,
        text_objects=texts,
    )
    identity = (str(image.StudyInstanceUID), algorithm.name, algorithm.version, "gsps")
    kwargs: dict[str, object] = {
        "referenced_images": [image],
        "series_instance_uid": derive_uid(*identity, "series"),
        "series_number": series_number,
        "sop_instance_uid": derive_uid(*identity, "instance"),
        "instance_number": 1,
        "manufacturer": algorithm.manufacturer,
        "manufacturer_model_name": algorithm.name,
        "software_versions": algorithm.version,
        "device_serial_number": None,
        "content_label": _CONTENT_LABEL,
        "content_description": f"AI draft boxes: {algorithm.name} {algorithm.version}"[:_LO_MAX],
        "graphic_annotations": [annotation],
        "graphic_layers": [layer],
        "institution_name": image.get("InstitutionName") or None,
        "institutional_department_name": image.get("InstitutionalDepartmentName") or None,
        "specific_character_set": SR_SPECIFIC_CHARACTER_SET,
        "contributing_equipment": [algorithm_equipment(algorithm, datetime.datetime.now())],
        "series_description": (series_description or _series_description(algorithm))[:_LO_MAX],
    }
    state: Dataset
    if _is_colour(image):
        state = hd.pr.ColorSoftcopyPresentationState(
            icc_profile=image.get("ICCProfile") or _srgb_profile(),
            **kwargs,  # type: ignore[arg-type]
        )
    else:
        state = hd.pr.GrayscaleSoftcopyPresentationState(
            presentation_lut_transformation=_presentation_lut(image),
            **kwargs,  # type: ignore[arg-type]
        )
    state.BodyPartExamined = "CHEST"  # what d2r reads; leaves Laterality unconditioned
    return state


def _presentation_lut(image: Dataset) -> hd.PresentationLUTTransformation:
    """IDENTITY, or INVERSE for MONOCHROME1: the image keeps the look it was delivered with."""
    shape = (
        hd.PresentationLUTShapeValues.INVERSE
        if str(image.get("PhotometricInterpretation", "")) == "MONOCHROME1"
        else hd.PresentationLUTShapeValues.IDENTITY
    )
    return hd.PresentationLUTTransformation(presentation_lut_shape=shape)


def _series_description(algorithm: AlgorithmInfo) -> str:
    kind = "AI draft boxes"
    if algorithm.not_for_diagnostic_use:
        kind += ", not for diagnostic use"
    return f"{kind}: {algorithm.name} {algorithm.version}"
