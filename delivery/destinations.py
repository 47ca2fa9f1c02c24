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

A host is a host name (RFC 1123 labels, "_" allowed), an IPv4 address or an IPv6 address in brackets
(``[::1]``; a DICOM item also reads the unbracketed form earlier names had, its port after the
last colon); a port is 1..65535; an AE title is 1-16 characters without backslash or control
characters. An HTTP address is an ASCII URL without a fragment, other characters
percent-encoded.

An address never holds a secret: a URL with ``user:password@`` is refused. HTTP destinations
read their credentials from files named in the query string (``?token_file=/run/secrets/t`` for
a bearer token, ``?basic_auth_file=/run/secrets/b`` holding ``user:password``), each given once
and percent-decoded as a query value (``%26`` for ``&``, ``%23`` for ``#``, ``+`` or ``%20``
for a space); the file is read when the sender is opened, so a rotated secret needs no restart
of the configuration.

Credentials never travel in cleartext by default: a plain ``http://`` destination with a
credential file is refused unless its address says ``?insecure=true`` (for a receiver on the
same host or behind a TLS tunnel). ``insecure`` applies to ``http://`` only: certificate checks
of ``https://`` destinations cannot be turned off. An address or credential file that still
holds the example configuration's ``CHANGE-ME`` placeholder is refused.

A destination's :attr:`~DestinationAddress.name` is its canonical text, which parses back to
the same destination (file names percent-encoded, IPv6 hosts bracketed, MLLP hosts in lower
case): the key of its delivery rows in the study database, of ``d2r retry --destination`` and
of the metrics and audit lines.

>>> [a.name for a in parse_destinations("PACS@10.0.0.5:104, mllp://ris:2575")]
['PACS@10.0.0.5:104', 'mllp://ris:2575']
>>> parse_destinations("tls://PACS@pacs.example.org:2762")[0].kind
'dicom'
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, quote, urlencode

from pydicom.dataset import Dataset

from d2r_core.config import parse_bool, refuse_placeholder, validate_ae_title
from d2r_core.errors import ConfigError
from delivery.content import DeliveryContent

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

#: one label of a host name (RFC 1123 2.1), with "_" as resolvers take it (container and
#: Compose service names often hold one)
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
#: what the path and query of an HTTP address may hold: URL characters and %XX escapes (RFC 3986)
_URL_TEXT = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")


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
        """``AET@host:port`` (``tls://AET@host:port`` over TLS, ``dicom://`` before an AE title
        holding ``://``): configuration and logs."""
        plain = f"{self.ae_title}@{_host_text(self.host)}:{self.port}"
        if self.tls:
            return f"tls://{plain}"
        return f"dicom://{plain}" if "://" in self.ae_title else plain


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
        """The address as configured: scheme prefix, base, then the credential file and
        ``insecure`` percent-encoded as the parser decodes them."""
        query = [
            (key, str(path))
            for key, path in (
                ("token_file", self.token_file),
                ("basic_auth_file", self.basic_auth_file),
            )
            if path is not None
        ]
        if self.insecure:
            query.append(("insecure", "true"))
        text = urlencode(query, safe="/", errors="surrogateescape", quote_via=quote)
        return f"{self.kind}+{self.url}" + (f"?{text}" if text else "")


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
    content: DeliveryContent | None = None
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


def _is_host_name(text: str) -> bool:
    """Whether ``text`` is a host name of RFC 1123 labels; one ending in a numeric label must
    be an IPv4 address (a resolver reads ``10.1`` as the address 10.0.0.1)."""
    labels = text.split(".")
    if len(text) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return False
    if not (labels[-1].isascii() and labels[-1].isdigit()):
        return True
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _host(text: str, item: str) -> str:
    """``text`` if it is a host name, an IPv4 address or a bracketed IPv6 address (returned
    without its brackets)."""
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            pass
        else:
            if "%" not in inner:  # a zone (fe80::1%eth0) is no address of a remote host
                return inner
    elif _is_host_name(text):
        return text
    raise ConfigError(
        _SETTING,
        f"expected a host name, an IPv4 address or a bracketed IPv6 address in {item!r}",
    )


