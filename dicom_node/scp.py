"""The Storage SCP: receive C-STORE requests, spool them, record them, answer honestly.

The C-STORE handler returns fast. The data set is streamed into the spool while its PDVs
arrive (:func:`stream_to_spool`: pynetdicom's chunked receive writes into a
:class:`~dicom_node.spool.IncomingFile`, which hashes the bytes on the way); the handler then
parses the routing header from that file (no pixel data), makes it durable through
:meth:`~dicom_node.spool.Spool.store_incoming` (fsync, atomic rename, directory fsync),
records the instance in the study database and only then returns Success. A data set no
handler took is removed however its association ends (:func:`stream_to_spool`). The checks,
the spooling and the recording are the ingest service's (:mod:`dicom_node.ingest`), shared with
STOW-RS; failures map to specific statuses, never to Success:

===============================================  ===============================================
condition                                        status
===============================================  ===============================================
spool below the free-space guard, ENOSPC/EDQUOT  ``OUT_OF_RESOURCES`` (0xA700)
unreadable header, missing Study/SOP UIDs        ``CANNOT_UNDERSTAND`` (0xC000)
data set SOP class differs from the request      ``DATASET_DOES_NOT_MATCH_SOP_CLASS`` (0xA900)
SOP class not accepted                           ``SOP_CLASS_NOT_SUPPORTED`` (0x0122)
other write error, database error, anything else ``PROCESSING_FAILURE`` (0x0110)
===============================================  ===============================================

Every refusal except a processing failure is also recorded with ``record_rejection``.

Secondary Capture policy: SC images are accepted and stored whatever their header
says; :mod:`dicom_node.selection` uses one only when its Modality is CR/DX and its
body part is chest-like. A non-chest SC is therefore stored and its study later
skipped with a recorded reason, rather than refused: a PACS forwarding a whole study
would otherwise see failures and retry forever for objects the node simply ignores.

Other storage SOP classes (a CT, a lateral, the SRs of a study the PACS forwards whole,
our own reports included) are accepted, stored and recorded too; the study is then skipped
or the object ignored by :mod:`dicom_node.selection`, with the reason on the study's
timeline. Refusing them would fail the PACS's whole transfer job. A Structured Report that the
node's report intake takes (the radiologist's signed report, :mod:`dicom_node.ingest`) is
stored under the spool's ``reports/`` and recorded as the study's signed report instead: it
is no instance of the study and leaves the study's state alone.

A re-sent instance with identical content is answered Success (outcome
``duplicate``); one with different content is quarantined by the spool and also
answered Success (outcome ``conflict``), since it is persisted and recorded.

Association control, before any data is accepted (each rejection is logged with its reason
and reported to ``on_rejected``, which counts and audits it):

=========================================  =====================================================
condition                                  A-ASSOCIATE-RJ (result, source, diagnostic)
=========================================  =====================================================
peer address outside ``allowed_networks``  permanent, service user, no reason given (checked in
                                           ``EVT_REQUESTED``, before negotiation)
calling AE not in ``allowed_calling_aets`` permanent, service user, calling AE not recognised
called AE is not ours                      permanent, service user, called AE not recognised
``max_associations`` already open          transient, service provider, local limit exceeded
=========================================  =====================================================

Memory per association is bounded whatever the peer sends (:func:`bound_association`): a PDU
longer than ``max(max_pdu, MAX_ASSOCIATE_PDU)`` closes the connection before it is read
(pynetdicom would allocate whatever length the PDU header claims, up to 4 GiB), and a command
set over :data:`MAX_COMMAND_SET`, a data set received in memory (anything but a C-STORE
data set, which streams to the spool) over :data:`MAX_IN_MEMORY_DATA_SET`, or more than
:data:`MAX_PENDING_MESSAGES` requests waiting for the handler abort the association. UIDs and
other peer text are logged through :func:`~dicom_node.spool.printable_uid` and
:func:`~dicom_node.spool.printable` only.

With ``settings.tls`` carrying a certificate and key the listener speaks DICOM TLS only
(:func:`server_ssl_context`); ``require_client_cert`` makes the TLS handshake itself refuse
a client without a certificate signed by the configured CA.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import socket
import ssl
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import pynetdicom.dimse_messages
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.presentation import PresentationContext

from d2r_core import statuses
from d2r_core.config import IPNetwork
from d2r_core.tcp import large_reads, no_delay
from dicom_node.errors import SpoolFullError, SpoolWriteError
from dicom_node.ingest import (
    STORAGE_SOP_CLASSES,
    Accepted,
    Envelope,
    IngestService,
    ReportIntake,
    Source,
    StudyRecorder,
    read_header,
    read_whole_dataset,
)
from dicom_node.metadata import InstanceHeader, parse_header, read_document
from dicom_node.priority import PriorityPolicy
from dicom_node.settings import NodeSettings
from dicom_node.shared_port import start_shared_server
from dicom_node.spool import (
    IncomingFile,
    Spool,
    SpooledInstance,
    printable,
    printable_uid,
)

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

__all__ = [
    "PEER_NOT_ALLOWED",
    "AssociationRejected",
    "AssociationStudies",
    "bound_association",
    "build_ae",
    "listener_contexts",
    "event_handlers",
    "handle_association_request",
    "handle_echo",
    "handle_store",
    "peer_allowed",
    "server_ssl_context",
    "start_server",
    "stream_to_spool",
]

logger = logging.getLogger(__name__)

VERIFICATION: Final = "1.2.840.10008.1.1"
#: A-ASSOCIATE-RJ result "rejected (permanent)" (PS3.8 Table 9-21).
REJECTED_PERMANENT: Final = 0x01
#: A-ASSOCIATE-RJ source "DICOM UL service-user".
SOURCE_SERVICE_USER: Final = 0x01
#: A-ASSOCIATE-RJ diagnostic "no-reason-given" (service-user source).
DIAGNOSTIC_NO_REASON_GIVEN: Final = 0x01
#: reason token of an association refused for its peer address
PEER_NOT_ALLOWED: Final = "peer_address_not_allowed"

#: Called with the association and a reason token for a rejection made by this module.
AssociationRejected = Callable[[Any, str], None]

#: Longest PDU read whatever ``max_pdu`` says: an A-ASSOCIATE-RQ (every presentation context and
#: a user identity) fits well within it.
MAX_ASSOCIATE_PDU: Final = 1024 * 1024
#: Longest command set (one is a few hundred bytes).
MAX_COMMAND_SET: Final = 64 * 1024
#: Longest data set received in memory: no service the node offers but C-STORE, whose data set
#: streams to the spool, carries one.
MAX_IN_MEMORY_DATA_SET: Final = 1024 * 1024
#: Most requests of one association received and waiting for the handler (peers send one at a
#: time: the node negotiates no asynchronous operations window).
MAX_PENDING_MESSAGES: Final = 16


class AssociationLedger(Protocol):
    """What :class:`AssociationStudies` needs from :class:`studydb.store.StudyStore`."""

    def open_association(self, study_uid: str) -> None: ...

    def close_association(self, study_uids: Sequence[str], *, released: bool) -> None: ...


class AssociationStudies:
    """Which open associations brought instances of which studies, kept in the study database.

    The C-STORE handler calls :meth:`stored` after an instance was recorded; the first instance
    of a study in an association counts that association as open for the study. When the
    association is released (``EVT_RELEASED``) each of its studies is told so, and a study
    whose last open association this was may complete after the release grace period; an
    aborted or cut association only stops counting. ``on_released`` is called after a release
    was recorded (the assembler then looks again when the grace period ends).
    """

    def __init__(
        self, ledger: AssociationLedger, *, on_released: Callable[[], None] | None = None
    ) -> None:
        self._ledger = ledger
        self._on_released_cb = on_released
        self._lock = threading.Lock()
        self._studies: dict[int, list[str]] = {}

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_ended),
        ]

    def _on_open(self, event: evt.Event) -> None:
        # an association whose DUL thread died sends neither EVT_ABORTED nor EVT_CONN_CLOSE:
        # it stops counting when its own thread exits (a second end is a no-op)
        assoc = event.assoc
        on_thread_exit(assoc, lambda: self._end(assoc, released=False))

    def stored(self, assoc: Any, study_uid: str) -> None:
        """An instance of ``study_uid`` was recorded on ``assoc`` (its C-STORE thread)."""
        with self._lock:
            studies = self._studies.setdefault(id(assoc), [])
            if study_uid in studies:
                return
        try:
            self._ledger.open_association(study_uid)
        except Exception:  # the study then completes by its quiet period
            logger.exception("could not count the association of study %s", study_uid)
            return
        with self._lock:
            self._studies.setdefault(id(assoc), []).append(study_uid)

    def _end(self, assoc: Any, *, released: bool) -> None:
        with self._lock:
            studies = self._studies.pop(id(assoc), [])
        if not studies:
            return
        try:
            self._ledger.close_association(studies, released=released)
            if released and self._on_released_cb is not None:
                self._on_released_cb()
        except Exception:
            logger.exception(
                "could not record the end of an association (%d studies)", len(studies)
            )

    def _on_released(self, event: evt.Event) -> None:
        self._end(event.assoc, released=True)

    def _on_ended(self, event: evt.Event) -> None:
        self._end(event.assoc, released=False)


class _Stream:
    """The spool an association's data sets stream into, and those no handler took yet."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.unclaimed: list[IncomingFile] = []
        self._lock = threading.Lock()
        self._ended = False

    def open(self) -> IncomingFile:
        incoming = self.spool.incoming()
        with self._lock:
            if not self._ended:
                self.unclaimed = [f for f in self.unclaimed if not f.claimed]
                self.unclaimed.append(incoming)
                return incoming
        incoming.abandon()  # the association ended: what still arrives is dropped
        return incoming

    def end(self) -> None:
        """Remove the data sets no handler took; any later one is removed as it opens."""
        with self._lock:
            self._ended = True
            unclaimed, self.unclaimed = self.unclaimed, []
        for incoming in unclaimed:
            incoming.abandon()


