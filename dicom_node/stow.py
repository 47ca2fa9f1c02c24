"""The STOW-RS receiver (DICOM PS3.18 10.5): instances stored over HTTP as C-STORE stores them.

``POST /dicom-web/studies`` and ``POST /dicom-web/studies/{study}`` take a
``multipart/related; type="application/dicom"`` body whose parts are DICOM PS3.10 files. The
body is parsed as it arrives (:class:`multipart.PushMultipartParser`, 64 KiB at a time) and
counted against ``max_bytes``. Each part streams into its own spool file in ``tmp/``
(:class:`~dicom_node.spool.IncomingFile`, hashed on the way): only its first
:data:`META_PREFIX` bytes are held, until its File Meta Information is read and written as the
spool writes it; the data set bytes follow unchanged. Memory per request is therefore bounded
(a few hundred KiB) whatever the size of the body or its parts; ``max_bytes`` bounds the disk.
Only a complete, well-formed body is stored: a truncated or malformed one is refused whole
(400) and nothing of it is kept. At most ``max_concurrent`` requests are received at once;
one more is answered 503 (the HTTP layer adds Retry-After) before its body is read.

Each part then takes the C-STORE path (:mod:`dicom_node.scp`): the routing header is parsed
from the spooled file without pixel data (:func:`~dicom_node.metadata.parse_header`), the file
is made durable through :meth:`~dicom_node.spool.Spool.store_incoming` (fsync, atomic rename;
the same dedup and conflict policy), the instance is recorded in the study database, all before
the response. UIDs and other client text are logged through
:func:`~dicom_node.spool.printable_uid` and :func:`~dicom_node.spool.printable` only.
One request counts as one association for the studies it brought (``open_associations``),
released when the response is ready, so the release-grace completion rule applies.

Per part (PS3.18 Table 10.5.3-1, the DIMSE-range reasons of C-STORE):

===============================================  =========================================
condition                                        FailureReason (0008,1197)
===============================================  =========================================
spool below the free-space guard, ENOSPC/EDQUOT  ``0xA700`` out of resources
part not ``application/dicom``, not PS3.10,      ``0xC000`` cannot understand
unreadable header, missing or invalid UIDs
File Meta SOP Class differs from the data set    ``0xA900`` data set does not match SOP class
SOP class is not a storage class                 ``0x0122`` SOP class not supported
Study Instance UID differs from ``{study}``      ``0xC122`` (:data:`STUDY_MISMATCH`)
other write error, database error, anything else ``0x0110`` processing failure
===============================================  =========================================

A re-sent instance is stored once (outcome ``duplicate``) and answered as stored, as C-STORE
answers Success. A signed-report SR the node's report intake takes is answered as stored too
(outcome ``signed-report``, :mod:`dicom_node.ingest`). Request status: 200 every part stored,
202 some stored and some failed (or warnings), 409 none stored, 503 none stored because the
spool is full (or ``max_concurrent`` requests are being received); 400 an unparseable or
truncated body, 413 over ``max_bytes``, 415 not ``multipart/related`` of ``application/dicom``.
"""

from __future__ import annotations

