"""Exceptions raised by the DICOM node.

Every exception the node raises on purpose derives from :class:`NodeError`; the
receive side translates them into DIMSE statuses, outbound failures live in
:mod:`delivery.errors`::

    NodeError
    ├── SpoolError               the spool could not persist an instance
    │   ├── SpoolFullError       out of disk space / quota  -> 0xA700
    │   └── SpoolWriteError      any other write failure    -> 0x0110
    └── InstanceRejected         the header cannot be used  -> 0xC000 range
        ├── MissingUIDError      no Study / SOP Instance / SOP Class UID
        └── PixelDataTooLarge    a stored image over D2R_MAX_PIXEL_BYTES (read, not received)
"""

from __future__ import annotations

from d2r_core.errors import D2RError

__all__ = [
    "InstanceRejected",
    "MissingUIDError",
    "NodeError",
    "PixelDataTooLarge",
    "SpoolError",
    "SpoolFullError",
    "SpoolWriteError",
]


class NodeError(D2RError):
    """Base class of every error raised on purpose by :mod:`dicom_node`."""


class SpoolError(NodeError):
    """The spool could not persist a received instance."""


class SpoolFullError(SpoolError):
    """The spool filesystem is (nearly) full or the quota is exhausted."""


class SpoolWriteError(SpoolError):
    """Writing, syncing or renaming a spool file failed for another reason."""


class InstanceRejected(NodeError):
    """A received data set cannot be used (unreadable header, missing UIDs).

    Parameters
    ----------
    reason : str
        Short, PHI-free reason recorded with the rejection.
    study_instance_uid : str or None
        The Study Instance UID, when it could be read.
    """

    def __init__(self, reason: str, *, study_instance_uid: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.study_instance_uid = study_instance_uid


class MissingUIDError(InstanceRejected):
    """The data set lacks a UID the node needs to file it (Study, SOP Instance or SOP Class)."""


class PixelDataTooLarge(InstanceRejected):
    """A stored image's pixel data exceeds the limit (``D2R_MAX_PIXEL_BYTES``).

    Raised before the pixels are read, inflated or decoded; the reason names the sizes only.
    """
