"""Every object d2r writes for one study, as the site chose them (``D2R_OUTPUTS``).

:func:`build_outputs` is pure: the TID 1500 SR, the Basic Text SR, the presentation state and
the overlay image (:class:`Output`), each with UIDs derived from (StudyInstanceUID, algorithm
name, algorithm version, output), so a repeated job writes, and sends, the same objects. The
SRs come first, TID 1500 first: HL7 and FHIR messages reference the first SR.

For an abstention (``content.abstain_reason`` set) the SRs say that the model declined the
study and why, the presentation state holds the single text "Not assessed by AI: <reason>", and
no overlay image is made.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from pydicom.dataset import Dataset

from d2r_core.outputs import DEFAULT_OUTPUT_NAMES, parse_output_names
from report.build import AlgorithmInfo, ReportContent, build_reports
from report.errors import ReportBuildError
from report.overlay import build_overlay
from report.presentation import build_presentation_state
from report.source_values import dropped_in

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_OUTPUTS", "BuiltOutputs", "Output", "build_outputs", "parse_outputs"]


class Output(StrEnum):
    """One kind of object d2r writes for a study."""

    #: TID 1500 Imaging Measurement Report (Comprehensive SR): boxes, scores, text
    TID1500 = "tid1500"
    #: Basic Text SR (TID 2000): findings and impression only
    TEXT = "text"
    #: Grayscale (or, for a colour image, Colour) Softcopy Presentation State: boxes and labels
    GSPS = "gsps"
    #: Secondary Capture with the boxes, labels and a draft banner burned in
    SC = "sc"


DEFAULT_OUTPUTS: Final = tuple(Output(name) for name in DEFAULT_OUTPUT_NAMES)


def parse_outputs(text: str) -> tuple[Output, ...]:
    """A comma-separated list of outputs, in :class:`Output` order, each once
    (:func:`d2r_core.outputs.parse_output_names`).

    >>> parse_outputs(" gsps, TID1500 ")
    (<Output.TID1500: 'tid1500'>, <Output.GSPS: 'gsps'>)
    """
    return tuple(Output(name) for name in parse_output_names(text))


@dataclass(frozen=True)
class BuiltOutputs:
    """The objects of one study (SRs first, TID 1500 first) and the keywords of the source
    values left out of them because their VR forbids them (:mod:`report.source_values`)."""

    datasets: list[Dataset]
    dropped: tuple[str, ...]


def build_outputs(
    content: ReportContent,
    algorithm: AlgorithmInfo,
    outputs: Collection[Output] = DEFAULT_OUTPUTS,
    **sr_options: Any,
) -> BuiltOutputs:
    """Build the chosen ``outputs`` of ``content``; ``sr_options`` go to
    :func:`report.build.build_reports` (tracking identifier, ROI encoding, series)."""
    chosen = {Output(o) for o in outputs}
    datasets: list[Dataset] = []
    if Output.TID1500 in chosen or Output.TEXT in chosen:
        reports = build_reports(content, algorithm, text_sr=Output.TEXT in chosen, **sr_options)
        datasets += reports if Output.TID1500 in chosen else reports[1:]
    study_uid = str(content.image.StudyInstanceUID)
    try:
        if Output.GSPS in chosen:
            datasets.append(build_presentation_state(content, algorithm))
        if Output.SC in chosen and "PixelData" not in content.image:
            logger.warning("study %s: no overlay image, the source has no pixel data", study_uid)
        elif Output.SC in chosen and (overlay := build_overlay(content, algorithm)) is not None:
            datasets.append(overlay)
    except (AttributeError, TypeError, ValueError) as e:
        raise ReportBuildError(f"image output failed for study {study_uid}: {e}") from e
    return BuiltOutputs(datasets, dropped_in(content.evidence))
