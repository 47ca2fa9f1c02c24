"""The stages of one report attempt, and the failure reason an unexpected error records.

A worker attempt passes through :class:`Stage` in order; :class:`StageTracker` remembers where
it is, so an exception outside the expected tree (:mod:`worker.errors`, PreprocessError) is
recorded as ``"<stage>: <ExceptionClass>: <message>"`` with patient identifiers removed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from enum import StrEnum
from typing import Final

from pydicom import Dataset

__all__ = ["Stage", "StageTracker", "failure_reason", "redact"]


class Stage(StrEnum):
    """Where an attempt is; the value is what the timeline and ``/metrics`` show."""

    SPOOL_READ = "spool-read"
    DECODE = "decode"
    PREPROCESS = "preprocess"
    PREDICT = "predict"
    SR_BUILD = "sr-build"
    WRITE_RESULTS = "write-results"
    #: recording the result in the study database
    DATABASE = "database"
    SEND = "send"


class StageTracker:
    """The current stage of one attempt (set by the worker, read when it fails), and the
    seconds spent in each stage so far (:meth:`seconds`)."""

    def __init__(self, stage: Stage = Stage.SPOOL_READ) -> None:
        self.current = stage
        self._since = time.perf_counter()
        self._seconds: dict[str, float] = {}

    def enter(self, stage: str) -> None:
        """Record that the attempt now runs ``stage``."""
        now = time.perf_counter()
        key = str(self.current)
        self._seconds[key] = self._seconds.get(key, 0.0) + now - self._since
        self._since = now
        self.current = Stage(stage)

    def seconds(self) -> dict[str, float]:
        """Seconds per stage, the current one counted up to now."""
        out = dict(self._seconds)
        key = str(self.current)
        out[key] = out.get(key, 0.0) + time.perf_counter() - self._since
        return out


#: header attributes whose values never appear in a recorded reason
PHI_KEYWORDS: Final = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "PatientAddress",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "InstitutionName",
    "StudyID",
)
_MAX_MESSAGE: Final = 300


def _phi_values(datasets: Iterable[Dataset]) -> list[str]:
    values: set[str] = set()
    for ds in datasets:
        for keyword in PHI_KEYWORDS:
            value = ds.get(keyword)
            if value is None:
                continue
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                text = str(item).strip()
                if len(text) >= 2:
                    values.add(text)
                    values.update(p for p in re.split(r"[\^=]", text) if len(p) >= 3)
    return sorted(values, key=len, reverse=True)


def redact(message: str, datasets: Iterable[Dataset] = ()) -> str:
    """Remove the patient identifiers of ``datasets`` from ``message``; at most 300 characters.

    >>> ds = Dataset(); ds.PatientName = "DOE^JANE"
    >>> redact("bad value DOE^JANE in header", [ds])
    'bad value [redacted] in header'
    """
    for value in _phi_values(datasets):
        message = message.replace(value, "[redacted]")
    message = " ".join(message.split())
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 3] + "..."


def failure_reason(stage: str, exc: BaseException, datasets: Iterable[Dataset] = ()) -> str:
    """``"<stage>: <ExceptionClass>: <message>"`` without patient identifiers.

    >>> failure_reason("predict", RuntimeError("out of memory"))
    'predict: RuntimeError: out of memory'
    """
    message = redact(str(exc), datasets)
    return f"{stage}: {type(exc).__name__}" + (f": {message}" if message else "")
