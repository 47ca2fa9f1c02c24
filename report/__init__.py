"""Structured Report construction for chest radiograph results (pure: values in, datasets out).

See :func:`report.build.build_reports` and :mod:`report.codes`.
"""

import logging

from report.build import AlgorithmInfo, LesionFinding, ReportContent, build_reports
from report.errors import ReportBuildError, ReportError, SourceImageError

__all__ = [
    "AlgorithmInfo",
    "LesionFinding",
    "ReportBuildError",
    "ReportContent",
    "ReportError",
    "SourceImageError",
    "build_reports",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
