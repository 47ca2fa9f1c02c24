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
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association

from delivery.destinations import Delivered, DeliveredItem, DicomPeer, StudyResults
from delivery.errors import PermanentSendError, TransientSendError
from dicom_node import statuses
from dicom_node.settings import NodeSettings, TlsSettings
from dicom_node.tcp import no_delay

__all__ = ["DicomDestination", "SendOptions", "client_ssl_context", "echo", "send_datasets"]

logger = logging.getLogger(__name__)

_VERIFICATION = "1.2.840.10008.1.1"
_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


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
            evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)],
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
    opts = options or SendOptions()
    ae = _ae(ae_title, opts)
    sop_classes = list(dict.fromkeys(str(ds.SOPClassUID) for ds in datasets))
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class, _TRANSFER_SYNTAXES)
    assoc = _associate(ae, destination, opts)
    results: list[int] = []
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        for ds in datasets:
            results.append(_store_one(assoc, ds, destination, accepted))
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    return results


def _store_one(assoc: Association, ds: Dataset, destination: DicomPeer, accepted: set[str]) -> int:
    sop_class = str(ds.SOPClassUID)
    sop_instance = str(ds.SOPInstanceUID)
    if sop_class not in accepted:
        raise PermanentSendError(
            f"{destination.name} does not accept SOP class {sop_class}",
            status=statuses.SOP_CLASS_NOT_SUPPORTED,
        )
    if not assoc.is_established:
        raise TransientSendError(f"{destination.name}: association lost")
    try:
        response: Any = assoc.send_c_store(ds)
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
    """C-STORE of every report to one peer over one association (see :func:`send_datasets`)."""

    peer: DicomPeer
    ae_title: str
    options: SendOptions = field(default_factory=SendOptions)
    kind: str = "dicom"

    @property
    def name(self) -> str:
        """The peer's ``[tls://]AET@host:port``."""
        return self.peer.name

    def send(self, results: StudyResults) -> Delivered:
        """Store the reports; each acknowledged SR is an item with its DIMSE status."""
        codes = send_datasets(
            results.reports, self.peer, ae_title=self.ae_title, options=self.options
        )
        items = tuple(
            DeliveredItem(str(ds.SOPInstanceUID), f"0x{code:04X}", str(ds.SOPClassUID))
            for ds, code in zip(results.reports, codes, strict=True)
        )
        warnings = [statuses.status_name(c) for c in codes if statuses.is_warning(c)]
        return Delivered(items, warning="; ".join(warnings) or None)
