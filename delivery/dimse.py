"""The DICOM destination: outbound C-STORE and C-ECHO, d2r's only outbound association code.

:func:`send_datasets` opens one association per call, proposes exactly the SOP
classes of the data sets with Explicit and Implicit VR Little Endian, and checks
every response. Errors are classified for the caller's retry policy:

* :class:`~delivery.errors.TransientSendError` - connection refused, association
  rejected or aborted, no response within the timeouts, or the peer answered
  ``Refused: Out of Resources`` (0xA7xx, a condition that passes);
* :class:`~delivery.errors.PermanentSendError` - the peer does not accept the SOP
  class, the data set cannot be encoded, or any other failure status.

Warning statuses (0xB000 range, 0x0001, ...) count as delivered and are logged.

A destination marked ``tls`` (``tls://AET@host:port``) is reached over DICOM TLS
(:func:`client_ssl_context`): TLS 1.2 or newer, the server certificate verified against
``D2R_TLS_CA`` (else the system trust store) and its name checked against the destination
host; our certificate and key, when configured, are presented as the client certificate.
A failed handshake is a transient error (retried, then ``failed`` with the reason).

With an :class:`AssociationPool` the association outlives the call: the next study's reports
to the same peer go over it, and it is released after it has been idle for a while (or when
the worker stops). For a second after it is given back it is as quick to send as one in use
(the next study of a burst); then its connection is polled slowly, so that an idle worker
costs almost no CPU and the first send after a lull waits up to one slow poll. A pooled
association the peer has dropped meanwhile is discarded and the reports are sent once more
over a new one; a failure of a new association is classified as above. Reports given as
files (the results folder) are sent as written, without decoding and encoding them again,
when the peer accepted their transfer syntax.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association

from d2r_core import statuses
from d2r_core.config import TlsSettings
from d2r_core.tcp import no_delay, quick_ack
from delivery.destinations import Delivered, DeliveredItem, DicomPeer, StudyResults
from delivery.errors import PermanentSendError, TransientSendError
from dicom_node.settings import NodeSettings

__all__ = [
    "AssociationPool",
    "DicomDestination",
    "SendOptions",
    "client_ssl_context",
    "echo",
    "send_datasets",
]

logger = logging.getLogger(__name__)

_VERIFICATION = "1.2.840.10008.1.1"
_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
# A C-STORE given a file path sends the file's data set bytes as they are (pynetdicom reads
# them in chunks); only this module sends by path.
_config.STORE_SEND_CHUNKED_DATASET = True


@dataclass(frozen=True)
class SendOptions:
    """Association parameters of the sender (seconds and bytes)."""

    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu: int = 131072
    #: certificate, key and CA for destinations reached over TLS
    tls: TlsSettings = field(default_factory=TlsSettings)

    @classmethod
    def from_settings(cls, settings: NodeSettings) -> SendOptions:
        """Take the timeouts, PDU size and TLS files from the node settings."""
        return cls(
            acse_timeout=settings.acse_timeout,
            dimse_timeout=settings.dimse_timeout,
            network_timeout=settings.network_timeout,
            max_pdu=settings.max_pdu,
            tls=settings.tls,
        )


def client_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The sender's TLS context: verify the server (``tls.ca`` or the system store).

    Raises
    ------
    ssl.SSLError, OSError
        When a configured file cannot be loaded.
    """
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=None if tls.ca is None else str(tls.ca)
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert is not None and tls.key is not None:
        context.load_cert_chain(certfile=tls.cert, keyfile=tls.key)
    return context


def _ae(ae_title: str, options: SendOptions) -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = options.acse_timeout
    ae.dimse_timeout = options.dimse_timeout
    ae.network_timeout = options.network_timeout
    ae.maximum_pdu_size = options.max_pdu
    return ae


def _associate(ae: AE, destination: DicomPeer, options: SendOptions) -> Association:
    try:
        tls_args = None
        if destination.tls:
            tls_args = (client_ssl_context(options.tls), destination.host)
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, no_delay), (evt.EVT_CONN_OPEN, quick_ack)],
        )
    except OSError as exc:  # e.g. name resolution, unreadable TLS files (ssl.SSLError)
        raise TransientSendError(f"{destination.name}: {exc}") from exc
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise TransientSendError(f"{destination.name}: association rejected")
    if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
        refused = ", ".join(sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts}))
        raise PermanentSendError(
            f"{destination.name} accepts none of the SOP classes {refused}",
            status=statuses.SOP_CLASS_NOT_SUPPORTED,
        )
    if assoc.is_aborted:
        raise TransientSendError(f"{destination.name}: association aborted")
    raise TransientSendError(f"{destination.name}: no association (connection failed or timed out)")


