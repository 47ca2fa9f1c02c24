"""SR SOP classes that highdicom does not provide.

highdicom builds Enhanced, Comprehensive and Comprehensive 3D SR documents. The
companion text report is a Basic Text SR (PS3.3 A.35.1), built here on the same
highdicom base so that patient, study, series, flags and evidence are handled
identically for both documents.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from highdicom.sr.sop import _SR
from pydicom.dataset import Dataset
from pydicom.uid import BasicTextSRStorage

__all__ = ["BASIC_TEXT_SR_VALUE_TYPES", "BasicTextSR"]

#: Value types a Basic Text SR may contain (PS3.3 A.35.1.3.1).
BASIC_TEXT_SR_VALUE_TYPES = frozenset(
    {"TEXT", "CODE", "DATETIME", "DATE", "TIME", "UIDREF", "PNAME", "COMPOSITE", "IMAGE"}
    | {"WAVEFORM", "CONTAINER"}
)


def _value_types(items: Iterable[Dataset]) -> Iterable[str]:
    for item in items:
        yield str(item.ValueType)
        yield from _value_types(item.get("ContentSequence", []))


class BasicTextSR(_SR):
    """Basic Text SR document (SOP Class UID 1.2.840.10008.5.1.4.1.1.88.11).

    Parameters
    ----------
    evidence : Sequence[pydicom.dataset.Dataset]
        Instances the report is about; the first one provides patient and study.
    content : pydicom.dataset.Dataset
        Root CONTAINER content item.
    **kwargs : Any
        Forwarded to :class:`highdicom.sr.sop._SR` (series and instance UIDs, flags, ...).

    Raises
    ------
    ValueError
        If `content` holds a value type Basic Text SR does not allow (NUM, SCOORD, ...).
    """

    def __init__(self, evidence: list[Dataset], content: Dataset, **kwargs: Any) -> None:
        disallowed = sorted(set(_value_types([content])) - BASIC_TEXT_SR_VALUE_TYPES)
        if disallowed:
            raise ValueError(
                f"content holds value types not allowed in Basic Text SR: {disallowed}"
            )
        super().__init__(
            evidence=evidence, content=content, sop_class_uid=BasicTextSRStorage, **kwargs
        )
