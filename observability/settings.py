"""Observability configuration: :class:`ObservabilitySettings`, built once by an entry point.

========================  =========================  =============================================
variable                  default                    meaning
========================  =========================  =============================================
``D2R_HTTP_HOST``         ``127.0.0.1``              bind address of the HTTP endpoint; the status
                                                     page shows study details, so it listens on
                                                     loopback unless set (``0.0.0.0`` for probes
                                                     and scrapes from other hosts)
``D2R_HTTP_PORT``         ``8080``                   ``/metrics``, ``/healthz``, ``/readyz`` and the
                                                     status page; ``0`` disables the endpoint
``D2R_AUDIT_LOG``         ``<spool>/../audit.jsonl`` append-only audit log (JSON lines)
``D2R_AUDIT_FSYNC``       ``false``                  fsync the audit log after every line
``D2R_LOG_FORMAT``        ``text``                   ``text`` or ``json`` (one object per line)
``D2R_STATUS_PAGE_PHI``   ``false``                  show patient name and ID on the status page
``D2R_HTTP_AUTH``         ``auto``                   ``auto``: credentials needed (except for
                                                     ``/healthz``, ``/readyz``) unless
                                                     ``D2R_HTTP_HOST`` is loopback; ``required``:
                                                     on loopback too
``D2R_HTTP_TOKENS_FILE``  (none)                     bearer tokens: ``NAME ROLES TOKEN`` lines
``D2R_HTTP_USERS_FILE``   (none)                     basic-auth users: ``NAME:ROLES:scrypt$...``
                                                     lines (``d2r http-user``)
``D2R_HTTP_TRUSTED_PROXIES``  (none)                 addresses/networks of reverse proxies whose
                                                     user header is believed
``D2R_HTTP_PROXY_HEADER`` ``X-Forwarded-User``       that header
``D2R_HTTP_PROXY_ROLES``  ``viewer``                 roles of a proxy-authenticated user
``D2R_HTTP_AUTH_MAX_FAILURES``  ``10``               wrong credentials per client address ...
``D2R_HTTP_AUTH_WINDOW_SECONDS``  ``60``             ... within this window before 429
``D2R_HTTP_AUTH_MAX_FAILURES_TOTAL``  ``100``        wrong credentials of all clients together
                                                     within the window before password checks
                                                     answer 429 (tokens keep working)
``D2R_HTTP_AUTH_MAX_HASHING``  ``2``                 password hashes (16 MiB each) at once;
                                                     beyond, 503 without hashing
``D2R_HTTP_MAX_CONNECTIONS``  ``64``                 connections served at once (503 beyond)
``D2R_HTTP_MAX_CONNECTIONS_PER_CLIENT``  ``16``      ... from one address (IPv6: one /64)
``D2R_HTTP_TLS_CERT``     (none)                     PEM certificate (chain): serve HTTPS
``D2R_HTTP_TLS_KEY``      (none)                     its private key (set both or neither)
``D2R_HTTP_TLS_CA``       (none)                     PEM CA bundle: verify TLS client certificates;
                                                     a verified one holds the ``ingest`` role
                                                     (STOW-RS senders); needs the two above
========================  =========================  =============================================

Roles and routes: :mod:`observability.auth`.

>>> s = ObservabilitySettings.from_env({"D2R_SPOOL_DIR": "/var/lib/d2r/spool"})
>>> s.http_port, str(s.audit_log), s.log_format
(8080, '/var/lib/d2r/audit.jsonl', 'text')
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from d2r_core.config import (
    IPNetwork,
    env_setting,
    int_at_least,
    parse_bool,
    parse_networks,
    positive_float,
    refuse_placeholder_lines,
)
from d2r_core.errors import ConfigError
from d2r_http.auth import parse_roles, read_tokens, read_users
from dicom_node.settings import NodeSettings

__all__ = ["HTTP_AUTH_MODES", "LOG_FORMATS", "ObservabilitySettings", "is_loopback"]

LOG_FORMATS = ("text", "json")
HTTP_AUTH_MODES = ("auto", "required")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the endpoint on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _auth_mode(text: str) -> str:
    value = text.lower()
    if value not in HTTP_AUTH_MODES:
        raise ValueError(f"expected auto or required, got {text!r}")
    return value


def _credentials_file(parse: Callable[[Path], object], setting: str) -> Callable[[str], Path]:
    """A file that exists, holds no ``CHANGE-ME`` placeholder and parses (its errors name the
    line, never a secret)."""

    def check(text: str) -> Path:
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"{path} is not a file")
        try:
            refuse_placeholder_lines(path.read_text(encoding="utf-8"), setting, str(path))
            parse(path)
        except OSError as exc:
            raise ValueError(f"{path}: {exc.strerror}") from None
        return path

    return check


def _existing_path(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    return path


def _header_name(text: str) -> str:
    if not text or any(not (c.isalnum() or c == "-") for c in text):
        raise ValueError(f"expected an HTTP header name, got {text!r}")
    return text


def _http_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"port must be an integer, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535 (0 disables), got {port}")
    return port


def _log_format(text: str) -> str:
    value = text.lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"expected text or json, got {text!r}")
    return value


@dataclass(frozen=True)
class ObservabilitySettings:
    """Settings of the HTTP endpoint, the audit log and the log format."""

    http_host: str = "127.0.0.1"
    http_port: int = 8080
    audit_log: Path = Path("d2r-data/audit.jsonl")
    audit_fsync: bool = False
    log_format: str = "text"
    status_page_phi: bool = False
    http_auth: str = "auto"
    http_tokens_file: Path | None = None
    http_users_file: Path | None = None
    http_trusted_proxies: tuple[IPNetwork, ...] = ()
    http_proxy_header: str = "X-Forwarded-User"
    http_proxy_roles: frozenset[str] = frozenset({"viewer"})
    http_auth_max_failures: int = 10
    http_auth_window_seconds: float = 60.0
    http_auth_max_failures_total: int = 100
    http_auth_max_hashing: int = 2
    http_max_connections: int = 64
    http_max_connections_per_client: int = 16
    http_tls_cert: Path | None = None
    http_tls_key: Path | None = None
    http_tls_ca: Path | None = None

    @property
    def http_auth_required(self) -> bool:
        """Whether requests other than the probes need a credential."""
        return self.http_auth == "required" or not is_loopback(self.http_host)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ObservabilitySettings:
        """Build settings from ``D2R_*`` variables in ``env``.

        Raises
        ------
        ConfigError
            Naming the first invalid setting.
        """
        d = cls()
        spool_dir = env_setting(env, "D2R_SPOOL_DIR", NodeSettings().spool_dir, Path)
        audit_log = env_setting(env, "D2R_AUDIT_LOG", spool_dir.parent / "audit.jsonl", Path)
        if audit_log.exists() and audit_log.is_dir():
            raise ConfigError("D2R_AUDIT_LOG", f"{audit_log} is a directory, expected a file")
        tls_cert = env_setting(env, "D2R_HTTP_TLS_CERT", None, _existing_path)
        tls_key = env_setting(env, "D2R_HTTP_TLS_KEY", None, _existing_path)
        if (tls_cert is None) != (tls_key is None):
            missing = "D2R_HTTP_TLS_KEY" if tls_key is None else "D2R_HTTP_TLS_CERT"
            raise ConfigError(
                missing, "D2R_HTTP_TLS_CERT and D2R_HTTP_TLS_KEY must be set together"
            )
        tls_ca = env_setting(env, "D2R_HTTP_TLS_CA", None, _existing_path)
        if tls_ca is not None and tls_cert is None:
            raise ConfigError(
                "D2R_HTTP_TLS_CA", "needs D2R_HTTP_TLS_CERT and D2R_HTTP_TLS_KEY (HTTPS)"
            )
        return cls(
            http_host=env_setting(env, "D2R_HTTP_HOST", d.http_host, str),
            http_port=env_setting(env, "D2R_HTTP_PORT", d.http_port, _http_port),
            audit_log=audit_log,
            audit_fsync=env_setting(env, "D2R_AUDIT_FSYNC", d.audit_fsync, parse_bool),
            log_format=env_setting(env, "D2R_LOG_FORMAT", d.log_format, _log_format),
            status_page_phi=env_setting(env, "D2R_STATUS_PAGE_PHI", d.status_page_phi, parse_bool),
            http_auth=env_setting(env, "D2R_HTTP_AUTH", d.http_auth, _auth_mode),
            http_tokens_file=env_setting(
                env,
                "D2R_HTTP_TOKENS_FILE",
                None,
                _credentials_file(read_tokens, "D2R_HTTP_TOKENS_FILE"),
            ),
            http_users_file=env_setting(
                env,
                "D2R_HTTP_USERS_FILE",
                None,
                _credentials_file(read_users, "D2R_HTTP_USERS_FILE"),
            ),
            http_trusted_proxies=env_setting(
                env,
                "D2R_HTTP_TRUSTED_PROXIES",
                (),
                lambda t: parse_networks(t, "D2R_HTTP_TRUSTED_PROXIES"),
            ),
            http_proxy_header=env_setting(
                env, "D2R_HTTP_PROXY_HEADER", d.http_proxy_header, _header_name
            ),
            http_proxy_roles=env_setting(
                env, "D2R_HTTP_PROXY_ROLES", d.http_proxy_roles, parse_roles
            ),
            http_auth_max_failures=env_setting(
                env, "D2R_HTTP_AUTH_MAX_FAILURES", d.http_auth_max_failures, int_at_least(1)
            ),
            http_auth_window_seconds=env_setting(
                env, "D2R_HTTP_AUTH_WINDOW_SECONDS", d.http_auth_window_seconds, positive_float
            ),
            http_auth_max_failures_total=env_setting(
                env,
                "D2R_HTTP_AUTH_MAX_FAILURES_TOTAL",
                d.http_auth_max_failures_total,
                int_at_least(1),
            ),
            http_auth_max_hashing=env_setting(
                env, "D2R_HTTP_AUTH_MAX_HASHING", d.http_auth_max_hashing, int_at_least(1)
            ),
            http_max_connections=env_setting(
                env, "D2R_HTTP_MAX_CONNECTIONS", d.http_max_connections, int_at_least(1)
            ),
            http_max_connections_per_client=env_setting(
                env,
                "D2R_HTTP_MAX_CONNECTIONS_PER_CLIENT",
                d.http_max_connections_per_client,
                int_at_least(1),
            ),
            http_tls_cert=tls_cert,
            http_tls_key=tls_key,
            http_tls_ca=tls_ca,
        )
