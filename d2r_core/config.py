"""Parsers of ``D2R_*`` settings, shared by every package's settings dataclass.

Values come from a config file in systemd ``EnvironmentFile`` syntax (:func:`read_config_file`)
overridden by the process environment (:func:`merged_environment`). Every invalid value raises
:class:`~d2r_core.errors.ConfigError`, whose one-line message names the setting and never
repeats a secret.

>>> env_setting({"D2R_PORT": "104"}, "D2R_PORT", 11112, lambda t: parse_port(t, "D2R_PORT"))
104
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from d2r_core.errors import ConfigError

__all__ = [
    "GIB",
    "PLACEHOLDER",
    "ConfigError",
    "IPNetwork",
    "TlsSettings",
    "env_setting",
    "existing_file",
    "has_placeholder",
    "int_at_least",
    "merged_environment",
    "non_negative_float",
    "parse_ae_titles",
    "parse_bool",
    "parse_networks",
    "parse_port",
    "positive_float",
    "read_config_file",
    "refuse_placeholder",
    "refuse_placeholder_lines",
    "validate_ae_title",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_T = TypeVar("_T")

GIB = 1024**3


def validate_ae_title(value: str, setting: str = "D2R_AE_TITLE") -> str:
    """Return ``value`` stripped if it is a valid AE title, else raise :class:`ConfigError`.

    An AE title is 1-16 characters of the default repertoire, without backslash
    or control characters (PS3.5 Table 6.2-1, VR AE).
    """
    title = value.strip()
    if not 1 <= len(title) <= 16:
        raise ConfigError(setting, f"AE title must be 1-16 characters, got {len(title)}")
    if any(c == "\\" or ord(c) < 0x20 or ord(c) > 0x7E for c in title):
        raise ConfigError(setting, "AE title must not contain backslash or control characters")
    return title


def parse_port(text: str, setting: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(setting, f"port must be an integer, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise ConfigError(setting, f"port must be in 1..65535, got {port}")
    return port


def parse_ae_titles(text: str, setting: str = "D2R_ALLOWED_CALLING_AETS") -> tuple[str, ...]:
    """Parse a comma-separated list of AE titles (duplicates dropped, order kept)."""
    titles = [validate_ae_title(t, setting) for t in text.split(",") if t.strip()]
    return tuple(dict.fromkeys(titles))


def parse_networks(text: str, setting: str = "D2R_ALLOWED_NETWORKS") -> tuple[IPNetwork, ...]:
    """Parse a comma-separated list of IP addresses and CIDR networks.

    >>> [str(n) for n in parse_networks("10.1.0.0/16, 192.168.5.7, ::1")]
    ['10.1.0.0/16', '192.168.5.7/32', '::1/128']
    """
    networks: list[IPNetwork] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(setting, f"expected an IP address or CIDR, got {item!r}") from None
    return tuple(networks)


def parse_bool(text: str) -> bool:
    """``true/yes/on/1`` or ``false/no/off/0`` (case-insensitive); ``ValueError`` otherwise."""
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


#: what the example configuration holds in place of a secret (matched in any case)
PLACEHOLDER = "CHANGE-ME"


def has_placeholder(text: str) -> bool:
    """Whether ``text`` still holds the example configuration's ``CHANGE-ME`` placeholder.

    >>> has_placeholder("postgresql://d2r:change-me@db/d2r"), has_placeholder("s3cret")
    (True, False)
    """
    return PLACEHOLDER.lower() in text.lower()


def refuse_placeholder(text: str, setting: str, where: str = "") -> str:
    """Return ``text`` unless it holds the ``CHANGE-ME`` placeholder.

    Raises
    ------
    ConfigError
        Naming ``setting`` and ``where`` (a file, a line), never ``text``: it may be a secret.
    """
    if has_placeholder(text):
        place = f"{where} " if where else ""
        raise ConfigError(
            setting, f"{place}still holds the CHANGE-ME placeholder of the examples; replace it"
        )
    return text


def refuse_placeholder_lines(text: str, setting: str, source: str) -> str:
    """Return ``text``, a credentials file's content, unless a line holds the placeholder.

    Blank lines and ``#`` comments are skipped; the :class:`ConfigError` names ``setting``,
    ``source`` (the file) and the line number.
    """
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            refuse_placeholder(line, setting, f"{source} line {number}")
    return text


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"{text} is not a readable file")
    return path


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS files (PEM) of the listener and the sender.

    Parameters
    ----------
    cert, key : Path or None
        Our certificate (chain) and its private key, unencrypted. The listener uses TLS when
        both are set; the sender presents them as its client certificate.
    ca : Path or None
        Trusted CA certificates: verify the destinations' server certificates (else the system
        store) and the listener's clients.
    require_client_cert : bool
        The listener refuses a TLS client without a certificate signed by ``ca``.
    """

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False

    @property
    def listener_enabled(self) -> bool:
        return self.cert is not None and self.key is not None


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def read_config_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read ``KEY=VALUE`` lines as in a systemd ``EnvironmentFile``.

    Blank lines and lines starting with ``#`` or ``;`` are ignored, an optional
    ``export`` prefix is dropped, and values may be wrapped in single or double quotes.

    Raises
    ------
    ConfigError
        When the file cannot be read or a line has no ``=``.
    """
    setting = "D2R_CONFIG"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {path}: {exc.strerror}") from exc
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(setting, f"{path} line {number}: expected KEY=VALUE")
        values[key] = _unquote(value)
    return values


def merged_environment(
    config_path: str | os.PathLike[str] | None, environ: Mapping[str, str]
) -> dict[str, str]:
    """Return the config file's values overridden by ``environ`` (the process environment)."""
    merged = read_config_file(config_path) if config_path else {}
    merged.update(environ)
    return merged


def env_setting(
    env: Mapping[str, str], setting: str, default: _T, parse: Callable[[str], _T]
) -> _T:
    raw = env.get(setting)
    if raw is None or raw.strip() == "":
        return default
    try:
        return parse(raw.strip())
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(setting, str(exc)) from None


def _number(
    kind: type[int] | type[float], minimum: float, *, exclusive: bool = False
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise ValueError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {text!r}")
        if value < minimum or (exclusive and value == minimum):
            op = ">" if exclusive else ">="
            raise ValueError(f"must be {op} {minimum:g}, got {text}")
        return value

    return parse


def int_at_least(minimum: int) -> Callable[[str], int]:
    parse = _number(int, minimum)
    return lambda text: int(parse(text))


def positive_float(text: str) -> float:
    return float(_number(float, 0.0, exclusive=True)(text))


def non_negative_float(text: str) -> float:
    return float(_number(float, 0.0)(text))
