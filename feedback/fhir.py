"""A signed report as a FHIR DiagnosticReport: read with fhir.resources, answered with an
OperationOutcome.

:func:`read_diagnostic_report` is pure: the request body in, a :class:`FhirReport` out (or
:class:`FhirRejected`). It parses the body as JSON, checks that it is a ``DiagnosticReport``,
validates it with the R4B models of ``fhir.resources`` (those :mod:`delivery.fhir` writes) and
takes from it:

* the status (``final`` is ``F``; ``corrected``, ``amended``, ``appended`` are ``C``; the other
  codes of the value set are not final, :data:`RESULT_STATUS`);
* the text: the first ``presentedForm`` attachment of type ``text/plain`` with inline ``data``
  (base64), else the first ``text/html`` one as plain text, else ``conclusion``; at most
  :data:`MAX_TEXT_CHARS` characters;
* Study Instance UIDs: ``imagingStudy`` references whose ``identifier`` (or, for a reference
  ``#id``, the contained ImagingStudy's identifiers) has system ``urn:dicom:uid`` and value
  ``urn:oid:<uid>``;
* accession numbers: the report's identifiers of type ``ACSN`` (HL7 table v2-0203), then
  ``basedOn`` ServiceRequest identifiers (a logical reference's own identifier, or the ACSN
  identifiers of a contained ServiceRequest), then the ACSN identifiers of contained
  ImagingStudies;
* the message control ID: ``<id>/_history/<versionId>``, else ``<id>#<hash>`` (a hash of the
  body, so that another text under the same id is another message), else ``sha256:<hash>``.

:class:`FhirReceiver` is ``POST /fhir/DiagnosticReport`` on the node's HTTP endpoint (role
``feedback``): the body bounded by ``D2R_FHIR_MAX_BYTES``, the report matched, stored and
recorded by :func:`feedback.match.receive` as an HL7 message is, and the answer an
OperationOutcome saying what was done (:mod:`feedback.match` has the table). Logs name the
outcome, the HTTP status and the matched study; never report text, identifiers the client sent,
or patient data.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from fhir.resources.R4B.attachment import Attachment
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome, OperationOutcomeIssue
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.servicerequest import ServiceRequest
from pydantic import ValidationError

from feedback.match import (
    ERROR,
    REJECT,
    REJECTED,
    Answer,
    ReportBook,
    printable,
    receive,
    record_rejection,
)
from studydb.engine import Database
from studydb.errors import DatabaseUnavailable

__all__ = [
    "FHIR_JSON",
    "MAX_TEXT_CHARS",
    "RESULT_STATUS",
    "FhirReceiver",
    "FhirRejected",
    "FhirReport",
    "operation_outcome",
    "read_diagnostic_report",
]

logger = logging.getLogger(__name__)

FHIR_JSON: Final = "application/fhir+json"
#: media types the endpoint reads (FHIR R4 section 3.1.0.1.6: ``application/json`` too)
JSON_TYPES: Final = frozenset({FHIR_JSON, "application/json"})
#: DiagnosticReport.status (value set diagnostic-report-status) -> HL7 result status
#: (table 0123); ``unknown`` has none
RESULT_STATUS: Final = {
    "final": "F",
    "corrected": "C",
    "amended": "C",
    "appended": "C",
    "preliminary": "P",
    "partial": "I",
    "registered": "O",
    "cancelled": "X",
    "entered-in-error": "W",
    "unknown": "",
}
#: the longest report text kept, in characters
MAX_TEXT_CHARS: Final = 100_000
DICOM_UID_SYSTEM: Final = "urn:dicom:uid"
_V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
_ACCESSION: Final = "ACSN"
_ID_LENGTH: Final = 64
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
#: seconds each database call of one request may retry an unreachable database
DATABASE_WAIT_SECONDS: Final = 5.0
NO_TEXT: Final = "no report text (presentedForm text/plain or text/html, or conclusion)"
_READ_CHUNK: Final = 65536


class FhirRejected(Exception):
    """A body that is not a DiagnosticReport d2r can take.

    Parameters
    ----------
    status : int
        The HTTP status: 400 (not JSON, not a DiagnosticReport) or 422 (a DiagnosticReport that
        fhir.resources rejects, or whose status is outside its value set).
    reason : str
        The OperationOutcome's diagnostics, our own words (element paths, no values).
    control_id : str
        The message control ID, when the body was JSON.
    """

    def __init__(self, status: int, reason: str, control_id: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.control_id = control_id

    @property
    def code(self) -> str:
        """The MSA-1 recorded for it: ``AR`` for 400, ``AE`` for 422."""
        return REJECT if self.status == 400 else ERROR


@dataclass(frozen=True)
class FhirReport:
    """What d2r takes from one DiagnosticReport (module docstring)."""

    control_id: str
    #: ``fhir:`` + the name of the credential that sent it, printable
    source: str
    #: the HL7 result status of its ``status`` (:data:`RESULT_STATUS`)
    result_status: str
    #: its ``status`` as sent
    fhir_status: str
    #: candidate accession numbers, most specific first, without repeats
    accession_numbers: tuple[str, ...]
    #: Study Instance UIDs of its imaging studies, without repeats
    study_uids: tuple[str, ...]
    #: the report text (empty when it has none)
    text: str


# ---------------------------------------------------------------------------------- reading
def read_diagnostic_report(body: bytes, *, sender: str) -> FhirReport:
    """Read one DiagnosticReport (module docstring); ``sender`` names the credential.

    Raises
    ------
    FhirRejected
        400 for a body that is not JSON or not a DiagnosticReport; 422 for one that
        fhir.resources rejects or whose status is not a DiagnosticReport status.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        raise FhirRejected(400, "the body is not JSON") from None
    if not isinstance(data, dict) or data.get("resourceType") != "DiagnosticReport":
        raise FhirRejected(400, "the body is not a FHIR DiagnosticReport resource")
    control_id = _control_id(data, body)
    status = data.get("status")
    if not isinstance(status, str) or status not in RESULT_STATUS:
        reason = "status: not a DiagnosticReport status (diagnostic-report-status)"
        raise FhirRejected(422, reason, control_id)
    try:
        report = DiagnosticReport.model_validate(data)
    except ValidationError as exc:
        raise FhirRejected(422, _invalid(exc), control_id) from None
    except (ValueError, TypeError, RecursionError):
        raise FhirRejected(422, "not a valid DiagnosticReport", control_id) from None
    contained = {str(r.id): r for r in report.contained or () if getattr(r, "id", None)}
    return FhirReport(
        control_id=control_id,
        source=printable("fhir:" + sender, 255),
        result_status=RESULT_STATUS[status],
        fhir_status=status,
        accession_numbers=_unique(_accessions(report, contained)),
        study_uids=_unique(_study_uids(report.imagingStudy or (), contained)),
        text=_text(report),
    )


