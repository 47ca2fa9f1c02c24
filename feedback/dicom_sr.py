"""A signed report as a DICOM Structured Report the PACS sends: read, and handed to
:func:`feedback.match.receive`.

:func:`read_sr_report` is pure: a data set in, an :class:`SrReport` out, or None for what is no
signed report at all (another SOP class, an SR without the document flags, or an SR d2r made:
:func:`is_own_report`). It takes:

* the result status from the document's flags (PS3.3 C.17.2): ``F`` when CompletionFlag is
  ``COMPLETE`` and VerificationFlag ``VERIFIED``, ``C`` when such a document also names the
  documents it replaces (PredecessorDocumentsSequence); ``P`` when unverified (or its
  PreliminaryFlag says ``PRELIMINARY``), ``I`` when ``PARTIAL``: recorded, not stored;
* the text: the content tree walked from the root container, in document order, at most
  :data:`MAX_DEPTH` levels and :data:`MAX_ITEMS` items: each TEXT item's value, and each CODE
  item the document CONTAINS as ``<concept name>: <code meaning>`` (a coded finding); context
  (HAS CONCEPT MOD, HAS OBS CONTEXT, HAS ACQ CONTEXT subtrees: language, observer, procedure)
  is left out; at most :data:`MAX_TEXT_CHARS` characters;
* the study: its StudyInstanceUID, else its AccessionNumber;
* the message control ID: its SOP Instance UID; the source ``dicom:<calling AE title>``.

:class:`SrIntake` is what the node's ingest service (:class:`dicom_node.ingest.ReportIntake`)
calls for each Basic Text, Enhanced or Comprehensive SR: it reads the report and, once the
ingest service made the SR durable, records it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from pydicom.dataset import Dataset

from feedback.match import ReportBook, printable, receive
from studydb.engine import Database

__all__ = [
    "BASIC_TEXT_SR",
    "COMPREHENSIVE_SR",
    "ENHANCED_SR",
    "MAX_TEXT_CHARS",
    "OWN_MANUFACTURER",
    "REPORT_SOP_CLASSES",
    "SrIntake",
    "SrReport",
    "is_own_report",
    "read_sr_report",
]

logger = logging.getLogger(__name__)

BASIC_TEXT_SR: Final = "1.2.840.10008.5.1.4.1.1.88.11"
ENHANCED_SR: Final = "1.2.840.10008.5.1.4.1.1.88.22"
COMPREHENSIVE_SR: Final = "1.2.840.10008.5.1.4.1.1.88.33"
#: the SR storage classes a signed report may come as
REPORT_SOP_CLASSES: Final = frozenset({BASIC_TEXT_SR, ENHANCED_SR, COMPREHENSIVE_SR})
#: the Manufacturer (0008,0070) of every SR d2r writes (:class:`report.build.AlgorithmInfo`)
OWN_MANUFACTURER: Final = "d2r"
#: deepest content tree level read (the root container's items are level 1)
MAX_DEPTH: Final = 32
#: most content items read
MAX_ITEMS: Final = 10_000
#: the longest report text kept, in characters
MAX_TEXT_CHARS: Final = 100_000
#: relationships whose subtree is context of the report, not its content
_CONTEXT: Final = frozenset({"HAS CONCEPT MOD", "HAS OBS CONTEXT", "HAS ACQ CONTEXT"})
_ID_LENGTH: Final = 64
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
NO_TEXT: Final = "no report text (TEXT content items)"


@dataclass(frozen=True)
class SrReport:
    """What d2r takes from one SR document (module docstring)."""

    #: the SOP Instance UID
    control_id: str
    #: ``dicom:`` + the calling AE title, printable
    source: str
    #: ``F``, ``C``, ``P`` or ``I``
    result_status: str
    accession_numbers: tuple[str, ...]
    study_uids: tuple[str, ...]
    #: the report text (empty when the document has none)
    text: str
    #: CompletionFlag/VerificationFlag, e.g. ``COMPLETE/VERIFIED`` (``-``: absent; ``other``:
    #: not a defined term)
    flags: str = ""


def _value(ds: Dataset, keyword: str) -> str:
    value: Any = ds.get(keyword)
    return "" if value is None else printable(str(value).strip(), _ID_LENGTH)


def is_own_report(ds: Dataset) -> bool:
    """Whether d2r made this SR (its Manufacturer is :data:`OWN_MANUFACTURER`): a draft that
    comes back with the study, never a signed report."""
    return _value(ds, "Manufacturer") == OWN_MANUFACTURER


def read_sr_report(ds: Dataset, calling_ae_title: str) -> SrReport | None:
    """The signed report ``ds`` carries (module docstring), or None when it is not an SR
    document of :data:`REPORT_SOP_CLASSES` (one without the CompletionFlag and VerificationFlag
    of the SR Document General module, both type 1, included) or d2r made it.

    Raises
    ------
    ValueError
        When an element the report needs cannot be read (a malformed value).
    """
    try:
        sop_class = _value(ds, "SOPClassUID")
        if sop_class not in REPORT_SOP_CLASSES or is_own_report(ds):
            return None
        completion = _flag(ds, "CompletionFlag", ("COMPLETE", "PARTIAL"))
        verification = _flag(ds, "VerificationFlag", ("VERIFIED", "UNVERIFIED"))
        if "-" in (completion, verification):  # without them it is no SR document
            return None
        study_uid = _value(ds, "StudyInstanceUID")
        accession = _value(ds, "AccessionNumber")
        return SrReport(
            control_id=_value(ds, "SOPInstanceUID"),
            source=printable(f"dicom:{calling_ae_title}", 255),
            result_status=_status(ds, completion, verification),
            accession_numbers=(accession,) if accession else (),
            study_uids=(study_uid,) if _UID.fullmatch(study_uid) else (),
            text=_text(ds),
            flags=f"{completion}/{verification}",
        )
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"unreadable SR ({type(exc).__name__})") from exc


def _flag(ds: Dataset, keyword: str, defined: tuple[str, ...]) -> str:
    """The flag's defined term, ``-`` when absent, ``other`` for anything else (the value a
    sender wrote never reaches a log)."""
    value = _value(ds, keyword).upper()
    return value if value in defined else "other" if value else "-"


def _status(ds: Dataset, completion: str, verification: str) -> str:
    if completion != "COMPLETE":
        return "I"
    if verification != "VERIFIED" or _value(ds, "PreliminaryFlag").upper() == "PRELIMINARY":
        return "P"
    return "C" if ds.get("PredecessorDocumentsSequence") else "F"


def _items(
    items: Iterable[Dataset], depth: int, budget: list[int]
) -> Iterator[tuple[Dataset, int]]:
    """The content items under ``items``, depth first, within :data:`MAX_DEPTH` and the
    item ``budget``; context subtrees left out."""
    for item in items:
        if budget[0] <= 0:
            return
        budget[0] -= 1
        if str(item.get("RelationshipType", "")).upper() in _CONTEXT:
            continue
        yield item, depth
        children = item.get("ContentSequence")
        if children and depth < MAX_DEPTH:
            yield from _items(children, depth + 1, budget)


def _meaning(item: Dataset, keyword: str) -> str:
    codes = item.get(keyword)
    if not codes:
        return ""
    return str(codes[0].get("CodeMeaning", "")).strip()


def _text(ds: Dataset) -> str:
    lines: list[str] = []
    size = 0
    for item, _depth in _items(ds.get("ContentSequence") or (), 1, [MAX_ITEMS]):
        kind = str(item.get("ValueType", "")).upper()
        if kind == "TEXT":
            line = str(item.get("TextValue", "")).strip()
        elif kind == "CODE" and str(item.get("RelationshipType", "")).upper() == "CONTAINS":
            name = _meaning(item, "ConceptNameCodeSequence")
            value = _meaning(item, "ConceptCodeSequence")
            line = f"{name}: {value}" if name and value else value
        else:
            continue
        if line:
            lines.append(line)
            size += len(line) + 1
            if size > MAX_TEXT_CHARS:
                break
    text = "\n".join(lines).replace("\r\n", "\n").replace("\r", "\n")
    return text[:MAX_TEXT_CHARS].strip()


class SrIntake:
    """The node's path for SRs another system made (:class:`dicom_node.ingest.ReportIntake`).

    Parameters
    ----------
    book : ReportBook
        The study database (:class:`studydb.feedback.SignedReports`).
    max_bytes : int
        The largest SR data set the ingest service reads whole for it
        (``D2R_SIGNED_SR_MAX_BYTES``).
    wait_seconds : float
        How long recording waits for an unreachable database before
        :class:`~studydb.errors.DatabaseUnavailable` (the instance is then refused with a
        failure status, and sent again).
    """

    sop_classes: Final = REPORT_SOP_CLASSES

    def __init__(self, book: ReportBook, *, max_bytes: int, wait_seconds: float) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.book = book
        self.max_bytes = max_bytes
        self.wait_seconds = wait_seconds

    def accept(self, dataset: Dataset, calling_ae_title: str) -> Callable[[], str] | None:
        """The call that records ``dataset``'s signed report once it is durable, or None when
        it carries none (d2r's own SR; an SR that cannot be read): the node then stores it as
        any other instance."""
        try:
            report = read_sr_report(dataset, calling_ae_title)
        except ValueError as exc:
            logger.warning("SR not read as a signed report: %s", exc)
            return None
        if report is None:
            return None
        return lambda: self._record(report)

    def _record(self, report: SrReport) -> str:
        """Match, store and record the report (:func:`feedback.match.receive`); its outcome."""
        with Database.retry_budget(self.wait_seconds):
            answer = receive(self.book, report, no_text=NO_TEXT)
        logger.info(
            "signed-report SR %s (%s, status %s): %s; study %s",
            printable(report.control_id, _ID_LENGTH),
            report.flags,
            report.result_status,
            answer.outcome,
            answer.study_instance_uid or "-",
        )
        return answer.outcome
