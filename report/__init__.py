"""Structured Report construction for chest radiograph results (pure: values in, datasets out).

See :func:`report.build.build_reports`, :func:`report.outputs.build_outputs` (the SRs, the
presentation state and the overlay image) and :mod:`report.codes`.
"""

import logging

from report.build import AlgorithmInfo, LesionFinding, ReportContent, build_reports
from report.errors import ReportBuildError, ReportError, SourceImageError
from report.outputs import BuiltOutputs, Output, build_outputs

__all__ = [
    "AlgorithmInfo",
    "BuiltOutputs",
    "LesionFinding",
    "Output",
    "ReportBuildError",
    "ReportContent",
    "ReportError",
    "SourceImageError",
    "build_outputs",
    "build_reports",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