def _control_id(data: Mapping[str, Any], body: bytes) -> str:
    """The message control ID of a DiagnosticReport (module docstring), at most 64 characters."""
    digest = hashlib.sha256(body).hexdigest()
    resource_id = data.get("id")
    meta = data.get("meta")
    version = meta.get("versionId") if isinstance(meta, dict) else None
    if not isinstance(resource_id, str) or not resource_id:
        return f"sha256:{digest[:56]}"
    if isinstance(version, str) and version:
        named = f"{resource_id}/_history/{version}"
    else:
        named = f"{resource_id}#{digest[:16]}"
    if len(named) > _ID_LENGTH or printable(named, _ID_LENGTH) != named:
        return f"sha256:{hashlib.sha256(named.encode()).hexdigest()[:56]}"
    return named


def _invalid(exc: ValidationError) -> str:
    """The element paths a validation error names: the model's own names, never a value or an
    element name the client made up (an unknown element is named by where it is)."""
    paths = []
    for error in exc.errors()[:5]:
        loc = [str(part) for part in error.get("loc", ())]
        if error.get("type") == "extra_forbidden":
            loc = [*loc[:-1], "(unknown element)"]
        paths.append(printable(".".join(loc), 80) or "(resource)")
    more = " and more" if len(exc.errors()) > 5 else ""
    return f"not a valid DiagnosticReport: {', '.join(dict.fromkeys(paths))}{more}"


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in values if v))


def _is_accession(identifier: Identifier) -> bool:
    codings = identifier.type.coding if identifier.type is not None else None
    return any(c.system == _V2_0203 and c.code == _ACCESSION for c in codings or ())


def _identifier_value(identifier: Identifier | None) -> str:
    value = identifier.value if identifier is not None else None
    return printable(value.strip(), _ID_LENGTH) if value else ""