#: DUL reactor thread of each open association -> its stream (pynetdicom decodes PDVs there)
_STREAMS: weakref.WeakKeyDictionary[Any, _Stream] = weakref.WeakKeyDictionary()
_STREAMS_LOCK = threading.Lock()
_ORIGINAL_TEMPORARY_FILE = tempfile.NamedTemporaryFile  # what pynetdicom's module imports


def _data_set_file(*args: Any, **kwargs: Any) -> Any:
    """Where pynetdicom's chunked receive writes a C-STORE data set (called in the DUL thread).

    An association of a listener started by :func:`start_server` gets a file in its spool's
    ``tmp/``; any other falls back to pynetdicom's own temporary file.
    """
    with _STREAMS_LOCK:
        stream = _STREAMS.get(threading.current_thread())
    if stream is None:
        return _ORIGINAL_TEMPORARY_FILE(*args, **kwargs)
    return stream.open()


def enable_streaming() -> None:
    """Turn on pynetdicom's chunked receive (process-wide) with :func:`_data_set_file`.

    pynetdicom offers the chunked receive only as a module setting and opens the file itself,
    so both are set here; an association without :func:`stream_to_spool` keeps pynetdicom's
    behaviour. Idempotent.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    setattr(pynetdicom.dimse_messages, "NamedTemporaryFile", _data_set_file)  # noqa: B010


#: seconds the end of an association's thread waits for its DUL thread to stop
DUL_STOP_SECONDS: Final = 5.0


def stream_to_spool(event: evt.Event, spool: Spool) -> None:
    """``EVT_CONN_OPEN``: stream this association's data sets into ``spool`` as they arrive.

    The data sets no handler took are removed when the connection closes (:func:`_end_stream`)
    and, whatever way the association ends (release, abort, the peer gone, its DUL thread or
    its own thread dying on an exception), when the association's thread exits.
    """
    assoc: Any = event.assoc
    stream = _Stream(spool)
    with _STREAMS_LOCK:
        _STREAMS[assoc.dul] = stream
    on_thread_exit(assoc, lambda: _finish(assoc, stream))


def on_thread_exit(assoc: Any, callback: Callable[[], None]) -> None:
    """Call ``callback`` when the thread of ``assoc`` exits, however it ends (from an
    ``EVT_CONN_OPEN`` handler: pynetdicom starts that thread right after the event)."""
    run = assoc.run

    def run_then_callback() -> None:
        try:
            run()
        finally:
            callback()

    assoc.run = run_then_callback


def _finish(assoc: Any, stream: _Stream) -> None:
    """The association's thread exits: stop its DUL thread if it still runs, end its stream."""
    dul = assoc.dul
    try:
        if dul.is_alive():  # pynetdicom stops it on every ordinary way out: this one raised
            dul.kill_dul()
            dul.join(DUL_STOP_SECONDS)
            transport = getattr(dul, "socket", None)
            if transport is not None:
                transport.close()
    except Exception:
        logger.exception("could not stop the DUL of an ended association")
    finally:
        with _STREAMS_LOCK:
            _STREAMS.pop(dul, None)
        stream.end()


