"""Named DIMSE status codes used by the node (DICOM PS3.7 Annex C, PS3.4 Annex B.2.3).

Logic compares against these names, never against bare numbers.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CANNOT_UNDERSTAND",
    "DATASET_DOES_NOT_MATCH_SOP_CLASS",
    "DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING",
    "COERCION_OF_DATA_ELEMENTS",
    "ELEMENTS_DISCARDED",
    "NOT_AUTHORIZED",
    "OUT_OF_RESOURCES",
    "PROCESSING_FAILURE",
    "SOP_CLASS_NOT_SUPPORTED",
    "SUCCESS",
    "UNRECOGNIZED_OPERATION",
    "is_failure",
    "is_success",
    "is_warning",
    "status_name",
]

# Success
SUCCESS: Final = 0x0000

# Storage-specific warnings (PS3.4 B.2.3)
COERCION_OF_DATA_ELEMENTS: Final = 0xB000
DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING: Final = 0xB007
ELEMENTS_DISCARDED: Final = 0xB006

# Storage-specific failures (PS3.4 B.2.3); each names the first code of its range
OUT_OF_RESOURCES: Final = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
CANNOT_UNDERSTAND: Final = 0xC000

# General failures (PS3.7 C.4)
PROCESSING_FAILURE: Final = 0x0110
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
NOT_AUTHORIZED: Final = 0x0124
UNRECOGNIZED_OPERATION: Final = 0x0211

_NAMES: Final = {
    SUCCESS: "Success",
    COERCION_OF_DATA_ELEMENTS: "Warning: Coercion of Data Elements",
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING: "Warning: Data Set does not match SOP Class",
    ELEMENTS_DISCARDED: "Warning: Elements Discarded",
    OUT_OF_RESOURCES: "Refused: Out of Resources",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "Error: Data Set does not match SOP Class",
    CANNOT_UNDERSTAND: "Error: Cannot understand",
    PROCESSING_FAILURE: "Processing failure",
    SOP_CLASS_NOT_SUPPORTED: "SOP Class not supported",
    NOT_AUTHORIZED: "Not authorized",
    UNRECOGNIZED_OPERATION: "Unrecognized operation",
}


def is_success(status: int) -> bool:
    """Return True for the Success status."""
    return status == SUCCESS


def is_warning(status: int) -> bool:
    """Return True for a Warning status (0x0001, 0x0107, 0x0116 or the 0xBxxx range)."""
    return status in (0x0001, 0x0107, 0x0116) or (status & 0xF000) == 0xB000


def is_failure(status: int) -> bool:
    """Return True for any status that is neither Success, Warning nor Pending."""
    pending = status in (0xFF00, 0xFF01)
    return not (is_success(status) or is_warning(status) or pending)


def status_name(status: int) -> str:
    """Return a readable name for ``status``, e.g. ``'0xA700 Refused: Out of Resources'``."""
    name = _NAMES.get(status)
    if name is None:
        for base in (OUT_OF_RESOURCES, DATASET_DOES_NOT_MATCH_SOP_CLASS, CANNOT_UNDERSTAND):
            if status & 0xFF00 == base & 0xFF00 or (
                base == CANNOT_UNDERSTAND and status & 0xF000 == 0xC000
            ):
                name = _NAMES[base]
                break
    return f"0x{status:04X} {name or 'Unknown status'}"
