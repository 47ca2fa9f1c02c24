"""Delivery configuration: :class:`DeliverySettings`, built once by an entry point.

The destinations come from ``D2R_DESTINATIONS`` (see :mod:`delivery.destinations`); the DICOM
association parameters, the calling AE title and the TLS files are the node's
(``D2R_AE_TITLE``, ``D2R_*_TIMEOUT``, ``D2R_MAX_PDU``, ``D2R_TLS_*``), so one set of
certificates serves DICOM TLS, HTTPS and MLLP over TLS. ``D2R_DICOM_ASSOCIATION_IDLE_SECONDS``
(default 10, 0: off) keeps an association to a DICOM destination open that long for the next
study's reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from d2r_core.config import TlsSettings, non_negative_float, parse_bool
from d2r_core.settings_spec import Group, Setting
from delivery.destinations import (
    DestinationAddress,
    parse_destinations,
    refuse_placeholder_secrets,
)
from delivery.dimse import SendOptions
from dicom_node.settings import NodeSettings

__all__ = ["SETTINGS", "DeliverySettings"]

DESTINATIONS_TLS = Setting(
    "D2R_DESTINATIONS_TLS",
    False,
    parse_bool,
    "send to every destination over TLS (or prefix one with `tls://`)",
    Group.ACCESS,
)
DESTINATIONS: Setting[tuple[DestinationAddress, ...]] = Setting(
    "D2R_DESTINATIONS",
    (),
    lambda t: refuse_placeholder_secrets(parse_destinations(t)),
    "comma-separated destinations: `AET@host:port` or `dicom://AET@host:port` (C-STORE), "
    "`dicom+tls://…` (DICOM TLS), `dicomweb+http(s)://host/path` (STOW-RS of the SRs), "
    "`mllp://host:port` / `mllp+tls://…` (HL7 v2 ORU^R01), `fhir+http(s)://base` (FHIR R4 "
    "transaction Bundle, `docs/fhir.md`); HTTP credentials from a file: `?token_file=PATH` "
    "(bearer) or `?basic_auth_file=PATH` (`user:password`), over `https://` (plain `http://` "
    "only with `&insecure=true`)",
    Group.DELIVERY,
)
DICOM_ASSOCIATION_IDLE_SECONDS = Setting(
    "D2R_DICOM_ASSOCIATION_IDLE_SECONDS",
    10.0,
    non_negative_float,
    "a worker keeps its association to a DICOM destination open this long after a send, for "
    "the next study's SRs (`0`: one association per send); keep it below the PACS's own idle "
    "timeout",
    Group.DELIVERY,
)
#: every setting :class:`DeliverySettings` reads besides the node's
SETTINGS: tuple[Setting[Any], ...] = (
    DESTINATIONS,
    DESTINATIONS_TLS,
    DICOM_ASSOCIATION_IDLE_SECONDS,
)


@dataclass(frozen=True)
class DeliverySettings:
    """Where the results go and how the senders connect."""

    destinations: tuple[DestinationAddress, ...] = ()
    #: our calling AE title (C-STORE) and sending application (HL7 MSH-3)
    ae_title: str = "D2R"
    #: association timeouts, PDU size and TLS files; the HTTP and MLLP senders use
    #: ``network_timeout`` for connect and read and ``tls`` for certificates
    options: SendOptions = field(default_factory=SendOptions)
    #: ``D2R_DICOM_ASSOCIATION_IDLE_SECONDS``: an association to a DICOM destination is kept
    #: this long after a send for the next study's reports (0: one association per send)
    association_idle_seconds: float = DICOM_ASSOCIATION_IDLE_SECONDS.default

    @property
    def tls(self) -> TlsSettings:
        """Certificate, key and trusted CAs for every TLS destination."""
        return self.options.tls

    @property
    def timeout(self) -> float:
        """Seconds to wait for a connection or an answer."""
        return self.options.network_timeout

    @classmethod
    def from_env(cls, env: Mapping[str, str], node: NodeSettings | None = None) -> DeliverySettings:
        """Build from ``D2R_*`` variables (``node``: the already-built node settings).

        Raises
        ------
        ConfigError
            Naming the first invalid setting.
        """
        node = node if node is not None else NodeSettings.from_env(env)
        every_tls = DESTINATIONS_TLS.read(env)
        destinations = DESTINATIONS.read(
            env, parse=lambda t: refuse_placeholder_secrets(parse_destinations(t, tls=every_tls))
        )
        idle = DICOM_ASSOCIATION_IDLE_SECONDS.read(env)
        return cls(
            destinations=destinations,
            ae_title=node.ae_title,
            options=SendOptions.from_settings(node),
            association_idle_seconds=idle,
        )