import errno
import io
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from multipart import (
    MultipartError,
    MultipartSegment,
    PushMultipartParser,
    parse_options_header,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag

from d2r_core import statuses
from dicom_node.errors import InstanceRejected, NodeError, SpoolFullError, SpoolWriteError
from dicom_node.ingest import (
    DATABASE_DOWN,
    STUDY_MISMATCH,
    Accepted,
    Envelope,
    IngestService,
    ReportIntake,
    Source,
    StudyRecorder,
    read_header,
    read_whole_dataset,
)
from dicom_node.metadata import InstanceHeader
from dicom_node.priority import PriorityPolicy
from dicom_node.scp import AssociationLedger
from dicom_node.spool import (
    MAX_FILE_META_BYTES,
    PREAMBLE,
    IncomingFile,
    Spool,
    SpooledInstance,
    printable,
    printable_uid,
)

__all__ = [
    "DICOM_JSON",
    "STOW_CALLING_AE",
    "STUDY_MISMATCH",
    "PartResult",
    "StowReceiver",
    "StowRefused",
    "request_status",
    "store_response",
]

logger = logging.getLogger(__name__)

#: The media type of the store response.
DICOM_JSON: Final = "application/dicom+json"
#: What the study database records as the "calling AE title" of an instance stored over STOW-RS.
STOW_CALLING_AE: Final = "STOW-RS"
#: Longest multipart boundary accepted: RFC 2046 says 70, Orthanc 1.10 sends 73.
MAX_BOUNDARY: Final = 256
#: Limits of the multipart parser: part header lines and their count, parts per request.
MAX_PART_HEADER_BYTES: Final = 8192
MAX_PART_HEADERS: Final = 16
MAX_PARTS: Final = 10_000
#: Bytes of a part held until its File Meta Information is read (the rest streams to ``tmp/``).
META_PREFIX: Final = MAX_FILE_META_BYTES
_CHUNK: Final = 1 << 16
_FILE_META_UIDS: Final = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID")


class StowRefused(NodeError):
    """A request refused whole: ``status`` is the HTTP status, ``reason`` a short fixed text."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class RequestBody(Protocol):
    """The request body, already de-framed (Content-Length or chunked) by the HTTP server."""

    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class PartResult:
    """What became of one part: stored (``outcome``) or failed (``status``, ``reason``)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str | None
    status: int
    outcome: str | None = None
    reason: str | None = None

    @property
    def failed(self) -> bool:
        return statuses.is_failure(self.status)


#: Called once per part after it was handled (audit line, metrics): the result, the client's
#: address and the authenticated user's name.
InstanceObserver = Callable[[PartResult, str, str], None]


# ------------------------------------------------------------------------------ pure parts
def study_of_route(route: str) -> str | None:
    """The ``{study}`` of a STOW-RS route, or None for ``/dicom-web/studies``.

    >>> study_of_route("/dicom-web/studies"), study_of_route("/dicom-web/studies/1.2.3/")
    (None, '1.2.3')

    Raises
    ------
    StowRefused
        404 for any other route.
    """
    parts = [p for p in route.split("/") if p]
    if parts[:2] == ["dicom-web", "studies"] and len(parts) in (2, 3):
        return parts[2] if len(parts) == 3 else None
    raise StowRefused(404, "not a STOW-RS resource")


def boundary_of(content_type: str) -> str:
    """The multipart boundary of a request ``Content-Type`` (PS3.18 8.6.1.2).

    >>> boundary_of('multipart/related; type="application/dicom"; boundary=xyz')
    'xyz'

    Raises
    ------
    StowRefused
        415 unless ``multipart/related`` of ``application/dicom`` (a missing ``type`` is
        accepted: each part's own type is checked); 400 without a boundary.
    """
    media, options = parse_options_header(content_type or "")
    kind = options.get("type", "application/dicom").strip().lower()
    if media != "multipart/related" or kind != "application/dicom":
        raise StowRefused(415, 'expected multipart/related; type="application/dicom"')
    boundary = str(options.get("boundary", ""))
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise StowRefused(400, "missing or invalid multipart boundary")
    return boundary


def request_status(results: Sequence[PartResult]) -> int:
    """The HTTP status of a store response (PS3.18 10.5.3).

    >>> ok = PartResult("1.2", "1.2.3", "1.2.4", 0)
    >>> bad = PartResult("", "", None, 0xC000, reason="x")
    >>> full = PartResult("1.2", "1.2.5", "1.2.4", 0xA700, reason="out of resources")
    >>> [request_status(r) for r in ([ok], [ok, bad], [bad], [full], [bad, full])]
    [200, 202, 409, 503, 409]
    """
    failed = [r for r in results if r.failed]
    if not failed:
        warned = any(statuses.is_warning(r.status) for r in results)
        return 202 if warned else 200
    if len(failed) < len(results):
        return 202
    if all(r.status == statuses.OUT_OF_RESOURCES for r in failed):
        return 503
    return 409


def store_response(results: Sequence[PartResult]) -> dict[str, Any]:
    """The store response data set (PS3.18 Table 10.5.3-1) as DICOM JSON.

    ReferencedSOPSequence lists the stored instances (WarningReason when one has a warning),
    FailedSOPSequence the others with their FailureReason. No RetrieveURL: d2r serves no
    WADO-RS.
    """
    ds = Dataset()
    referenced, failed = [], []
    for r in results:
        item = Dataset()
        item.ReferencedSOPClassUID = r.sop_class_uid
        item.ReferencedSOPInstanceUID = r.sop_instance_uid
        if r.failed:
            item.FailureReason = r.status
            failed.append(item)
        else:
            if statuses.is_warning(r.status):
                item.WarningReason = r.status
            referenced.append(item)
    if referenced:
        ds.ReferencedSOPSequence = referenced
    if failed:
        ds.FailedSOPSequence = failed
    return dict(ds.to_json_dict())


# ------------------------------------------------------------------------------ body parsing
class _RelatedParser(PushMultipartParser):  # type: ignore[misc]
    """``multipart/related``: parts need no ``Content-Disposition`` (the parser's documented
    extension point for other multipart types)."""

    def _create_segment(self, headerlist: list[tuple[str, str]]) -> MultipartSegment:
        return MultipartSegment(headerlist)


class _PartFile:
    """One ``application/dicom`` part streaming into the spool's ``tmp/``.

    The first :data:`META_PREFIX` bytes (or the whole part, if shorter) are held until the File
    Meta Information is read from them; then the preamble, that File Meta Information as the
    spool writes it and the data set bytes go to an :class:`IncomingFile`, and every later byte
    straight after them. A part that is not PS3.10 keeps its reason in :attr:`rejected` and the
    rest of its bytes are dropped.
    """

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._prefix = bytearray()
        #: SOP Class, SOP Instance and Transfer Syntax UIDs of the File Meta Information
        self.uids: tuple[str, str, str] | None = None
        self.incoming: IncomingFile | None = None
        self.rejected: InstanceRejected | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.incoming is not None:
            self.incoming.write(data)
        elif self.rejected is None:
            self._prefix += data
            if len(self._prefix) >= META_PREFIX:
                self._open(complete=False)

    def finish(self) -> None:
        """The part ended: open it if it was shorter than the prefix, close its file."""
        if self.incoming is None and self.rejected is None:
            self._open(complete=True)
        if self.incoming is not None:
            self.incoming.close()

    def discard(self) -> None:
        if self.incoming is not None:
            self.incoming.close()
            self.incoming.discard()

    def _open(self, *, complete: bool) -> None:
        prefix = bytes(self._prefix)
        self._prefix = bytearray()
        try:
            meta, offset = _split_part10(prefix)
            if offset >= len(prefix) and not complete:
                raise InstanceRejected(f"File Meta Information over {META_PREFIX} bytes")
            encoded = DicomBytesIO()
            write_file_meta_info(encoded, meta, enforce_standard=True)
        except InstanceRejected as exc:
            self.rejected = exc
            return
        except Exception as exc:
            self.rejected = InstanceRejected(
                f"unwritable File Meta Information ({type(exc).__name__})"
            )
            return
        self.uids = (
            str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
        )
        self.incoming = self._spool.incoming()
        self.incoming.write(PREAMBLE + encoded.getvalue())
        self.incoming.write(memoryview(prefix)[offset:])


@dataclass
class _Part:
    content_type: str
    data: _PartFile | None  # None: not application/dicom, its bytes were skipped
    size: int = 0


@dataclass
class _Request:
    parts: list[_Part] = field(default_factory=list)

    def close(self) -> None:
        """Remove every part file not published (all of them, for a refused request)."""
        for part in self.parts:
            if part.data is not None:
                part.data.discard()


# Longer than a screen: the streaming multipart parser's event loop: each event's handling is a
# few lines and they share the parser's state
def _read_parts(
    body: RequestBody, boundary: str, *, max_bytes: int, spool: Spool, content_length: int | None
) -> _Request:
    """Parse the whole body into parts, each streamed into a file under ``spool.tmp_dir``.

    Raises
    ------
    StowRefused
        400 malformed or truncated, 413 over ``max_bytes``, 503 no space for the parts.
    """
    request = _Request()
    parser = _RelatedParser(
        boundary,
        content_length=-1 if content_length is None else content_length,
        max_header_size=MAX_PART_HEADER_BYTES,
        max_header_count=MAX_PART_HEADERS,
        max_segment_count=MAX_PARTS,
    )
    current: _Part | None = None
    total = 0
    try:
        while True:
            try:
                chunk = body.read(_CHUNK)
            except (OSError, ValueError) as exc:  # a timeout, a cut connection, bad chunking
                raise StowRefused(400, f"body cut off ({type(exc).__name__})") from None
            total += len(chunk)
            if total > max_bytes:
                raise StowRefused(413, f"body over {max_bytes} bytes")
            for event in parser.parse(chunk):
                if isinstance(event, MultipartSegment):
                    # a part without Content-Type has the request's type (RFC 2387 "type")
                    media = (event.content_type or "application/dicom").lower()
                    data = _PartFile(spool) if media == "application/dicom" else None
                    current = _Part(media, data)  # removed by _Request.close() unless published
                    request.parts.append(current)
                elif event is None:
                    if current is not None and current.data is not None:
                        current.data.finish()
                    current = None
                elif current is not None:
                    current.size += len(event)
                    if current.data is not None:
                        current.data.write(event)
            if not chunk:
                break
        if not parser.closed:
            raise StowRefused(400, "multipart body ends before its closing boundary")
        if not request.parts:
            raise StowRefused(400, "multipart body without parts")
    except MultipartError as exc:
        request.close()
        raise StowRefused(400, f"malformed multipart body: {printable(exc)}") from None
    except OSError as exc:  # reading a part file back: disk full, I/O error
        request.close()
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise StowRefused(
            503 if full else 500, f"cannot buffer the parts: {exc.strerror}"
        ) from None
    except BaseException:
        request.close()
        raise
    return request


# ------------------------------------------------------------------------------ one instance
def _split_part10(data: bytes) -> tuple[FileMetaDataset, int]:
    """(File Meta Information, offset of the data set) of a PS3.10 file (or its first bytes).

    The 128-byte preamble and ``DICM`` may be missing (as some senders write a data set that
    was never read from a file); the File Meta Information may not.

    Raises
    ------
    InstanceRejected
        Not a PS3.10 file, or its File Meta Information lacks a required UID.
    """
    start = 132 if data[128:132] == b"DICM" else 0
    if data[start : start + 2] != b"\x02\x00":
        raise InstanceRejected("not a DICOM PS3.10 file (no File Meta Information)")
    fp = io.BytesIO(data)
    fp.seek(start)
    try:
        meta = FileMetaDataset(
            read_dataset(
                fp,
                is_implicit_VR=False,
                is_little_endian=True,
                stop_when=_after_file_meta,
                defer_size=4096,
            )
        )
        uids = {
            k: str(meta.get(k, "") or "").strip() for k in (*_FILE_META_UIDS, "TransferSyntaxUID")
        }
    except Exception as exc:
        raise InstanceRejected(f"unreadable File Meta Information ({type(exc).__name__})") from None
    for keyword, value in uids.items():
        if not value:
            raise InstanceRejected(f"File Meta Information lacks {keyword}")
    return meta, fp.tell()


def _after_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) >> 16 != 0x0002