def send_datasets(
    datasets: Sequence[Dataset],
    destination: DicomPeer,
    *,
    ae_title: str,
    options: SendOptions | None = None,
    files: Sequence[str | Path] = (),
    pool: AssociationPool | None = None,
) -> list[int]:
    """C-STORE ``datasets`` to ``destination`` over one association.

    Parameters
    ----------
    datasets : sequence of Dataset
        Complete data sets (e.g. Structured Reports), each with SOPClassUID and
        SOPInstanceUID, encoded in or convertible to a little endian uncompressed syntax.
    destination : DicomPeer
        The peer.
    ae_title : str
        Our calling AE title.
    options : SendOptions, optional
        Timeouts and PDU size.
    files : sequence of str or Path, optional
        The files ``datasets`` were read from, in the same order: their bytes are sent when
        the peer accepted the file's transfer syntax.
    pool : AssociationPool, optional
        Take the association from (and give it back to) this pool; without, the association
        is opened and released here.

    Returns
    -------
    list of int
        The status of each C-STORE, all success or warning.

    Raises
    ------
    TransientSendError, PermanentSendError
        See the module docstring. Nothing after the first failing data set is sent.
    """
    if not datasets:
        return []
    if files and len(files) != len(datasets):
        raise ValueError("files must name the file of each data set")
    opts = options or SendOptions()
    sop_classes = tuple(dict.fromkeys(str(ds.SOPClassUID) for ds in datasets))
    if pool is None:
        assoc = _open(ae_title, sop_classes, destination, opts)
        try:
            return _store_all(assoc, datasets, files, destination)
        finally:
            _close(assoc)
    key = _PoolKey(destination, ae_title, opts, sop_classes)
    while True:
        assoc, reused = pool.take(key)
        results: list[int] = []
        try:
            results = _store_all(assoc, datasets, files, destination, results)
        except TransientSendError as exc:
            pool.discard(assoc)
            if reused and not results:  # the peer dropped it while it idled: a new one
                logger.info("association to %s lost while idle (%s); reopening", key.name, exc)
                continue
            raise
        except BaseException:
            pool.discard(assoc)
            raise
        pool.give_back(key, assoc)
        return results


def _open(
    ae_title: str, sop_classes: Sequence[str], destination: DicomPeer, options: SendOptions
) -> Association:
    ae = _ae(ae_title, options)
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class, _TRANSFER_SYNTAXES)
    return _associate(ae, destination, options)


def _close(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
    else:
        assoc.abort()


def _store_all(
    assoc: Association,
    datasets: Sequence[Dataset],
    files: Sequence[str | Path],
    destination: DicomPeer,
    results: list[int] | None = None,
) -> list[int]:
    """C-STORE each data set (its file when given) in order, appending to ``results``."""
    results = [] if results is None else results
    accepted = {
        str(cx.abstract_syntax): str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
    }
    for index, ds in enumerate(datasets):
        source: Dataset | Path = ds
        if files:
            path = Path(files[index])
            transfer_syntax = accepted.get(str(ds.SOPClassUID))
            try:
                same = str(read_file_meta_info(path).TransferSyntaxUID) == transfer_syntax
            except (OSError, AttributeError, ValueError):  # pydicom's errors: send ``ds``
                same = False
            source = path if same else ds
        results.append(_store_one(assoc, ds, destination, set(accepted), source))
    return results


#: seconds between polls of a connection in use (pynetdicom's own delay)
_ACTIVE_POLL_SECONDS = 0.001
#: seconds between polls of a parked association's connection, once it has cooled
_PARKED_POLL_SECONDS = 0.05
#: how long a parked association keeps polling as fast as one in use: a request made while
#: the connection's reactor sleeps waits until it wakes, so the next study of a burst would
#: wait up to :data:`_PARKED_POLL_SECONDS` for its first PDU to leave
_HOT_SECONDS = 1.0
#: how long a parked association's reactor may take to resume before it counts as dead
_RESUME_SECONDS = 2.0


def _park(assoc: Association) -> None:
    """Pause the association's reactor (as pynetdicom does around its own requests) while it
    waits for the next send; its connection is still polled at the active rate."""
    assoc._reactor_checkpoint.clear()
    assoc.dul._run_loop_delay = _ACTIVE_POLL_SECONDS


def _cool(assoc: Association) -> None:
    """Let a parked association cost (almost) no CPU: its connection is polled every
    :data:`_PARKED_POLL_SECONDS` instead of every millisecond, enough to notice that the
    peer closed it."""
    assoc.dul._run_loop_delay = _PARKED_POLL_SECONDS


def _unpark(assoc: Association) -> bool:
    """Resume a parked association; whether it is still usable."""
    assoc.dul._run_loop_delay = _ACTIVE_POLL_SECONDS
    assoc._reactor_checkpoint.set()
    return bool(
        _reactor_running(assoc)
        and assoc.is_established
        and assoc.dul.is_alive()
        and not assoc.acse.is_aborted()
    )


def _reactor_running(assoc: Association) -> bool:
    """Wait until the association's reactor has run since it was last let go.

    pynetdicom pauses the reactor around each request and takes "paused" for granted as soon
    as the flag says so; right after the previous request (or after parking) the flag is
    still set while the reactor has yet to wake up, and it then wakes during the request and
    takes its response off the queue ("Received unexpected C-STORE service message"): the
    request waits for it until the DIMSE timeout. The faster a peer answers, the likelier.
    """
    deadline = time.monotonic() + _RESUME_SECONDS
    while assoc._is_paused and assoc.is_alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0001)
    return not assoc._is_paused