def _accessions(report: DiagnosticReport, contained: Mapping[str, Any]) -> Iterable[str]:
    for identifier in report.identifier or ():
        if _is_accession(identifier):
            yield _identifier_value(identifier)
    for reference in report.basedOn or ():
        if reference.identifier is not None:
            yield _identifier_value(reference.identifier)
        target = _contained(reference, contained, ServiceRequest)
        for identifier in target.identifier or () if target is not None else ():
            if _is_accession(identifier):
                yield _identifier_value(identifier)
    for resource in contained.values():
        if isinstance(resource, ImagingStudy):
            for identifier in resource.identifier or ():
                if _is_accession(identifier):
                    yield _identifier_value(identifier)


def _contained(reference: Reference, contained: Mapping[str, Any], kind: type) -> Any:
    """The contained resource of type ``kind`` a reference ``#id`` names, else None."""
    target = reference.reference or ""
    if not target.startswith("#"):
        return None
    resource = contained.get(target[1:])
    return resource if isinstance(resource, kind) else None


def _dicom_uid(identifier: Identifier | None) -> str:
    if identifier is None or identifier.system != DICOM_UID_SYSTEM or not identifier.value:
        return ""
    uid = identifier.value.strip().removeprefix("urn:oid:")
    return uid if len(uid) <= _ID_LENGTH and _UID.fullmatch(uid) else ""


def _study_uids(references: Iterable[Reference], contained: Mapping[str, Any]) -> Iterable[str]:
    for reference in references:
        yield _dicom_uid(reference.identifier)
        study = _contained(reference, contained, ImagingStudy)
        for identifier in study.identifier or () if study is not None else ():
            yield _dicom_uid(identifier)


def _text(report: DiagnosticReport) -> str:
    """The presentedForm's text/plain, else its text/html as text, else the conclusion."""
    forms = [(a, a.data) for a in report.presentedForm or () if a.data]
    for kind in ("text/plain", "text/html"):
        for attachment, data in forms:
            media, charset = _media_type(attachment)
            if media == kind:
                text = _decode(data, charset)
                text = _html_text(text) if kind == "text/html" else text
                if text.strip():
                    return _tidy(text)
    return _tidy(report.conclusion or "")


def _media_type(attachment: Attachment) -> tuple[str, str]:
    """(media type, charset) of an attachment's contentType, lower case."""
    media, *parameters = (attachment.contentType or "").split(";")
    charset = "utf-8"
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"').lower()
    return media.strip().lower(), charset


def _decode(data: bytes, charset: str) -> str:
    """``data`` in ``charset`` (UTF-8 for a name that is no text encoding).

    >>> _decode("É".encode("latin-1"), "iso-8859-1"), _decode(b"x", "rot13")
    ('É', 'x')
    """
    head = data[: 4 * MAX_TEXT_CHARS]
    try:
        return head.decode(charset, errors="replace")
    except (LookupError, ValueError):  # unknown, or a bytes/text transform such as base64
        return head.decode("utf-8", errors="replace")


def _tidy(text: str) -> str:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip()[:MAX_TEXT_CHARS]