def _end_stream(event: evt.Event) -> None:
    """``EVT_CONN_CLOSE``: remove the data sets no handler took (cut off, or still queued)."""
    with _STREAMS_LOCK:
        stream = _STREAMS.get(event.assoc.dul)
    if stream is not None:
        stream.end()


def bound_association(event: evt.Event, max_pdu: int) -> None:
    """``EVT_CONN_OPEN``: bound the memory the peer of this association can make it hold.

    Installs :func:`~d2r_core.tcp.large_reads` with a ceiling: a PDU whose header claims more
    than ``max(max_pdu, MAX_ASSOCIATE_PDU)`` bytes closes the connection before any of it is
    read (``max_pdu`` 0, unlimited, sets no ceiling). Each P-DATA then goes through a check of
    the DIMSE message being assembled (see the module docstring); a peer over a limit gets an
    A-ABORT.
    """
    assoc: Any = event.assoc
    large_reads(event)
    address: Any = getattr(event, "address", None)
    peer = printable(address[0]) if address else "peer"
    transport = getattr(assoc.dul, "socket", None)
    if max_pdu and transport is not None and hasattr(transport, "recv"):
        ceiling = max(max_pdu, MAX_ASSOCIATE_PDU)
        read = transport.recv

        def recv(nr_bytes: int) -> Any:
            if nr_bytes > ceiling:
                logger.warning(
                    "association from %s closed: PDU of %d bytes over %d", peer, nr_bytes, ceiling
                )
                raise OSError(f"PDU of {nr_bytes} bytes over the {ceiling}-byte limit")
            return read(nr_bytes)

        transport.recv = recv
    dimse = assoc.dimse
    receive = dimse.receive_primitive
    state = {"aborted": False}

    def receive_primitive(primitive: Any) -> None:
        if state["aborted"]:
            return  # the A-ABORT is on its way: nothing more is kept
        receive(primitive)
        reason = _over_limit(dimse)
        if reason is not None:
            state["aborted"] = True
            dimse.message = None
            logger.warning("association from %s aborted: %s", peer, reason)
            assoc.dul.event_queue.put("Evt19")  # as pynetdicom answers an invalid message

    dimse.receive_primitive = receive_primitive