@dataclass(frozen=True)
class _PoolKey:
    """Associations are shared by peer, calling AE title, options and SOP classes."""

    destination: DicomPeer
    ae_title: str
    options: SendOptions
    sop_classes: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.destination.name


class AssociationPool:
    """Established associations kept between sends, at most one idle per peer and SOP classes.

    :meth:`take` returns an idle association (``reused``) or opens one; :meth:`give_back`
    parks it again, :meth:`discard` ends it. A daemon thread slows the polling of an
    association idle for :data:`_HOT_SECONDS` and releases one idle for ``idle_seconds``;
    :meth:`close` releases every idle one (and later gives-back end theirs).
    The pool belongs to the process that made it: a forked child starts empty.
    """

    def __init__(self, idle_seconds: float = 10.0) -> None:
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._idle: dict[_PoolKey, tuple[Association, float]] = {}
        self._closed = False
        self._reaper: threading.Thread | None = None
        self._wake = threading.Event()
        #: associations opened by this pool (for logs and tests)
        self.opened = 0

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # never use a parent's sockets
            self._pid = os.getpid()
            self._idle = {}
            self._reaper = None
            self._wake = threading.Event()

    def take(self, key: _PoolKey) -> tuple[Association, bool]:
        """An established association for ``key`` and whether it was reused.

        Raises
        ------
        TransientSendError, PermanentSendError
            As :func:`send_datasets` when a new association cannot be made.
        """
        with self._lock:
            self._check_pid()
            parked = self._idle.pop(key, None)
        if parked is not None:
            assoc, _ = parked
            if _unpark(assoc):
                return assoc, True
            self.discard(assoc)
        assoc = _open(key.ae_title, key.sop_classes, key.destination, key.options)
        with self._lock:
            self.opened += 1
        return assoc, False

    def give_back(self, key: _PoolKey, assoc: Association) -> None:
        """Park ``assoc`` for the next send (or end it: pool closed, reuse off, dropped)."""
        surplus: Association | None = assoc
        with self._lock:
            self._check_pid()
            if not self._closed and self.idle_seconds > 0 and assoc.is_established:
                surplus = None
                _park(assoc)
                previous = self._idle.get(key)
                self._idle[key] = (assoc, time.monotonic())
                if previous is not None:  # two were in use at once: keep the newer one
                    surplus = previous[0]
                self._start_reaper()
        if surplus is not None:
            _close(surplus)

    def discard(self, assoc: Association) -> None:
        """End ``assoc`` (released, or aborted when it is no longer established)."""
        try:
            _unpark(assoc)
            _close(assoc)
        except Exception:  # already torn down by the peer or the reactor
            logger.debug("closing a failed association", exc_info=True)

    def _start_reaper(self) -> None:
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(
                target=self._reap, args=(self._wake,), name="d2r-associations", daemon=True
            )
            self._reaper.start()

    def _reap(self, wake: threading.Event) -> None:
        while not wake.wait(max(0.05, min(self.idle_seconds / 4, _HOT_SECONDS / 2))):
            now = time.monotonic()
            with self._lock:  # under the lock: a taken association is never cooled
                expired = [
                    k for k, (_, since) in self._idle.items() if now - since >= self.idle_seconds
                ]
                ended = [self._idle.pop(k)[0] for k in expired]
                for assoc, since in self._idle.values():
                    if now - since >= _HOT_SECONDS:
                        _cool(assoc)
                done = not self._idle
                if done:
                    self._reaper = None
            for assoc in ended:
                self.discard(assoc)
            if done:
                return

    def close(self) -> None:
        """Release every idle association; associations in use end when given back."""
        with self._lock:
            self._check_pid()
            self._closed = True
            ended = [assoc for assoc, _ in self._idle.values()]
            self._idle = {}
            self._wake.set()
        for assoc in ended:
            self.discard(assoc)

    def idle(self) -> int:
        """How many associations are parked now."""
        with self._lock:
            return 0 if self._pid != os.getpid() else len(self._idle)


