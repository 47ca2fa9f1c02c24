"""One ingest path for C-STORE and STOW-RS: check, spool, record.

:meth:`IngestService.accept` takes what the transport says of an instance (its
:class:`Envelope`: the C-STORE request's or the STOW-RS part's File Meta UIDs), the data set
received so far (a :class:`Payload`) and who sent it (a :class:`Source`), and answers
:class:`Accepted` or :class:`Rejected` with a DIMSE status and a reason. The C-STORE handler
(:mod:`dicom_node.scp`) answers the status; the STOW-RS receiver (:mod:`dicom_node.stow`) maps
it to the part's FailureReason (PS3.18 Table I.2-1). Checks, in order:

==============================================  =============================================
condition                                       status
==============================================  =============================================
the association ended before the handler ran    ``PROCESSING_FAILURE`` (the file is gone)
spool below the free-space guard, ENOSPC/EDQUOT  ``OUT_OF_RESOURCES`` (recorded)
other spool write error                         ``PROCESSING_FAILURE``
unreadable header, missing Study/SOP UIDs       ``CANNOT_UNDERSTAND`` (recorded)
data set SOP class differs from the envelope    ``DATASET_DOES_NOT_MATCH_SOP_CLASS`` (recorded)
data set SOP Instance UID differs               ``CANNOT_UNDERSTAND`` (recorded)
SOP class not a storage class                   ``SOP_CLASS_NOT_SUPPORTED`` (recorded)
another study than the request names (STOW-RS)  ``STUDY_MISMATCH`` (recorded)
study database unreachable in time              ``PROCESSING_FAILURE`` (the sender sends again)
anything else                                   ``PROCESSING_FAILURE``
==============================================  =============================================

Otherwise the instance is made durable in the spool, recorded in the study database, and only
then :class:`Accepted` (outcome ``stored``, ``duplicate`` or ``conflict``). Peer text reaches
the log only through :func:`~dicom_node.spool.printable` and
:func:`~dicom_node.spool.printable_uid`.

Signed reports. With a :class:`ReportIntake` (``d2r node``: :class:`feedback.dicom_sr.SrIntake`),
a Structured Report of one of its SOP classes is read whole (at most its ``max_bytes``;
:func:`~dicom_node.metadata.read_document`) and offered to it. An SR it takes (one another
system made: the radiologist's report) is no instance of its study: it is made durable under
the spool's ``reports/``, then the intake records it (matched, stored as the study's signed
report or recorded as a report message), and only then :class:`Accepted` with outcome
:data:`SIGNED_REPORT`. The study is not touched: its state, its instances and its queue stay
as they were, so a signed report never re-opens a study or sends it to the model again. An SR
the intake leaves (d2r's own, coming back with the study), one larger than ``max_bytes`` or
one that cannot be read whole is stored and recorded as any other instance. The checks above
come first, and a database the intake cannot reach refuses it with ``PROCESSING_FAILURE``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final, Protocol

from pydicom.dataset import Dataset
from pynetdicom import AllStoragePresentationContexts

from d2r_core import statuses
from dicom_node.errors import InstanceRejected, SpoolFullError, SpoolWriteError
from dicom_node.metadata import InstanceHeader, parse_header, read_document
from dicom_node.priority import PriorityPolicy, decide_priority
from dicom_node.selection import (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    SECONDARY_CAPTURE,
    is_chest_body_part,
)
from dicom_node.spool import IncomingFile, Spool, SpooledInstance, printable_uid
from studydb.errors import DatabaseUnavailable
from studydb.records import InstanceRecord

__all__ = [
    "DATABASE_DOWN",
    "SIGNED_REPORT",
    "STORAGE_SOP_CLASSES",
    "STUDY_MISMATCH",
    "Accepted",
    "Envelope",
    "IngestService",
    "Payload",
    "Rejected",
    "ReportIntake",
    "Source",
    "StudyRecorder",
    "instance_record",
    "read_whole_dataset",
    "read_header",
]

logger = logging.getLogger(__name__)

#: Storage SOP classes the node takes, each with every transfer syntax: the chest radiograph
#: classes first, then every other storage class, stored and skipped (see :mod:`dicom_node.scp`).
STORAGE_SOP_CLASSES: Final = tuple(
    dict.fromkeys(
        [CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING, SECONDARY_CAPTURE]
        + [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    )
)
#: why an instance was refused while the study database did not answer
DATABASE_DOWN: Final = "the study database is unavailable; send again later"
#: FailureReason of an instance whose Study Instance UID is not the request's ``{study}``.
STUDY_MISMATCH: Final = 0xC122
#: the outcome of an SR taken as a signed report (durable under ``reports/``, not an instance)
SIGNED_REPORT: Final = "signed-report"


class StudyRecorder(Protocol):
    """What ingest needs from the study database (:class:`studydb.ingest.IngestBook`)."""

    def record_instance(self, record: InstanceRecord, *, outcome: str) -> str: ...

    def record_rejection(
        self,
        *,
        sop_instance_uid: str,
        study_instance_uid: str | None,
        reason: str,
        calling_ae_title: str,
    ) -> None: ...


class ReportIntake(Protocol):
    """Where a Structured Report another system made goes: the node's signed-report path
    (:class:`feedback.dicom_sr.SrIntake`)."""

    @property
    def sop_classes(self) -> Collection[str]:
        """The SR SOP classes it reads."""
        ...

    @property
    def max_bytes(self) -> int:
        """The largest data set read whole for it; a larger one is stored as an instance."""
        ...

    def accept(self, dataset: Dataset, calling_ae_title: str) -> Callable[[], str] | None:
        """The call that records ``dataset`` once it is durable (returning what it did), or
        None when it is not one for the intake (it is then stored as an instance)."""
        ...


class Payload(Protocol):
    """A received data set, streamed into the spool or held by the transport."""

    def claim(self) -> bool:
        """Take the data set for this handler; False when it is already gone."""
        ...

    def failure(self) -> SpoolFullError | SpoolWriteError | None:
        """The error that stopped writing the data set while it arrived, if any."""
        ...

    def header(self, transfer_syntax: str) -> InstanceHeader:
        """The routing header (no pixel data); raises :class:`InstanceRejected`."""
        ...

    def dataset(self, transfer_syntax: str, max_bytes: int) -> Dataset | None:
        """The whole data set, or None when longer than ``max_bytes``; raises
        :class:`InstanceRejected` when it cannot be read."""
        ...

    def store(
        self, spool: Spool, study_uid: str, sop_instance_uid: str, *, report: bool = False
    ) -> SpooledInstance:
        """Make the data set durable in the spool (fsync, atomic rename); ``report``: under
        ``reports/``."""
        ...


@dataclass(frozen=True)
class Envelope:
    """What the transport says of an instance before its data set is read."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class Source:
    """Who sent an instance, and how the log and the reasons name the transport.

    Parameters
    ----------
    calling_ae_title : str
        Recorded with the instance (STOW-RS: ``STOW-RS``).
    protocol : str
        ``C-STORE`` or ``STOW-RS``, in log lines.
    envelope : str
        What the reasons call the envelope: ``request`` or ``File Meta``.
    rejected_log : str
        The log line of a rejection (``%s`` for the SOP Instance UID and the reason).
    expected_study : str or None
        The Study Instance UID a STOW-RS request names in its route.
    called_ae_title, address, dimse_priority
        What the priority rules and the C-STORE Priority decide a study's priority from
        (:mod:`dicom_node.priority`).
    """

    calling_ae_title: str
    protocol: str
    envelope: str
    rejected_log: str
    expected_study: str | None = None
    #: the called AE title (C-STORE) the association used
    called_ae_title: str = ""
    #: the sender's IP address, as the transport saw it
    address: str = ""
    #: the C-STORE request's Priority (0 medium, 1 high, 2 low); None for STOW-RS
    dimse_priority: int | None = None