def _over_limit(dimse: Any) -> str | None:
    """Why the DIMSE message being assembled breaks a memory limit (None when it does not)."""
    if dimse.msg_queue.qsize() > MAX_PENDING_MESSAGES:
        return f"more than {MAX_PENDING_MESSAGES} requests waiting"
    message = dimse.message
    if message is None:
        return None
    if message.encoded_command_set.tell() > MAX_COMMAND_SET:
        return f"command set over {MAX_COMMAND_SET} bytes"
    in_memory = getattr(message, "_data_set_file", None) is None
    if in_memory and message.data_set.tell() > MAX_IN_MEMORY_DATA_SET:
        return f"data set in memory over {MAX_IN_MEMORY_DATA_SET} bytes"
    return None


def build_ae(settings: NodeSettings) -> AE:
    """Return an AE configured from ``settings`` with Verification and storage contexts.

    Every storage context accepts ``ALL_TRANSFER_SYNTAXES`` (pynetdicom's defaults
    would accept uncompressed data only). The called AE title must match.
    """
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.require_called_aet = True
    ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    return ae


class SharedSyntaxContext(PresentationContext):
    """A supported presentation context whose copies share its (immutable) UIDs.

    pynetdicom gives every incoming association a ``copy.deepcopy`` of the listener's
    supported contexts. With every storage class and every transfer syntax (171 contexts,
    7,654 UIDs) that deep copy cost 50-120 ms of CPU per association, more than receiving a
    one-image study. A copy of this context is a plain :class:`PresentationContext` holding
    the same UID objects in new lists: what the association may change is its own, and
    nothing else is copied.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> PresentationContext:
        copied = PresentationContext()
        for name, value in vars(self).items():
            setattr(copied, name, list(value) if isinstance(value, list) else value)
        return copied


def listener_contexts(ae: AE) -> list[PresentationContext]:
    """``ae``'s supported contexts as :class:`SharedSyntaxContext` items, for the listener."""
    contexts: list[PresentationContext] = []
    for cx in ae.supported_contexts:
        shared = SharedSyntaxContext()
        for name, value in vars(cx).items():
            setattr(shared, name, list(value) if isinstance(value, list) else value)
        contexts.append(shared)
    return contexts