class StowReceiver:
    """The STOW-RS handler the node's HTTP endpoint calls for ``/dicom-web/`` routes.

    Parameters
    ----------
    spool : Spool
        Where instances go, as for C-STORE.
    store : StudyRecorder
        The study database (records instances and rejections).
    ledger : AssociationLedger, optional
        Counts each request as an association of the studies it brought.
    max_bytes : int
        Largest request body accepted (413 beyond).
    max_concurrent : int
        Most requests received at once (503 beyond, before the body is read).
    on_released : callable, optional
        Called after a request that stored instances was counted as released.
    on_instance : callable, optional
        Called for each part with its :class:`PartResult`, the client address and the user.
    priority : PriorityPolicy, optional
        The rules (by the client's network) and default each part's priority is decided with;
        STOW-RS has no DIMSE Priority, so the header and the network rules speak.
    reports : ReportIntake, optional
        Takes the signed-report SRs, as for C-STORE (:mod:`dicom_node.ingest`).
    """

    def __init__(
        self,
        spool: Spool,
        store: StudyRecorder,
        *,
        ledger: AssociationLedger | None = None,
        max_bytes: int = 1024**3,
        max_concurrent: int = 4,
        on_released: Callable[[], None] | None = None,
        on_instance: InstanceObserver | None = None,
        priority: PriorityPolicy | None = None,
        reports: ReportIntake | None = None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.spool = spool
        self.store = store
        self.ingest = IngestService(spool, store, priority=priority, reports=reports)
        self.ledger = ledger
        self.max_bytes = max_bytes
        self.max_concurrent = max_concurrent
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self.on_released = on_released
        self.on_instance = on_instance

    def __call__(
        self,
        method: str,
        route: str,
        headers: Mapping[str, str],
        body: RequestBody,
        client: str,
        user: str,
    ) -> tuple[int, str, bytes]:
        """Answer one request: (HTTP status, content type, body). ``headers`` are lower-case."""
        try:
            return self._handle(method, route, headers, body, client, user)
        except StowRefused as exc:
            if exc.status >= 500 or exc.status in (400, 413, 415):
                logger.warning("STOW-RS from %s refused: %s", printable(client), exc)
            return exc.status, "application/json", _error_body(exc.reason)
        except Exception:
            logger.exception("STOW-RS from %s failed", printable(client))
            return 500, "application/json", _error_body("internal error")

    def _handle(
        self,
        method: str,
        route: str,
        headers: Mapping[str, str],
        body: RequestBody,
        client: str,
        user: str,
    ) -> tuple[int, str, bytes]:
        study = study_of_route(route)
        if method != "POST":
            raise StowRefused(405, "only POST (STOW-RS) is served")
        accept = headers.get("accept", "")
        if accept and not any(
            a.split(";")[0].strip() in ("application/dicom+json", "application/json", "*/*", "")
            for a in accept.split(",")
        ):
            raise StowRefused(406, "the store response is application/dicom+json")
        boundary = boundary_of(headers.get("content-type", ""))
        length = _content_length(headers)
        if length is not None and length > self.max_bytes:
            raise StowRefused(413, f"Content-Length over {self.max_bytes} bytes")
        try:
            self.spool.check_free_space(length or 0)
        except SpoolFullError as exc:
            logger.warning("STOW-RS from %s refused: spool full (%s)", printable(client), exc)
            raise StowRefused(503, "out of resources: the spool is full") from None
        if not self._slots.acquire(blocking=False):
            raise StowRefused(503, f"{self.max_concurrent} STOW-RS requests already in progress")
        try:
            return self._receive(body, boundary, length, study, client, user)
        finally:
            self._slots.release()

    def _receive(
        self,
        body: RequestBody,
        boundary: str,
        length: int | None,
        study: str | None,
        client: str,
        user: str,
    ) -> tuple[int, str, bytes]:
        """Read the body into part files, store each part, answer (one request slot held)."""
        request = _read_parts(
            body, boundary, max_bytes=self.max_bytes, spool=self.spool, content_length=length
        )
        results: list[PartResult] = []
        studies: list[str] = []
        try:
            for part in request.parts:
                result = self._store_part(part, study, client)
                results.append(result)
                if result.outcome == "stored" and result.study_instance_uid not in studies:
                    self._open(result.study_instance_uid, studies)
                if self.on_instance is not None:
                    try:
                        self.on_instance(result, client, user)
                    except Exception:
                        logger.exception("could not observe a STOW-RS instance")
        finally:
            request.close()
            self._release(studies)
        if results and all(r.reason == DATABASE_DOWN for r in results):
            raise StowRefused(503, DATABASE_DOWN)
        status = request_status(results)
        stored = sum(not r.failed for r in results)
        logger.info(
            "STOW-RS from %s (%s): %d of %d parts stored, HTTP %d",
            printable(client),
            printable(user),
            stored,
            len(results),
            status,
        )
        return status, DICOM_JSON, _json(store_response(results))

    def _open(self, study_uid: str | None, studies: list[str]) -> None:
        if self.ledger is None or study_uid is None:
            return
        try:
            self.ledger.open_association(study_uid)
        except Exception:  # the study then completes by its quiet period
            logger.exception(
                "could not count the STOW-RS request of study %s", printable_uid(study_uid)
            )
            return
        studies.append(study_uid)

    def _release(self, studies: list[str]) -> None:
        if self.ledger is None or not studies:
            return
        try:
            self.ledger.close_association(studies, released=True)
            if self.on_released is not None:
                self.on_released()
        except Exception:
            logger.exception("could not record the end of a STOW-RS request")

    def _reject(
        self, sop_class: str, sop_uid: str, study_uid: str | None, status: int, reason: str
    ) -> PartResult:
        refused = self.ingest.refuse(sop_uid, study_uid, status, reason, self._source(None))
        return PartResult(sop_class, sop_uid, study_uid, refused.status, reason=refused.reason)

    @staticmethod
    def _source(expected_study: str | None, client: str = "") -> Source:
        return Source(
            calling_ae_title=STOW_CALLING_AE,
            protocol="STOW-RS",
            envelope="File Meta",
            rejected_log="STOW-RS part %s rejected: %s",
            expected_study=expected_study,
            address=client,
        )

    def _store_part(self, part: _Part, expected_study: str | None, client: str = "") -> PartResult:
        """Store one part as the C-STORE handler stores one request (:mod:`dicom_node.ingest`)."""
        if part.data is None:
            reason = f"part is {printable(part.content_type, 64)}, not application/dicom"
            return self._reject("", "", None, statuses.CANNOT_UNDERSTAND, reason)
        if part.data.rejected is not None or part.data.uids is None:
            exc = part.data.rejected or InstanceRejected("not a DICOM PS3.10 file")
            return self._reject(
                "", "", exc.study_instance_uid, statuses.CANNOT_UNDERSTAND, exc.reason
            )
        incoming = part.data.incoming
        assert incoming is not None  # opened with the File Meta Information
        sop_class, sop_uid, transfer_syntax = part.data.uids
        try:
            result = self.ingest.accept(
                Envelope(sop_class, sop_uid, transfer_syntax),
                _PartPayload(incoming),
                self._source(expected_study, client),
            )
        finally:
            incoming.close()
            incoming.discard()  # published, or removed here
        if isinstance(result, Accepted):
            return PartResult(
                sop_class, sop_uid, result.study_instance_uid, result.status, outcome=result.outcome
            )
        return PartResult(
            sop_class, sop_uid, result.study_instance_uid, result.status, reason=result.reason
        )


class _PartPayload:
    """A STOW-RS part's data set, written to the spool as the request body was read."""

    def __init__(self, incoming: IncomingFile) -> None:
        self.incoming = incoming

    def claim(self) -> bool:
        return True  # the request's own file: no other handler can take it

    def failure(self) -> SpoolFullError | SpoolWriteError | None:
        return self.incoming.failure()

    def header(self, transfer_syntax: str) -> InstanceHeader:
        return read_header(self.incoming, transfer_syntax)

    def dataset(self, transfer_syntax: str, max_bytes: int) -> Dataset | None:
        return read_whole_dataset(self.incoming, transfer_syntax, max_bytes)

    def store(
        self, spool: Spool, study_uid: str, sop_instance_uid: str, *, report: bool = False
    ) -> SpooledInstance:
        return spool.store_incoming(
            study_instance_uid=study_uid,
            sop_instance_uid=sop_instance_uid,
            incoming=self.incoming,
            report=report,
        )


def _content_length(headers: Mapping[str, str]) -> int | None:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return None
    text = headers.get("content-length", "").strip()
    if not text:
        raise StowRefused(411, "Content-Length or chunked Transfer-Encoding required")
    if not (text.isascii() and text.isdigit()):  # "5³" passes isdigit() alone
        raise StowRefused(400, "invalid Content-Length")
    return int(text)


def _json(obj: Any) -> bytes:
    import json

    return json.dumps(obj, separators=(",", ":")).encode()


def _error_body(reason: str) -> bytes:
    return _json({"status": "refused", "reason": reason})
