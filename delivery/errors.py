"""Exceptions raised by the senders.

Every failure a destination reports on purpose derives from :class:`SendError`; the worker turns
it into a retry with backoff (transient) or a failed delivery (permanent)::

    DeliveryError
    └── SendError                a destination did not take the results
        ├── TransientSendError   refused or lost connection, timeout, "try later" answers
        └── PermanentSendError   the destination refuses what we send; retrying cannot help

Invalid destination settings raise :class:`dicom_node.settings.ConfigError`, like every setting.
"""

from __future__ import annotations

from d2r_core.errors import D2RError

__all__ = ["DeliveryError", "PermanentSendError", "SendError", "TransientSendError"]


class DeliveryError(D2RError):
    """Base class of every error raised on purpose by :mod:`delivery`."""


class SendError(DeliveryError):
    """A destination did not take the results."""


class TransientSendError(SendError):
    """The send may succeed later: no connection, timeout, a peer that asks to try again."""


class PermanentSendError(SendError):
    """Retrying will not help: the destination refused what we send.

    Parameters
    ----------
    message : str
        What failed.
    status : int or None
        The peer's status (DIMSE status, HTTP status), when there was one.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