def server_ssl_context(settings: NodeSettings) -> ssl.SSLContext | None:
    """The listener's TLS context, or None when no certificate and key are configured.

    TLS 1.2 or newer. With a CA the client certificate is verified when presented, and
    required with ``require_client_cert``.

    Raises
    ------
    ssl.SSLError, OSError
        When the certificate, key or CA cannot be loaded.
    """
    tls = settings.tls
    if tls.cert is None or tls.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=tls.cert, keyfile=tls.key)
    if tls.ca is not None:
        context.load_verify_locations(cafile=tls.ca)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def peer_allowed(address: str, networks: Sequence[IPNetwork]) -> bool:
    """Whether ``address`` lies in one of ``networks`` (an empty list allows every address).

    >>> from dicom_node.settings import parse_networks
    >>> peer_allowed("10.1.2.3", parse_networks("10.1.0.0/16")), peer_allowed("10.2.0.1", [])
    (True, True)
    >>> peer_allowed("::ffff:10.9.9.9", parse_networks("10.1.0.0/16"))
    False
    """
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


def handle_association_request(
    event: evt.Event,
    networks: Sequence[IPNetwork],
    on_rejected: AssociationRejected | None = None,
) -> None:
    """``EVT_REQUESTED``: refuse a peer outside ``networks`` before any negotiation.

    Sends A-ASSOCIATE-RJ (permanent, service user, no reason given: the peer learns nothing
    about the policy), logs the address and calls ``on_rejected(assoc, PEER_NOT_ALLOWED)``.
    """
    assoc: Any = event.assoc
    address = str(assoc.requestor.address)
    if peer_allowed(address, networks):
        return
    calling = str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "").strip()
    logger.warning(
        "association from %s (calling AE '%s') rejected: %s",
        printable(address),
        printable(calling, 16),
        PEER_NOT_ALLOWED,
    )
    if on_rejected is not None:  # recorded before the peer learns of it
        try:
            on_rejected(assoc, PEER_NOT_ALLOWED)
        except Exception:
            logger.exception(
                "could not record the rejected association from %s", printable(address)
            )
    assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, DIAGNOSTIC_NO_REASON_GIVEN)
    assoc.kill()  # as pynetdicom does after its own rejections: the DUL waits for the close


def handle_echo(event: evt.Event) -> int:
    """Answer C-ECHO with Success."""
    return statuses.SUCCESS


def _source(
    calling_ae_title: str,
    *,
    called_ae_title: str = "",
    address: str = "",
    dimse_priority: int | None = None,
) -> Source:
    """How the C-STORE handler's refusals are recorded, logged and named, and what the priority
    rules see of the request."""
    return Source(
        calling_ae_title=calling_ae_title,
        protocol="C-STORE",
        envelope="request",
        rejected_log="rejected SOP Instance %s: %s",
        called_ae_title=called_ae_title,
        address=address,
        dimse_priority=dimse_priority,
    )


