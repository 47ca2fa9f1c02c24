"""Where the results go: destination addresses parsed from ``D2R_DESTINATIONS``, and the one
interface every sender implements.

``D2R_DESTINATIONS`` is a comma-separated list. Each item is one of

==================================  ========  ===============================================
item                                kind      sender
==================================  ========  ===============================================
``AET@host:port``, ``dicom://…``    dicom     C-STORE of the SRs (:mod:`delivery.dimse`)
``tls://…``, ``dicom+tls://…``      dicom     the same over DICOM TLS
``dicomweb+http(s)://host/path``    dicomweb  STOW-RS of the SRs (:mod:`delivery.dicomweb`)
``mllp://host:port``, ``mllp+tls``  mllp      HL7 v2.5.1 ORU^R01 over MLLP
``fhir+http(s)://host/base``        fhir      FHIR R4 transaction (:mod:`delivery.fhir`)
==================================  ========  ===============================================

An address never holds a secret: a URL with ``user:password@`` is refused. HTTP destinations
read their credentials from files named in the query string (``?token_file=/run/secrets/t`` for
a bearer token, ``?basic_auth_file=/run/secrets/b`` holding ``user:password``); the file is read
when the sender is opened, so a rotated secret needs no restart of the configuration.

Credentials never travel in cleartext by default: a plain ``http://`` destination with a
credential file is refused unless its address says ``?insecure=true`` (for a receiver on the
same host or behind a TLS tunnel). ``insecure`` applies to ``http://`` only: certificate checks
of ``https://`` destinations cannot be turned off. An address or credential file that still
holds the example configuration's ``CHANGE-ME`` placeholder is refused.

A destination's :attr:`~DestinationAddress.name` is its canonical text: the key of its delivery
rows in the study database, of ``d2r retry --destination`` and of the metrics and audit lines.

>>> [a.name for a in parse_destinations("PACS@10.0.0.5:104, mllp://ris:2575")]
['PACS@10.0.0.5:104', 'mllp://ris:2575']
>>> parse_destinations("tls://PACS@pacs.example.org:2762")[0].kind
'dicom'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from pydicom.dataset import Dataset

from delivery.content import ReportContent
from dicom_node.settings import (
    ConfigError,
    parse_bool,
    refuse_placeholder,
    validate_ae_title,
)

__all__ = [
    "KINDS",
    "Delivered",
    "DeliveredItem",
    "Destination",
    "DestinationAddress",
    "DicomPeer",
    "HttpEndpoint",
    "MllpPeer",
    "StudyResults",
    "parse_destinations",
    "refuse_placeholder_secrets",
]

#: every kind of destination, in the order the docs list them
KINDS = ("dicom", "dicomweb", "mllp", "fhir")

_SETTING = "D2R_DESTINATIONS"


@dataclass(frozen=True)
class DicomPeer:
    """A C-STORE peer: ``AET@host:port``; ``tls`` reaches it over DICOM TLS (PS3.15 B.1)."""

    ae_title: str
    host: str
    port: int
    tls: bool = False
    kind: str = "dicom"

    @property
    def name(self) -> str:
        """``AET@host:port`` (``tls://AET@host:port`` over TLS): configuration and logs."""
        plain = f"{self.ae_title}@{self.host}:{self.port}"
        return f"tls://{plain}" if self.tls else plain


@dataclass(frozen=True)
class HttpEndpoint:
    """An HTTP(S) service: a DICOMweb base (``dicomweb``) or a FHIR base (``fhir``).

    ``url`` is the plain ``http(s)://`` base; the credential files come from the query string.
    ``insecure`` allows a credential over plain ``http://``, which is refused otherwise.

    Raises
    ------
    ConfigError
        Naming ``D2R_DESTINATIONS``: a credential over ``http://`` without ``insecure``, or
        ``insecure`` on an ``https://`` base.
    """

    kind: str
    url: str
    token_file: Path | None = None
    basic_auth_file: Path | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.insecure and not self.cleartext:
            raise ConfigError(
                _SETTING,
                f"insecure=true applies to http:// only (it allows credentials in cleartext; "
                f"certificate checks cannot be turned off): {self.name}",
            )
        if self.cleartext and self.has_credentials and not self.insecure:
            raise ConfigError(
                _SETTING,
                f"{self.name} would send its credential in cleartext; use https, or add "
                "insecure=true to the address to accept that",
            )

    @property
    def cleartext(self) -> bool:
        """Whether requests travel without TLS (an ``http://`` base)."""
        return self.url.lower().startswith("http://")

    @property
    def has_credentials(self) -> bool:
        """Whether the sender authenticates (a token or a basic-auth file)."""
        return self.token_file is not None or self.basic_auth_file is not None

    @property
    def name(self) -> str:
        """The address as configured (scheme prefix, base, credential file names, insecure)."""
        query = []
        if self.token_file is not None:
            query.append(f"token_file={self.token_file}")
        if self.basic_auth_file is not None:
            query.append(f"basic_auth_file={self.basic_auth_file}")
        if self.insecure:
            query.append("insecure=true")
        return f"{self.kind}+{self.url}" + (f"?{'&'.join(query)}" if query else "")


@dataclass(frozen=True)
class MllpPeer:
    """An HL7 v2 receiver reached over MLLP (``mllp://host:port``, ``mllp+tls://``)."""

    host: str
    port: int
    tls: bool = False
    kind: str = "mllp"

    @property
    def name(self) -> str:
        """``mllp://host:port`` or ``mllp+tls://host:port``."""
        return f"mllp{'+tls' if self.tls else ''}://{_host_text(self.host)}:{self.port}"


DestinationAddress = DicomPeer | HttpEndpoint | MllpPeer


@dataclass(frozen=True)
class StudyResults:
    """What a destination is given: one study's reports as written to the results folder.

    ``reports`` holds the SRs (TID 1500 first, then the text SR); the HL7 and FHIR senders take
    the text and lesions from ``content`` and the patient and order identifiers from the SR
    headers, so every destination sends the same report.
    """

    study_instance_uid: str
    reports: tuple[Dataset, ...]
    #: the report content written beside the SRs (None: results of an older release)
    content: ReportContent | None = None
    #: the files ``reports`` were read from, in the same order (empty: not from files); the
    #: DICOM sender sends their bytes as written
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeliveredItem:
    """One object a destination acknowledged: an SR, an HL7 message or a FHIR resource."""

    #: SOP Instance UID, HL7 message control ID or FHIR resource reference
    identifier: str
    #: the peer's answer in its own terms ("0x0000", "AA", "201 Created", ...)
    status: str
    #: SOP Class UID for DICOM objects, else the message or resource type
    object_type: str


@dataclass(frozen=True)
class Delivered:
    """A destination's successful outcome: every item it acknowledged, with a warning if any."""

    items: tuple[DeliveredItem, ...]
    warning: str | None = None


class Destination(Protocol):
    """One sender. ``send`` delivers all of a study's results or raises a
    :class:`~delivery.errors.SendError` (transient or permanent); it is safe to repeat, because
    every object's identifier derives from the study and the model version.
    """

    @property
    def name(self) -> str:
        """The destination's canonical address."""
        ...

    @property
    def kind(self) -> str:
        """One of :data:`KINDS`."""
        ...

    def send(self, results: StudyResults) -> Delivered:
        """Deliver ``results``."""
        ...


def _host_text(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _port(text: str | int | None, item: str) -> int:
    try:
        port = int(text) if text is not None else -1
    except ValueError:
        raise ConfigError(_SETTING, f"port must be an integer in {item!r}") from None
    if not 1 <= port <= 65535:
        raise ConfigError(_SETTING, f"expected a port in 1..65535 in {item!r}")
    return port


def _dicom(rest: str, item: str, tls: bool) -> DicomPeer:
    aet, at, hostport = rest.partition("@")
    host, colon, port = hostport.rpartition(":")
    if not at or not colon or not host:
        raise ConfigError(_SETTING, f"expected AET@host:port, got {item!r}")
    return DicomPeer(validate_ae_title(aet, _SETTING), host.strip("[]"), _port(port, item), tls)


def _file(values: dict[str, list[str]], key: str) -> Path | None:
    found = values.pop(key, None)
    return None if not found else Path(found[-1])


def _flag(values: dict[str, list[str]], key: str, item: str) -> bool:
    found = values.pop(key, None)
    try:
        return False if not found else parse_bool(found[-1])
    except ValueError:
        raise ConfigError(_SETTING, f"{key} must be true or false in {item!r}") from None


def _http(kind: str, url: str, item: str) -> HttpEndpoint:
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            _SETTING,
            "credentials in a destination URL are refused; use ?token_file= or "
            "?basic_auth_file= naming a file",
        )
    if not parts.hostname:
        raise ConfigError(_SETTING, f"expected {kind}+http(s)://host/path, got {item!r}")
    values = parse_qs(parts.query, keep_blank_values=True)
    token_file = _file(values, "token_file")
    basic_auth_file = _file(values, "basic_auth_file")
    insecure = _flag(values, "insecure", item)
    if values:
        raise ConfigError(_SETTING, f"unknown query parameter(s) {sorted(values)} in {item!r}")
    if token_file is not None and basic_auth_file is not None:
        raise ConfigError(_SETTING, f"token_file and basic_auth_file exclude each other: {item!r}")
    base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    return HttpEndpoint(
        kind, base, token_file=token_file, basic_auth_file=basic_auth_file, insecure=insecure
    )


def _mllp(rest: str, item: str, tls: bool) -> MllpPeer:
    parts = urlsplit(f"//{rest}")
    if not parts.hostname or parts.path.strip("/") or parts.username is not None:
        raise ConfigError(_SETTING, f"expected mllp://host:port, got {item!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(_SETTING, f"expected a port in 1..65535 in {item!r}") from None
    return MllpPeer(parts.hostname, _port(port, item), tls)


def parse_destination(item: str, *, tls: bool = False) -> DestinationAddress:
    """Parse one ``D2R_DESTINATIONS`` item; ``tls`` (``D2R_DESTINATIONS_TLS``) applies to the
    DICOM items without a scheme.

    Raises
    ------
    ConfigError
        Naming ``D2R_DESTINATIONS``.
    """
    refuse_placeholder(item, _SETTING, "a destination address")
    scheme, sep, rest = item.partition("://")
    if not sep:
        return _dicom(item, item, tls)
    scheme = scheme.lower()
    if scheme == "dicom":
        return _dicom(rest, item, tls)
    if scheme in ("tls", "dicom+tls"):
        return _dicom(rest, item, True)
    if scheme in ("mllp", "mllp+tls"):
        return _mllp(rest, item, scheme == "mllp+tls")
    kind, plus, transport = scheme.partition("+")
    if plus and kind in ("dicomweb", "fhir") and transport in ("http", "https"):
        return _http(kind, f"{transport}://{rest}", item)
    known = "dicom://, dicom+tls://, dicomweb+http(s)://, mllp://, mllp+tls://, fhir+http(s)://"
    raise ConfigError(_SETTING, f"unknown scheme {scheme!r} in {item!r}; known: {known}")


def parse_destinations(text: str, *, tls: bool = False) -> tuple[DestinationAddress, ...]:
    """Parse the comma-separated ``D2R_DESTINATIONS``; duplicates are refused."""
    result = [parse_destination(i.strip(), tls=tls) for i in text.split(",") if i.strip()]
    names = [a.name for a in result]
    if len(set(names)) != len(names):
        raise ConfigError(_SETTING, "duplicate destination")
    return tuple(result)


def refuse_placeholder_secrets(
    addresses: Sequence[DestinationAddress],
) -> tuple[DestinationAddress, ...]:
    """Return ``addresses`` unless a credential file they name holds the ``CHANGE-ME``
    placeholder.

    A file that cannot be read here is left to the sender, which reads it when it is opened
    (the node may run where only the workers have the file).

    Raises
    ------
    ConfigError
        Naming ``D2R_DESTINATIONS``, the destination and the file, never the content.
    """
    for address in addresses:
        if not isinstance(address, HttpEndpoint):
            continue
        for path in (address.token_file, address.basic_auth_file):
            if path is None:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            refuse_placeholder(text, _SETTING, f"the credential file {path} of {address.name}")
    return tuple(addresses)


def by_name(addresses: Sequence[DestinationAddress], name: str) -> DestinationAddress:
    """The configured destination called ``name``; an unknown name is parsed as an address
    (a delivery recorded before the configuration changed can still be retried)."""
    for address in addresses:
        if address.name == name:
            return address
    return parse_destination(name)