@dataclass(frozen=True)
class Accepted:
    """Spooled and recorded: ``outcome`` is ``stored``, ``duplicate`` or ``conflict``."""

    study_instance_uid: str
    outcome: str
    status: int = statuses.SUCCESS


@dataclass(frozen=True)
class Rejected:
    """Not taken: the DIMSE status and a reason without patient data."""

    status: int
    reason: str
    study_instance_uid: str | None = None


def instance_record(
    header: InstanceHeader, spooled: SpooledInstance, transfer_syntax: str, calling_ae_title: str
) -> InstanceRecord:
    """The study-database row of an instance just spooled (C-STORE and STOW-RS alike)."""
    return InstanceRecord(
        study_instance_uid=header.study_instance_uid,
        series_instance_uid=header.series_instance_uid,
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        transfer_syntax_uid=transfer_syntax,
        modality=header.modality,
        body_part_examined=header.body_part_examined,
        view_position=header.view_position,
        series_description=header.series_description,
        path=str(spooled.path),
        size=spooled.size,
        sha256=spooled.sha256,
        calling_ae_title=calling_ae_title,
        received_at=datetime.now(UTC),
        accession_number=header.accession_number,
    )


def read_whole_dataset(
    incoming: IncomingFile, transfer_syntax: str, max_bytes: int
) -> Dataset | None:
    """The whole data set of a spooled file (C-STORE and STOW-RS alike), or None when longer
    than ``max_bytes`` (:func:`~dicom_node.metadata.read_document`).

    Raises
    ------
    InstanceRejected
        The file cannot be read, or its data set cannot be parsed.
    """
    try:
        with incoming.dataset() as reader:
            return read_document(reader, transfer_syntax, max_bytes)
    except OSError as exc:
        raise InstanceRejected(f"unreadable data set ({type(exc).__name__})") from exc