def _request_source(event: evt.Event, request: Any) -> Source:
    """The :class:`Source` of one C-STORE request: the association's AE titles and peer, and
    the request's Priority."""
    assoc = event.assoc
    priority = getattr(request, "Priority", None)
    return _source(
        str(assoc.requestor.ae_title).strip(),
        called_ae_title=str(assoc.acceptor.ae_title).strip(),
        address=str(assoc.requestor.address or ""),
        dimse_priority=priority if isinstance(priority, int) else None,
    )


class _RequestPayload:
    """A C-STORE data set: streamed into the spool, or held in memory by pynetdicom."""

    def __init__(self, event: evt.Event, request: Any, incoming: IncomingFile | None) -> None:
        self.event = event
        self.request = request
        self.incoming = incoming

    def claim(self) -> bool:
        return self.incoming is None or self.incoming.claim()

    def failure(self) -> SpoolFullError | SpoolWriteError | None:
        return None if self.incoming is None else self.incoming.failure()

    def header(self, transfer_syntax: str) -> InstanceHeader:
        if self.incoming is None:
            return parse_header(_dataset_bytes(self.request), transfer_syntax)
        return read_header(self.incoming, transfer_syntax)

    def dataset(self, transfer_syntax: str, max_bytes: int) -> Dataset | None:
        if self.incoming is None:
            data = io.BytesIO(_dataset_bytes(self.request))
            return read_document(data, transfer_syntax, max_bytes)
        return read_whole_dataset(self.incoming, transfer_syntax, max_bytes)

    def store(
        self, spool: Spool, study_uid: str, sop_instance_uid: str, *, report: bool = False
    ) -> SpooledInstance:
        if self.incoming is not None:
            return spool.store_incoming(
                study_instance_uid=study_uid,
                sop_instance_uid=sop_instance_uid,
                incoming=self.incoming,
                report=report,
            )
        return spool.store(
            study_instance_uid=study_uid,
            sop_instance_uid=sop_instance_uid,
            file_meta=self.event.file_meta,
            dataset=_dataset_bytes(self.request),
            report=report,
        )


def handle_store(
    event: evt.Event,
    spool: Spool,
    store: StudyRecorder,
    associations: AssociationStudies | None = None,
    priority: PriorityPolicy | None = None,
    reports: ReportIntake | None = None,
) -> int:
    """Persist one C-STORE request and return its DIMSE status (:mod:`dicom_node.ingest`).

    Bind with ``(evt.EVT_C_STORE, handle_store, [spool, store])`` (or
    ``[spool, store, associations]`` to count the association of each newly stored instance's
    study for the early-completion rule; ``[spool, store, associations, priority]`` to decide
    priorities with the node's rules; ``[..., priority, reports]`` to take signed-report SRs).
    """
    request: Any = event.request
    incoming = getattr(request, "_dataset_file", None)  # the streamed data set, if any
    try:
        if not isinstance(incoming, IncomingFile):
            incoming = _copy_to_spool(request, spool)
        service = IngestService(spool, store, priority=priority, reports=reports)
        return _store(event, request, incoming, service, associations)
    finally:
        if isinstance(incoming, IncomingFile):  # published, or removed here
            incoming.close()
            incoming.discard()


def _store(
    event: evt.Event,
    request: Any,
    incoming: IncomingFile | None,
    service: IngestService,
    associations: AssociationStudies | None,
) -> int:
    sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
    try:
        envelope = Envelope(
            sop_class_uid=str(request.AffectedSOPClassUID or ""),
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=str(event.context.transfer_syntax),
        )
        source = _request_source(event, request)
    except Exception:
        logger.exception("C-STORE of SOP Instance %s failed", printable_uid(sop_instance_uid))
        return statuses.PROCESSING_FAILURE
    result = service.accept(envelope, _RequestPayload(event, request, incoming), source)
    if isinstance(result, Accepted) and result.outcome == "stored" and associations is not None:
        associations.stored(event.assoc, result.study_instance_uid)
    return result.status


def _dataset_bytes(request: Any) -> bytes | memoryview:
    """The data set of a request pynetdicom received in memory (chunked receive off)."""
    return memoryview(request.DataSet.getbuffer())