def _store_one(
    assoc: Association,
    ds: Dataset,
    destination: DicomPeer,
    accepted: set[str],
    source: Dataset | Path | None = None,
) -> int:
    sop_class = str(ds.SOPClassUID)
    sop_instance = str(ds.SOPInstanceUID)
    if sop_class not in accepted:
        raise PermanentSendError(
            f"{destination.name} does not accept SOP class {sop_class}",
            status=statuses.SOP_CLASS_NOT_SUPPORTED,
        )
    if not assoc.is_established:
        raise TransientSendError(f"{destination.name}: association lost")
    _reactor_running(assoc)
    try:
        response: Any = assoc.send_c_store(ds if source is None else source)
    except (ValueError, AttributeError, TypeError) as exc:
        raise PermanentSendError(f"cannot encode SOP Instance {sop_instance}: {exc}") from exc
    except (RuntimeError, OSError) as exc:
        raise TransientSendError(f"{destination.name}: {exc}") from exc
    if "Status" not in response:
        raise TransientSendError(
            f"{destination.name}: no response for SOP Instance {sop_instance} "
            "(timeout or association aborted)"
        )
    status = int(response.Status)
    if statuses.is_success(status):
        logger.info("sent SOP Instance %s to %s", sop_instance, destination.name)
        return status
    if statuses.is_warning(status):
        logger.warning(
            "SOP Instance %s stored by %s with %s",
            sop_instance,
            destination.name,
            statuses.status_name(status),
        )
        return status
    message = f"{destination.name} answered {statuses.status_name(status)} for {sop_instance}"
    if status & 0xFF00 == statuses.OUT_OF_RESOURCES:
        raise TransientSendError(message)
    raise PermanentSendError(message, status=status)


def echo(destination: DicomPeer, *, ae_title: str, options: SendOptions | None = None) -> int:
    """C-ECHO ``destination`` and return its status.

    Raises
    ------
    TransientSendError
        When no association can be made or no response arrives.
    """
    opts = options or SendOptions()
    ae = _ae(ae_title, opts)
    ae.add_requested_context(_VERIFICATION)
    assoc = _associate(ae, destination, opts)
    try:
        response: Any = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    if "Status" not in response:
        raise TransientSendError(f"{destination.name}: no C-ECHO response")
    return int(response.Status)


@dataclass(frozen=True)
class DicomDestination:
    """C-STORE of every report to one peer over one association (see :func:`send_datasets`),
    taken from ``pool`` when one is given."""

    peer: DicomPeer
    ae_title: str
    options: SendOptions = field(default_factory=SendOptions)
    kind: str = "dicom"
    #: reuse associations across studies (None: one association per send)
    pool: AssociationPool | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """The peer's ``[tls://]AET@host:port``."""
        return self.peer.name

    def send(self, results: StudyResults) -> Delivered:
        """Store the reports; each acknowledged SR is an item with its DIMSE status."""
        codes = send_datasets(
            results.reports,
            self.peer,
            ae_title=self.ae_title,
            options=self.options,
            files=results.files,
            pool=self.pool,
        )
        items = tuple(
            DeliveredItem(str(ds.SOPInstanceUID), f"0x{code:04X}", str(ds.SOPClassUID))
            for ds, code in zip(results.reports, codes, strict=True)
        )
        warnings = [statuses.status_name(c) for c in codes if statuses.is_warning(c)]
        return Delivered(items, warning="; ".join(warnings) or None)
