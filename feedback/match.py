"""What becomes of a signed-report message: the study it belongs to, what is stored, and the
answer it gets. One path for every source: an HL7 v2 ORU^R01 (:mod:`feedback.oru`), a FHIR
DiagnosticReport (:mod:`feedback.fhir`) and a DICOM SR from the PACS (:mod:`feedback.dicom_sr`)
are each read into an :class:`IncomingReport` and handed to :func:`receive`.

Matching, first that applies: a Study Instance UID the message carries (HL7: an OBX
``110180^Study Instance UID^DCM`` or a ZDS segment; FHIR: an ``imagingStudy`` identifier
``urn:dicom:uid``; DICOM: the SR's own StudyInstanceUID) of a study in the database; else the
first accession number of exactly one study. An accession number of several studies matches
none of them (``ambiguous``): a report is never stored against a study it may not belong to.

Each source names the message (``message_control_id``) and itself (``source``):

======  ==========================================  =====================================
source  message_control_id                          source
======  ==========================================  =====================================
HL7     MSH-10                                      ``hl7:<MSH-3>^<MSH-4>``
FHIR    ``<id>/_history/<versionId>``, else ``<id>``  ``fhir:<the credential's name>``
        and a hash of the body, else the hash
DICOM   the SR's SOP Instance UID                   ``dicom:<calling AE title>``
======  ==========================================  =====================================

Answers. HL7 in original mode (HL7 v2.5.1 section 2.9.2, table 0008: MSA-1); FHIR as the HTTP
status of ``POST /fhir/DiagnosticReport`` with an OperationOutcome saying what was done; a
DICOM SR is acknowledged with success (C-STORE ``0x0000``, or a stored STOW-RS part) once it
is durable in the spool and its message recorded. A message is recorded (``report_messages``,
``ack_code`` the MSA-1 of the row, for every source) whatever its answer, except when it is not
read or the database is down:

=====================================  =====  =====  ===========  =================================
message                                MSA-1  HTTP   outcome      stored
=====================================  =====  =====  ===========  =================================
final (F), matched                     AA     201    stored       version 1 of the study's report
corrected (C) or other final text      AA     201    corrected    the next version; supersedes
the same report again (same message    AA     200    repeat       nothing
control ID, or the same text)
another status (P, I, R, S, X, ...)    AA     200    not-final    the message only, with its text
F or C, no study matches               AA     200    unmatched    the message only, with its text
F or C, accession of several studies   AA     200    ambiguous    the message only, with its text
F or C without report text             AE     422    rejected     the message only
a DiagnosticReport fhir.resources      AE     422    rejected     the message only
rejects (or with another status)
not ORU^R01 / not a DiagnosticReport   AR     400    rejected     the message only
larger than its limit, or (FHIR) not   AR     413,   (not read)   nothing
JSON media type                               415
study database unreachable             AR     503    (none)       nothing: the sender sends again
=====================================  =====  =====  ===========  =================================

FHIR status ``final`` is ``F``; ``corrected``, ``amended`` and ``appended`` are ``C``;
``preliminary`` ``P``, ``partial`` ``I``, ``registered`` ``O``, ``cancelled`` ``X``,
``entered-in-error`` ``W`` (not final). A DICOM SR is ``F`` when COMPLETE and VERIFIED (``C``
when it names a predecessor document), ``P`` when unverified or preliminary and ``I`` when
PARTIAL. An SR that d2r made is no signed report and never reaches this path.

Preliminary and unmatched reports are answered AA, not AE: the message was received and
recorded, and a RIS sends every result of its feed, most of them of studies d2r never saw.
AE ("the receiver could not process this content") would fill the RIS's error queue with
messages nobody needs to act on; MSA-3 says what was done. AR is kept for what the sender can
change or should send again: a message type d2r does not take, or a node that cannot store
it now.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from studydb.feedback import (
    CORRECTED,
    REPEAT,
    ReportMessage,
    SignedReport,
    StoredReport,
)

__all__ = [
    "ACCEPT",
    "AMBIGUOUS",
    "ERROR",
    "FINAL_STATUSES",
    "HL7_NO_TEXT",
    "NOT_FINAL",
    "REJECT",
    "REJECTED",
    "UNMATCHED",
    "Answer",
    "IncomingReport",
    "ReportBook",
    "Rejection",
    "match_study",
    "printable",
    "receive",
    "record_rejection",
]

logger = logging.getLogger(__name__)

#: the acknowledgement codes (MSA-1, HL7 table 0008, original mode), recorded with every
#: message whatever its source
ACCEPT: Final = "AA"
ERROR: Final = "AE"
REJECT: Final = "AR"
#: result statuses (OBR-25, HL7 table 0123) of a signed report: final and corrected
FINAL_STATUSES: Final = ("F", "C")
NOT_FINAL: Final = "not-final"
UNMATCHED: Final = "unmatched"
AMBIGUOUS: Final = "ambiguous"
REJECTED: Final = "rejected"
#: the answer's note for an HL7 report without text
HL7_NO_TEXT: Final = "no report text (TX, FT or ST OBX)"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(value: str, limit: int = 64) -> str:
    """``value`` as one line of printable text, cut to ``limit`` characters.

    >>> printable("RIS\\x1b[2J\\nA", 8)
    'RIS [2J '
    """
    return _CONTROL.sub(" ", value)[:limit]


class IncomingReport(Protocol):
    """A signed-report message as its source read it (:class:`feedback.oru.OruReport`,
    :class:`feedback.fhir.FhirReport`, :class:`feedback.dicom_sr.SrReport`)."""

    @property
    def control_id(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def result_status(self) -> str: ...

    @property
    def accession_numbers(self) -> tuple[str, ...]: ...

    @property
    def study_uids(self) -> tuple[str, ...]: ...

    @property
    def text(self) -> str: ...


class Rejection(Protocol):
    """A message that could not be read as a report: its MSA-1 ``code``, ``reason`` (our own
    words) and ``control_id`` (empty when unknown); :class:`feedback.oru.OruRejected`."""

    @property
    def code(self) -> str: ...

    @property
    def reason(self) -> str: ...

    @property
    def control_id(self) -> str: ...


class ReportBook(Protocol):
    """The study-database calls a signed report needs (:class:`studydb.feedback.SignedReports`)."""

    def known_studies(self, study_uids: Sequence[str]) -> list[str]: ...

    def studies_with_accession(self, accession_number: str) -> list[str]: ...

    def store_signed_report(self, report: SignedReport) -> StoredReport: ...

    def record_report_message(self, message: ReportMessage) -> None: ...


@dataclass(frozen=True)
class Answer:
    """The acknowledgement of one message: MSA-1 ``code`` and MSA-3 ``note``."""

    code: str
    outcome: str
    note: str
    study_instance_uid: str | None = None
    version: int | None = None


def match_study(book: ReportBook, report: IncomingReport) -> tuple[str | None, str]:
    """The study ``report`` belongs to, or None, and how (``uid``, ``accession``,
    ``unmatched`` or ``ambiguous``)."""
    known = book.known_studies(list(report.study_uids))
    if known:
        return known[0], "uid"
    for accession in report.accession_numbers:
        studies = book.studies_with_accession(accession)
        if len(studies) == 1:
            return studies[0], "accession"
        if len(studies) > 1:
            return None, AMBIGUOUS
    return None, UNMATCHED


def receive(
    book: ReportBook,
    report: IncomingReport,
    *,
    now: float | None = None,
    no_text: str = HL7_NO_TEXT,
) -> Answer:
    """Match, store and record one message (module docstring); the answer to give.

    ``no_text`` is the note of a final report without text, naming where the source looks.
    """
    received_at = time.time() if now is None else now
    status = report.result_status or "(none)"
    uid, how = match_study(book, report)
    if report.result_status not in FINAL_STATUSES:
        answer = Answer(
            ACCEPT, NOT_FINAL, f"recorded; result status {status} is not a signed report", uid
        )
    elif not report.text:
        answer = Answer(ERROR, REJECTED, no_text, uid)
    elif uid is None:
        why = "its accession number names several studies" if how == AMBIGUOUS else "none"
        answer = Answer(ACCEPT, how, f"recorded; no matching study ({why})")
    else:
        answer = _store(book, report, uid, received_at)
    book.record_report_message(
        ReportMessage(
            received_at=received_at,
            message_control_id=report.control_id,
            source=report.source,
            result_status=report.result_status[:8],
            accession_number=report.accession_numbers[0] if report.accession_numbers else None,
            study_instance_uid=answer.study_instance_uid,
            outcome=answer.outcome,
            ack_code=answer.code,
            note=answer.note,
            report_text=None if answer.version is not None else (report.text or None),
        )
    )
    return answer


def _store(book: ReportBook, report: IncomingReport, uid: str, received_at: float) -> Answer:
    stored = book.store_signed_report(
        SignedReport(
            study_instance_uid=uid,
            version=0,
            result_status=report.result_status,
            report_text=report.text,
            source=report.source,
            received_at=received_at,
            message_control_id=report.control_id,
        )
    )
    v = stored.version
    if stored.outcome == REPEAT:
        note = f"already stored as version {v}"
    elif stored.outcome == CORRECTED:
        note = f"stored as version {v}; supersedes version {v - 1}"
    else:
        note = f"stored as version {v}"
    return Answer(ACCEPT, stored.outcome, note, uid, v)


def record_rejection(
    book: ReportBook, rejected: Rejection, *, source: str = "hl7", now: float | None = None
) -> None:
    """Record a message that could not be read as a report (its answer ``rejected.code``)."""
    book.record_report_message(
        ReportMessage(
            received_at=time.time() if now is None else now,
            message_control_id=rejected.control_id,
            source=source,
            result_status="",
            accession_number=None,
            study_instance_uid=None,
            outcome=REJECTED,
            ack_code=rejected.code,
            note=rejected.reason,
        )
    )