class _HtmlText(html.parser.HTMLParser):
    """The text of an XHTML fragment: block elements and ``<br>`` end a line, scripts and
    styles are dropped."""

    BLOCKS: Final = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"})
    HIDDEN: Final = frozenset({"script", "style"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def _html_text(markup: str) -> str:
    """The text of ``markup`` (:class:`_HtmlText`), one paragraph per line.

    >>> _html_text("<div><p>No acute <b>findings</b>.</p><p>Clear&nbsp;lungs.</p></div>")
    'No acute findings.\\nClear lungs.'
    """
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    lines = "".join(parser.parts).split("\n")
    return "\n".join(" ".join(line.split()) for line in lines if line.strip())


# --------------------------------------------------------------------------------- answering
def operation_outcome(severity: str, code: str, diagnostics: str) -> bytes:
    """An OperationOutcome with one issue, as JSON.

    >>> operation_outcome("information", "informational", "stored as version 1")[:59]
    b'{"resourceType":"OperationOutcome","issue":[{"severity":"in'
    """
    outcome = OperationOutcome(
        issue=[OperationOutcomeIssue(severity=severity, code=code, diagnostics=diagnostics)]
    )
    return outcome.model_dump_json(exclude_none=True).encode()


def _answer_status(answer: Answer) -> int:
    if answer.outcome == REJECTED:
        return 422
    return 201 if answer.version is not None and answer.outcome in ("stored", "corrected") else 200


class RequestBody(Protocol):
    """The request body, de-framed by the HTTP server."""

    def read(self, size: int = -1, /) -> bytes: ...


class FhirReceiver:
    """``POST /fhir/DiagnosticReport``: the handler the node mounts on its HTTP endpoint.

    Parameters
    ----------
    book : ReportBook
        The study database (:class:`studydb.feedback.SignedReports`).
    max_bytes : int
        The largest body read (``D2R_FHIR_MAX_BYTES``); 413 beyond.
    wait_seconds : float
        How long each database call may wait for an unreachable database (then 503).
    """

    def __init__(
        self, book: ReportBook, *, max_bytes: int, wait_seconds: float = DATABASE_WAIT_SECONDS
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.book = book
        self.max_bytes = max_bytes
        self.wait_seconds = wait_seconds

    def __call__(
        self,
        method: str,
        route: str,
        headers: Mapping[str, str],
        body: RequestBody,
        client: str,
        user: str,
    ) -> tuple[int, str, bytes]:
        """Answer one request: (HTTP status, content type, OperationOutcome)."""
        if method != "POST":
            return self._refuse(405, "not-supported", "only POST creates a DiagnosticReport")
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in JSON_TYPES:
            return self._refuse(415, "not-supported", "expected application/fhir+json")
        length = headers.get("content-length", "").strip()
        if length.isascii() and length.isdigit() and int(length) > self.max_bytes:
            return self._refuse(413, "too-costly", f"body larger than {self.max_bytes} bytes")
        try:
            data = self._read(body)
        except (OSError, ValueError):  # cut off, or a broken chunked framing
            return self._refuse(400, "structure", "the body ended early or is badly framed")
        if data is None:
            return self._refuse(413, "too-costly", f"body larger than {self.max_bytes} bytes")
        try:
            report = read_diagnostic_report(data, sender=user)
        except FhirRejected as rejected:
            return self._rejected(rejected, user)
        return self._receive(report)

    def _read(self, body: RequestBody) -> bytes | None:
        """The whole body, or None when it is longer than :attr:`max_bytes`."""
        data = bytearray()
        while chunk := body.read(min(_READ_CHUNK, self.max_bytes + 1 - len(data))):
            data += chunk
            if len(data) > self.max_bytes:
                return None
        return bytes(data)

    def _receive(self, report: FhirReport) -> tuple[int, str, bytes]:
        try:
            with Database.retry_budget(self.wait_seconds):
                answer = receive(self.book, report, no_text=NO_TEXT)
        except DatabaseUnavailable:
            logger.error("FHIR signed report not stored: the study database is unavailable")
            return self._refuse(503, "transient", "the study database is unavailable; send again")
        except Exception:
            logger.exception("FHIR signed report not stored")
            return self._refuse(500, "exception", "internal error")
        status = _answer_status(answer)
        logger.info(
            "signed-report resource (status %s, %s): %s, answered HTTP %d; study %s",
            report.fhir_status,
            report.result_status or "-",
            answer.outcome,
            status,
            answer.study_instance_uid or "-",
        )
        if status == 422:
            return status, FHIR_JSON, operation_outcome("error", "required", answer.note)
        return status, FHIR_JSON, operation_outcome("information", "informational", answer.note)

    def _rejected(self, rejected: FhirRejected, user: str) -> tuple[int, str, bytes]:
        logger.warning("FHIR DiagnosticReport answered %d: %s", rejected.status, rejected.reason)
        try:
            with Database.retry_budget(self.wait_seconds):
                record_rejection(self.book, rejected, source=printable("fhir:" + user, 255))
        except Exception:
            logger.exception("could not record a rejected FHIR DiagnosticReport")
        code = "structure" if rejected.status == 400 else "invalid"
        return rejected.status, FHIR_JSON, operation_outcome("error", code, rejected.reason)

    @staticmethod
    def _refuse(status: int, code: str, reason: str) -> tuple[int, str, bytes]:
        if status not in (413, 415):
            logger.warning("FHIR DiagnosticReport answered %d: %s", status, reason)
        return status, FHIR_JSON, operation_outcome("error", code, reason)
