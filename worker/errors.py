"""Exceptions of the worker, mapped by :mod:`worker.attempt` to give-up or retry::

    WorkerError
    ├── InputRejected    the study's images cannot be used (unreadable, undecodable): study failed
    └── PredictionError  the model could not be loaded or failed on the input: study failed

Send failures come from :mod:`delivery.errors` (``TransientSendError`` is retried with backoff,
``PermanentSendError`` fails the delivery at once).
"""

from __future__ import annotations

from d2r_core.errors import D2RError


class WorkerError(D2RError):
    """Base class of the worker's own errors."""


class InputRejected(WorkerError):
    """A study's images cannot be processed; the reason is recorded without PHI."""


class PredictionError(WorkerError):
    """The model could not be loaded or raised on the input."""
