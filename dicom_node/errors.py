"""Exceptions raised by the DICOM node.

Every exception the node raises on purpose derives from :class:`NodeError`; the
receive side translates them into DIMSE statuses, outbound failures live in
:mod:`delivery.errors`::

    NodeError
    ├── ConfigError              (dicom_node.settings) an invalid setting
    ├── SpoolError               the spool could not persist an instance
    │   ├── SpoolFullError       out of disk space / quota  -> 0xA700
    │   └── SpoolWriteError      any other write failure    -> 0x0110
    ├── InstanceRejected         the header cannot be used  -> 0xC000 range
    │   ├── MissingUIDError      no Study / SOP Instance / SOP Class UID
    │   └── PixelDataTooLarge    a stored image over D2R_MAX_PIXEL_BYTES (read, not received)
    ├── DatabaseUnavailable      the study database did not answer within the retry budget
    └── SchemaError              the study database's schema does not fit this release
        ├── SchemaBehindError    an older revision: ``d2r db upgrade`` (or D2R_DB_AUTO_UPGRADE)
        ├── SchemaAheadError     a newer revision than this release knows (a rollback)
        └── UnknownSchemaError   tables without a revision that are not the baseline schema
"""

from __future__ import annotations

from d2r_core.errors import D2RError

__all__ = [
    "DatabaseUnavailable",
    "InstanceRejected",
    "MissingUIDError",
    "NodeError",
    "PixelDataTooLarge",
    "SchemaAheadError",
    "SchemaBehindError",
    "SchemaError",
    "SpoolError",
    "SpoolFullError",
    "SpoolWriteError",
    "UnknownSchemaError",
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


class DatabaseUnavailable(NodeError):
    """The study database could not be reached (restart, failover, network) in time.

    Raised once the caller's retry budget is spent; nothing was written. A receiver answers it
    with a failure status, a worker puts its job back on the queue.
    """


class SchemaError(NodeError):
    """The study database cannot be used by this release as it is; ``str()`` is one line."""


class SchemaBehindError(SchemaError):
    """The database is at an older revision than this release needs."""


class SchemaAheadError(SchemaError):
    """The database is at a revision this release does not know (written by a newer release)."""


class UnknownSchemaError(SchemaError):
    """The database holds tables, but no revision and not the baseline schema."""