def _copy_to_spool(request: Any, spool: Spool) -> IncomingFile | None:
    """A data set in pynetdicom's own temporary file (chunked receive without
    :func:`stream_to_spool`), copied into the spool 1 MiB at a time; None when in memory."""
    path = getattr(request, "_dataset_path", None)
    if path is None:
        return None
    incoming = spool.incoming()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                incoming.write(chunk)
    except OSError as exc:
        incoming.error = incoming.error or exc
    return incoming


def event_handlers(
    spool: Spool,
    store: StudyRecorder,
    *,
    networks: Sequence[IPNetwork] = (),
    on_rejected: AssociationRejected | None = None,
    associations: AssociationStudies | None = None,
    max_pdu: int = 0,
    priority: PriorityPolicy | None = None,
    reports: ReportIntake | None = None,
) -> list[Any]:
    """Return the handler bindings for ``start_server`` (3-tuple form, no globals).

    ``max_pdu``: the listener's Maximum Length Received (see :func:`bound_association`);
    ``priority``: the rules and default each stored instance's priority is decided with;
    ``reports``: where signed-report SRs go (:class:`~dicom_node.ingest.ReportIntake`).
    """
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, no_delay),
        (evt.EVT_CONN_OPEN, bound_association, [max_pdu]),
        (evt.EVT_CONN_OPEN, stream_to_spool, [spool]),
        (evt.EVT_CONN_CLOSE, _end_stream),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [spool, store, associations, priority, reports]),
    ]
    if associations is not None:
        handlers.extend(associations.handlers())
    if networks:
        handlers.append((evt.EVT_REQUESTED, handle_association_request, [networks, on_rejected]))
    return handlers


def start_server(
    settings: NodeSettings,
    spool: Spool,
    store: StudyRecorder,
    *,
    block: bool,
    extra_handlers: Sequence[Any] = (),
    on_rejected: AssociationRejected | None = None,
    associations: AssociationStudies | None = None,
    shared: bool = False,
    inherited: socket.socket | None = None,
    reports: ReportIntake | None = None,
) -> ThreadedAssociationServer | None:
    """Start the listener on ``settings.host:settings.port``.

    Returns the running server when ``block`` is False (stop it with
    ``server.shutdown()``); with ``block=True`` it serves until interrupted and
    returns None. ``on_rejected`` receives the associations refused for their peer
    address (rejections made by pynetdicom itself raise ``EVT_REJECTED``). ``associations``
    counts the open associations of each study (the early-completion rule).

    ``shared``: other listener processes will accept on this port too
    (:mod:`dicom_node.shared_port`); ``inherited``: this process is one of them, serving the
    listening socket it inherited (implies ``shared``; ``block`` must be False). ``reports``
    takes the signed-report SRs (:class:`~dicom_node.ingest.ReportIntake`).
    """
    ae = build_ae(settings)
    enable_streaming()
    context = server_ssl_context(settings)
    logger.info(
        "listening as %s on %s:%d (max PDU %d, %s, calling AEs %s, networks %s)",
        settings.ae_title,
        settings.host,
        settings.port,
        settings.max_pdu,
        "TLS" if context is not None else "no TLS",
        ",".join(settings.allowed_calling_aets) or "any",
        ",".join(str(n) for n in settings.allowed_networks) or "any",
    )
    handlers = event_handlers(
        spool,
        store,
        networks=settings.allowed_networks,
        on_rejected=on_rejected,
        associations=associations,
        max_pdu=settings.max_pdu,
        priority=settings.priority,
        reports=reports,
    )
    if shared or inherited is not None:
        if block:
            raise ValueError("a shared listener runs in a thread (block=False)")
        return start_shared_server(
            ae,
            (settings.host, settings.port),
            inherited=inherited,
            evt_handlers=[*handlers, *extra_handlers],
            ssl_context=context,
            contexts=listener_contexts(ae),
        )
    server: ThreadedAssociationServer | None = ae.start_server(
        (settings.host, settings.port),
        block=block,
        evt_handlers=[*handlers, *extra_handlers],
        ssl_context=context,
        contexts=listener_contexts(ae),
    )
    return server
