"""Exceptions raised while building Structured Reports.

::

    ReportError                 base class; never raised itself
    ├── SourceImageError        the source image header cannot be referenced by an SR
    │                           (missing UIDs or matrix size, not an image, another study);
    │                           also a ValueError, since it is a rejected input
    └── ReportBuildError        highdicom or pydicom rejected the document we assembled
                                (a defect in this package, not in the input)

Argument validation in the dataclass constructors raises plain ``TypeError`` or
``ValueError`` naming the argument, like any Python constructor.
"""

from __future__ import annotations

from d2r_core.errors import D2RError

__all__ = ["ReportBuildError", "ReportError", "SourceImageError"]


class ReportError(D2RError):
    """Base class of every error raised by :mod:`report`."""


class SourceImageError(ReportError, ValueError):
    """The source image cannot be referenced by a Structured Report."""


class ReportBuildError(ReportError):
    """The assembled document was rejected by highdicom or pydicom."""