def read_header(incoming: IncomingFile, transfer_syntax: str) -> InstanceHeader:
    """The routing header of a spooled data set (C-STORE and STOW-RS alike), in bounded memory.

    Pixel data is never read, and a Deflated data set is inflated a chunk at a time only as far
    as the header needs (:func:`~dicom_node.metadata.parse_header`).

    Raises
    ------
    InstanceRejected
        The file cannot be read, or its header cannot be used (see
        :func:`~dicom_node.metadata.parse_header`).
    """
    try:
        with incoming.dataset() as reader:
            return parse_header(reader, transfer_syntax)
    except (OSError, ValueError) as exc:
        raise InstanceRejected(f"unreadable data set ({type(exc).__name__})") from exc


class IngestService:
    """Check, spool and record one instance at a time, for every receiver of a node.

    Parameters
    ----------
    spool : Spool
        Where instances are made durable.
    recorder : StudyRecorder
        The study database's ingest bookkeeping (a node's
        :class:`~studydb.ingest.NodeRecorder`, audited or not).
    priority : PriorityPolicy, optional
        The routing rules and default priority (``D2R_PRIORITY_RULES``,
        ``D2R_PRIORITY_DEFAULT``); each recorded instance carries the priority decided from
        them, its header and its source (:func:`~dicom_node.priority.decide_priority`).
    reports : ReportIntake, optional
        Where the SRs of its SOP classes are offered first (module docstring); without it
        every SR is an instance.
    """

    def __init__(
        self,
        spool: Spool,
        recorder: StudyRecorder,
        *,
        priority: PriorityPolicy | None = None,
        reports: ReportIntake | None = None,
    ) -> None:
        self.spool = spool
        self.recorder = recorder
        self.priority = priority or PriorityPolicy()
        self.reports = reports

    def accept(self, envelope: Envelope, payload: Payload, source: Source) -> Accepted | Rejected:
        """Answer one instance: spooled and recorded, or refused with a status and a reason."""
        study_uid: str | None = None
        try:
            header = self._checked_header(envelope, payload, source)
            if isinstance(header, Rejected):
                return header
            study_uid = header.study_instance_uid
            taken = self._signed_report(envelope, payload, source, header)
            if taken is not None:
                return taken
            return self._spool_and_record(envelope, payload, source, header)
        except DatabaseUnavailable as exc:  # spooled maybe, not recorded: the sender sends again
            logger.warning(
                "%s of SOP Instance %s refused: %s",
                source.protocol,
                printable_uid(envelope.sop_instance_uid),
                exc,
            )
            return Rejected(statuses.PROCESSING_FAILURE, DATABASE_DOWN, study_uid)
        except SpoolWriteError as exc:
            return self._write_failed(envelope, exc, study_uid)
        except Exception:
            logger.exception(
                "%s of SOP Instance %s (study %s) failed",
                source.protocol,
                printable_uid(envelope.sop_instance_uid),
                printable_uid(study_uid or ""),
            )
            return Rejected(statuses.PROCESSING_FAILURE, "processing failure", study_uid)

    def refuse(
        self, sop_instance_uid: str, study_uid: str | None, status: int, reason: str, source: Source
    ) -> Rejected:
        """Log and record a refusal (a failure to record it is logged, not raised)."""
        logger.warning(source.rejected_log, printable_uid(sop_instance_uid), reason)
        try:
            self.recorder.record_rejection(
                sop_instance_uid=sop_instance_uid,
                study_instance_uid=study_uid,
                reason=reason,
                calling_ae_title=source.calling_ae_title,
            )
        except Exception:
            logger.exception(
                "could not record rejection of SOP Instance %s", printable_uid(sop_instance_uid)
            )
        return Rejected(status, reason, study_uid)

    def _checked_header(
        self, envelope: Envelope, payload: Payload, source: Source
    ) -> InstanceHeader | Rejected:
        """The header of a data set that passed every check, or the first refusal."""
        sop_uid = envelope.sop_instance_uid
        if not payload.claim():
            return Rejected(statuses.PROCESSING_FAILURE, "the association ended")
        failure = payload.failure()
        if isinstance(failure, SpoolFullError):
            reason = f"out of resources: {failure}"
            return self.refuse(sop_uid, None, statuses.OUT_OF_RESOURCES, reason, source)
        if failure is not None:
            raise failure
        try:
            header = payload.header(envelope.transfer_syntax_uid)
        except InstanceRejected as exc:
            study = exc.study_instance_uid
            return self.refuse(sop_uid, study, statuses.CANNOT_UNDERSTAND, exc.reason, source)
        study_uid = header.study_instance_uid
        refusal = _mismatch(envelope, header, source)
        if refusal is not None:
            return self.refuse(sop_uid, study_uid, *refusal, source)
        return header

    def _signed_report(
        self, envelope: Envelope, payload: Payload, source: Source, header: InstanceHeader
    ) -> Accepted | Rejected | None:
        """An SR the intake takes: durable under ``reports/``, recorded by the intake; None
        for anything else (module docstring)."""
        intake = self.reports
        if intake is None or header.sop_class_uid not in intake.sop_classes:
            return None
        sop_uid = envelope.sop_instance_uid
        study_uid = header.study_instance_uid
        try:
            dataset = payload.dataset(envelope.transfer_syntax_uid, intake.max_bytes)
        except InstanceRejected as exc:
            logger.info("SR %s not read (%s): stored as an instance", printable_uid(sop_uid), exc)
            return None
        if dataset is None:
            logger.info(
                "SR %s is larger than %d bytes: stored as an instance, not read as a report",
                printable_uid(sop_uid),
                intake.max_bytes,
            )
            return None
        record = intake.accept(dataset, source.calling_ae_title)
        if record is None:
            return None
        try:
            payload.store(self.spool, study_uid, sop_uid, report=True)
        except SpoolFullError as exc:
            reason = f"out of resources: {exc}"
            return self.refuse(sop_uid, study_uid, statuses.OUT_OF_RESOURCES, reason, source)
        outcome = record()
        logger.debug(
            "SR %s of study %s: signed report %s",
            printable_uid(sop_uid),
            printable_uid(study_uid),
            outcome,
        )
        return Accepted(study_uid, SIGNED_REPORT)

    def _spool_and_record(
        self, envelope: Envelope, payload: Payload, source: Source, header: InstanceHeader
    ) -> Accepted | Rejected:
        sop_uid = envelope.sop_instance_uid
        study_uid = header.study_instance_uid
        if header.sop_class_uid == SECONDARY_CAPTURE and not (
            header.modality in ("CR", "DX") and is_chest_body_part(header.body_part_examined)
        ):
            logger.info(
                "Secondary Capture %s is not a chest radiograph; stored, not used",
                printable_uid(sop_uid),
            )
        try:
            spooled = payload.store(self.spool, study_uid, sop_uid)
        except SpoolFullError as exc:
            reason = f"out of resources: {exc}"
            return self.refuse(sop_uid, study_uid, statuses.OUT_OF_RESOURCES, reason, source)
        record = replace(
            instance_record(header, spooled, envelope.transfer_syntax_uid, source.calling_ae_title),
            priority=decide_priority(
                self.priority.rules,
                calling_ae_title=source.calling_ae_title,
                called_ae_title=source.called_ae_title,
                address=source.address,
                header_priorities=header.priorities,
                dimse_priority=source.dimse_priority,
                default=self.priority.default,
            ),
        )
        recorded = self.recorder.record_instance(record, outcome=spooled.outcome)
        logger.debug(
            "SOP Instance %s of study %s: %s",
            printable_uid(sop_uid),
            printable_uid(study_uid),
            recorded,
        )
        return Accepted(study_uid, recorded)

    def _write_failed(
        self, envelope: Envelope, exc: SpoolWriteError, study_uid: str | None
    ) -> Rejected:
        logger.error(
            "spool write failed for SOP Instance %s: %s",
            printable_uid(envelope.sop_instance_uid),
            exc,
        )
        return Rejected(statuses.PROCESSING_FAILURE, str(exc), study_uid)


def _mismatch(envelope: Envelope, header: InstanceHeader, source: Source) -> tuple[int, str] | None:
    """The status and reason when the data set disagrees with its envelope or request."""
    if header.sop_class_uid != envelope.sop_class_uid:
        reason = (
            f"data set SOP class {printable_uid(header.sop_class_uid)} differs from "
            f"{source.envelope}"
        )
        return statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, reason
    if header.sop_instance_uid != envelope.sop_instance_uid:
        return (
            statuses.CANNOT_UNDERSTAND,
            f"data set SOP Instance UID differs from {source.envelope}",
        )
    if envelope.sop_class_uid not in STORAGE_SOP_CLASSES:
        reason = f"SOP class {printable_uid(envelope.sop_class_uid)} not supported"
        return statuses.SOP_CLASS_NOT_SUPPORTED, reason
    if source.expected_study is not None and header.study_instance_uid != source.expected_study:
        return STUDY_MISMATCH, "Study Instance UID differs from the study of the request"
    return None
