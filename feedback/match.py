"""What becomes of a signed-report message: the study it belongs to, what is stored, and the
acknowledgement it gets.

Matching, first that applies: a Study Instance UID the message carries (an OBX
``110180^Study Instance UID^DCM`` or a ZDS segment) of a study in the database; else the first
accession number (OBR-3, OBR-2, ORC-3, ORC-2, OBR-18) of exactly one study. An accession
number of several studies matches none of them (``ambiguous``): a report is never stored
against a study it may not belong to.

Acknowledgements (original mode, HL7 v2.5.1 section 2.9.2, table 0008). A message is
recorded (``report_messages``) whatever its answer, except when the database is down:

=====================================  =====  ===========  ===================================
message                                MSA-1  outcome      stored
=====================================  =====  ===========  ===================================
final (F), matched                     AA     stored       version 1 of the study's report
corrected (C) or other final text      AA     corrected    the next version; supersedes
the same report again (MSH-10, text)   AA     repeat       nothing
another status (P, I, R, S, X, ...)    AA     not-final    the message only, with its text
F or C, no study matches               AA     unmatched    the message only, with its text
F or C, accession of several studies   AA     ambiguous    the message only, with its text
F or C without report text             AE     rejected     the message only
not ORU^R01, not HL7                   AR     rejected     the message only
larger than D2R_HL7_MAX_MESSAGE_BYTES  AR     (not read)   nothing; the connection closes
study database unreachable             AR     (none)       nothing: the sender sends again
=====================================  =====  ===========  ===================================

Preliminary and unmatched reports are answered AA, not AE: the message was received and
recorded, and a RIS sends every result of its feed, most of them of studies d2r never saw.
AE ("the receiver could not process this content") would fill the RIS's error queue with
messages nobody needs to act on; MSA-3 says what was done. AR is kept for what the sender can
change or should send again: a message type d2r does not take, or a node that cannot store
it now.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from feedback.oru import ACCEPT, ERROR, OruRejected, OruReport
from studydb.feedback import (
    CORRECTED,
    REPEAT,
    ReportMessage,
    SignedReport,
    StoredReport,
)

__all__ = [
    "AMBIGUOUS",
    "FINAL_STATUSES",
    "NOT_FINAL",
    "REJECTED",
    "UNMATCHED",
    "Answer",
    "ReportBook",
    "match_study",
    "receive",
    "record_rejection",
]

logger = logging.getLogger(__name__)

#: result statuses (OBR-25, HL7 table 0123) of a signed report: final and corrected
FINAL_STATUSES: Final = ("F", "C")
NOT_FINAL: Final = "not-final"
UNMATCHED: Final = "unmatched"
AMBIGUOUS: Final = "ambiguous"
REJECTED: Final = "rejected"


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


def match_study(book: ReportBook, report: OruReport) -> tuple[str | None, str]:
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


def receive(book: ReportBook, report: OruReport, *, now: float | None = None) -> Answer:
    """Match, store and record one ORU^R01 (module docstring); the answer to give."""
    received_at = time.time() if now is None else now
    status = report.result_status or "(none)"
    uid, how = match_study(book, report)
    if report.result_status not in FINAL_STATUSES:
        answer = Answer(
            ACCEPT, NOT_FINAL, f"recorded; result status {status} is not a signed report", uid
        )
    elif not report.text:
        answer = Answer(ERROR, REJECTED, "no report text (TX, FT or ST OBX)", uid)
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


def _store(book: ReportBook, report: OruReport, uid: str, received_at: float) -> Answer:
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


def record_rejection(book: ReportBook, rejected: OruRejected, *, now: float | None = None) -> None:
    """Record a message that was not a readable ORU^R01 (its answer ``rejected.code``)."""
    book.record_report_message(
        ReportMessage(
            received_at=time.time() if now is None else now,
            message_control_id=rejected.control_id,
            source="hl7",
            result_status="",
            accession_number=None,
            study_instance_uid=None,
            outcome=REJECTED,
            ack_code=rejected.code,
            note=rejected.reason,
        )
    )