def _port(text: str, item: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ConfigError(_SETTING, f"port must be an integer in {item!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ConfigError(_SETTING, f"expected a port in 1..65535 in {item!r}")
    return port


def _host_port(text: str, item: str, *, port_required: bool) -> tuple[str, int | None]:
    """Split ``host[:port]`` (``[IPv6][:port]``) and check both parts."""
    bracket = text.rfind("]")
    host, colon, port = text.rpartition(":") if ":" in text[bracket + 1 :] else (text, "", "")
    if not host or (port_required and not colon):
        raise ConfigError(
            _SETTING, f"expected {'host:port' if port_required else 'a host'} in {item!r}"
        )
    return _host(host, item), (_port(port, item) if colon else None)


def _refuse_userinfo(scheme: str, authority: str) -> None:
    """Refuse ``user:password@`` naming the destination without it."""
    if "@" in authority:
        raise ConfigError(
            _SETTING,
            f"credentials in a destination address are refused ({scheme}://...@"
            f"{authority.rpartition('@')[2]}); HTTP destinations name a file with "
            "?token_file= or ?basic_auth_file=",
        )


def _dicom(rest: str, item: str, tls: bool) -> DicomPeer:
    aet, at, hostport = rest.partition("@")
    if not at:
        raise ConfigError(_SETTING, f"expected AET@host:port, got {item!r}")
    try:
        title = validate_ae_title(aet, _SETTING)
    except ConfigError as exc:
        raise ConfigError(_SETTING, f"{exc.message} in {item!r}") from None
    host, colon, port = hostport.rpartition(":")
    if ":" in host and not host.startswith("["):
        # an IPv6 address without brackets, as names were written before: the port follows
        # the last colon
        hostport = f"[{host}]{colon}{port}"
    address, number = _host_port(hostport, item, port_required=True)
    assert number is not None
    return DicomPeer(title, address, number, tls)


def _http(kind: str, transport: str, rest: str, item: str) -> HttpEndpoint:
    before, _, query = rest.partition("?")
    authority, slash, path = before.partition("/")
    _refuse_userinfo(f"{kind}+{transport}", authority)
    # until the query is known to hold file names only, errors show the address without it
    shown = f"{kind}+{transport}://{before.partition('#')[0]}"
    if "#" in rest:
        raise ConfigError(
            _SETTING, f"a destination address has no fragment (write # as %23): {shown!r}"
        )
    values: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, errors="surrogateescape"):
        if key in values:
            raise ConfigError(_SETTING, f"{key} is given twice in {shown!r}")
        values[key] = value
    unknown = sorted(set(values) - {"token_file", "basic_auth_file", "insecure"})
    if unknown:
        raise ConfigError(_SETTING, f"unknown query parameter(s) {unknown} in {shown!r}")
    if not _URL_TEXT.fullmatch(rest[len(authority) :]):
        raise ConfigError(
            _SETTING,
            f"expected a URL of ASCII characters, others percent-encoded, in {item!r}",
        )
    _host_port(authority, item, port_required=False)
    token_file = _file(values, "token_file", shown)
    basic_auth_file = _file(values, "basic_auth_file", shown)
    insecure = _flag(values, "insecure", item)
    if token_file is not None and basic_auth_file is not None:
        raise ConfigError(_SETTING, f"token_file and basic_auth_file exclude each other: {item!r}")
    base = f"{transport}://{authority}{(slash + path).rstrip('/')}"
    return HttpEndpoint(
        kind, base, token_file=token_file, basic_auth_file=basic_auth_file, insecure=insecure
    )


def _file(values: dict[str, str], key: str, shown: str) -> Path | None:
    name = values.get(key)
    if name is None:
        return None
    if not name or "\x00" in name:
        raise ConfigError(_SETTING, f"{key} must name a file in {shown!r}")
    refuse_placeholder(name, _SETTING, f"the {key} of {shown!r}")
    return Path(name)


def _flag(values: dict[str, str], key: str, item: str) -> bool:
    found = values.get(key)
    try:
        return False if found is None else parse_bool(found)
    except ValueError:
        raise ConfigError(_SETTING, f"{key} must be true or false in {item!r}") from None


def _mllp(rest: str, item: str, tls: bool) -> MllpPeer:
    authority = rest.removesuffix("/")
    _refuse_userinfo("mllp+tls" if tls else "mllp", authority)
    if any(c in authority for c in "/?#"):
        raise ConfigError(_SETTING, f"expected mllp://host:port, got {item!r}")
    host, port = _host_port(authority, item, port_required=True)
    assert port is not None
    return MllpPeer(host.lower(), port, tls)


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
        return _http(kind, transport, rest, item)
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
