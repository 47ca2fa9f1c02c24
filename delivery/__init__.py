"""Delivery: the results of a study sent to every configured destination.

One interface, :class:`~delivery.destinations.Destination`, whose ``send`` takes a study's
reports and returns what the peer acknowledged or raises a transient or permanent
:class:`~delivery.errors.SendError`. :func:`open_destination` picks the sender by the address's
kind. The worker owns retries, the study database, metrics and audit; this package only talks
to peers.
"""

from __future__ import annotations

from delivery.destinations import (
    Delivered,
    DeliveredItem,
    Destination,
    DestinationAddress,
    DicomPeer,
    StudyResults,
)
from delivery.settings import DeliverySettings

__all__ = [
    "Delivered",
    "DeliveredItem",
    "DeliverySettings",
    "Destination",
    "DestinationAddress",
    "DicomPeer",
    "StudyResults",
    "open_destination",
]


def open_destination(address: DestinationAddress, settings: DeliverySettings) -> Destination:
    """The sender for ``address``.

    Raises
    ------
    ConfigError
        When the kind of destination has no sender in this release.
    """
    from delivery.destinations import DicomPeer as _DicomPeer
    from delivery.destinations import MllpPeer as _MllpPeer

    if isinstance(address, _DicomPeer):
        from delivery.dimse import DicomDestination

        return DicomDestination(address, settings.ae_title, settings.options)
    if isinstance(address, _MllpPeer):
        from delivery.hl7 import Hl7Destination  # hl7apy loads only where HL7 is sent

        return Hl7Destination(address, settings.ae_title, settings.timeout, settings.tls)
    from dicom_node.settings import ConfigError

    raise ConfigError("D2R_DESTINATIONS", f"no sender for {address.kind} destinations yet")
