"""Delivery: the results of a study sent to every configured destination.

One interface, :class:`~delivery.destinations.Destination`, whose ``send`` takes a study's
reports and returns what the peer acknowledged or raises a transient or permanent
:class:`~delivery.errors.SendError`. :func:`open_destination` picks the sender by the address's
kind. The worker owns retries, the study database, metrics and audit; this package only talks
to peers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from delivery.destinations import (
    Delivered,
    DeliveredItem,
    Destination,
    DestinationAddress,
    DicomPeer,
    StudyResults,
)
from delivery.settings import DeliverySettings

if TYPE_CHECKING:
    from delivery.dimse import AssociationPool

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


def open_destination(
    address: DestinationAddress,
    settings: DeliverySettings,
    *,
    associations: AssociationPool | None = None,
) -> Destination:
    """The sender for ``address``; a DICOM sender takes its associations from
    ``associations`` (a :class:`delivery.dimse.AssociationPool`) when given.

    Raises
    ------
    ConfigError
        When the kind of destination has no sender in this release, or a credential file
        named in the address cannot be read.
    """
    from delivery.destinations import DicomPeer as _DicomPeer
    from delivery.destinations import HttpEndpoint
    from delivery.destinations import MllpPeer as _MllpPeer

    # Each sender imports its client library here, so a process that never sends (the DICOM
    # node) loads none of them.
    if isinstance(address, _DicomPeer):
        from delivery.dimse import DicomDestination

        return DicomDestination(address, settings.ae_title, settings.options, pool=associations)
    if isinstance(address, _MllpPeer):
        from delivery.hl7 import Hl7Destination  # hl7apy loads only where HL7 is sent

        return Hl7Destination(address, settings.ae_title, settings.timeout, settings.tls)
    if isinstance(address, HttpEndpoint) and address.kind == "dicomweb":
        from delivery.dicomweb import DicomwebDestination
        from delivery.http import open_session

        session = open_session(address, settings.tls)
        return DicomwebDestination(address, session, settings.timeout)
    if isinstance(address, HttpEndpoint) and address.kind == "fhir":
        from delivery.fhir import FhirDestination
        from delivery.http import open_session

        session = open_session(address, settings.tls)
        return FhirDestination(address, session, settings.timeout)
    from d2r_core.errors import ConfigError

    raise ConfigError("D2R_DESTINATIONS", f"no sender for {address.kind} destinations yet")
