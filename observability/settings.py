"""Observability configuration: :class:`ObservabilitySettings`, built once by an entry point.

The settings (``D2R_HTTP_*``, ``D2R_AUDIT_*``, ``D2R_LOG_*``, ``D2R_STATUS_PAGE_PHI``) are
declared once below, each with its default and meaning (:data:`SETTINGS`); the README's
configuration table is made from them. The HTTP endpoint listens on loopback unless
``D2R_HTTP_HOST`` says otherwise: the status page shows study details.

Roles and routes: :mod:`observability.auth`.

>>> s = ObservabilitySettings.from_env({"D2R_SPOOL_DIR": "/var/lib/d2r/spool"})
>>> s.http_port, str(s.audit_log), s.log_format
(8080, '/var/lib/d2r/audit.jsonl', 'text')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2r_core.config import (
    IPNetwork,
    int_at_least,
    parse_bool,
    parse_networks,
    positive_float,
    refuse_placeholder_lines,
)
from d2r_core.errors import ConfigError
from d2r_core.settings_spec import Group, Setting
from d2r_http.auth import is_loopback, parse_roles, read_tokens, read_users
from dicom_node.settings import SPOOL_DIR

__all__ = ["HTTP_AUTH_MODES", "LOG_FORMATS", "SETTINGS", "ObservabilitySettings"]

LOG_FORMATS = ("text", "json")
HTTP_AUTH_MODES = ("auto", "required")


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


def _default_audit_log(env: Mapping[str, str]) -> Path:
    """``audit.jsonl`` beside the spool."""
    return SPOOL_DIR.read(env).parent / "audit.jsonl"


# --- the settings of the HTTP endpoint, audit log and logs, declared once ---

HTTP_HOST = Setting(
    "D2R_HTTP_HOST",
    "127.0.0.1",
    str,
    "bind address of the HTTP endpoint (`0.0.0.0` for probes and scrapes); off loopback every "
    "route but `/healthz` and `/readyz` needs a credential",
    Group.HTTP,
)
HTTP_PORT = Setting(
    "D2R_HTTP_PORT",
    8080,
    _http_port,
    "`/metrics`, `/healthz`, `/readyz` and the status page; `0` disables",
    Group.HTTP,
)
HTTP_AUTH = Setting(
    "D2R_HTTP_AUTH",
    "auto",
    _auth_mode,
    "`auto`: credentials unless `D2R_HTTP_HOST` is loopback; `required`: on loopback too",
    Group.HTTP,
)
HTTP_TOKENS_FILE: Setting[Path | None] = Setting(
    "D2R_HTTP_TOKENS_FILE",
    None,
    _credentials_file(read_tokens, "D2R_HTTP_TOKENS_FILE"),
    "bearer tokens, lines `NAME ROLES TOKEN` (roles `metrics`, `viewer`, `ingest`, `feedback`; "
    "TOKEN or `sha256:<hex>`)",
    Group.HTTP,
)
HTTP_USERS_FILE: Setting[Path | None] = Setting(
    "D2R_HTTP_USERS_FILE",
    None,
    _credentials_file(read_users, "D2R_HTTP_USERS_FILE"),
    "basic-auth users, lines `NAME:ROLES:scrypt$...` written by `d2r http-user` (`--remove` "
    "takes one away). Both files are re-read when they change; the systemd units hand over a "
    "copy made at start (`LoadCredential=`), so there a change needs `systemctl restart`",
    Group.HTTP,
)
HTTP_TRUSTED_PROXIES: Setting[tuple[IPNetwork, ...]] = Setting(
    "D2R_HTTP_TRUSTED_PROXIES",
    (),
    lambda t: parse_networks(t, "D2R_HTTP_TRUSTED_PROXIES"),
    "addresses / CIDR networks of reverse proxies whose user header is believed",
    Group.HTTP,
)
HTTP_PROXY_HEADER = Setting(
    "D2R_HTTP_PROXY_HEADER",
    "X-Forwarded-User",
    _header_name,
    "the header naming the user the proxy authenticated",
    Group.HTTP,
)
HTTP_PROXY_ROLES: Setting[frozenset[str]] = Setting(
    "D2R_HTTP_PROXY_ROLES",
    frozenset({"viewer"}),
    parse_roles,
    "roles of a proxy-authenticated user",
    Group.HTTP,
)
HTTP_AUTH_MAX_FAILURES = Setting(
    "D2R_HTTP_AUTH_MAX_FAILURES",
    10,
    int_at_least(1),
    "wrong credentials per client address within `D2R_HTTP_AUTH_WINDOW_SECONDS` before it gets 429",
    Group.HTTP,
)
HTTP_AUTH_WINDOW_SECONDS = Setting(
    "D2R_HTTP_AUTH_WINDOW_SECONDS",
    60.0,
    positive_float,
    "the window (seconds) in which wrong credentials are counted",
    Group.HTTP,
)
HTTP_AUTH_MAX_FAILURES_TOTAL = Setting(
    "D2R_HTTP_AUTH_MAX_FAILURES_TOTAL",
    100,
    int_at_least(1),
    "wrong credentials of all clients together within the window before password checks get "
    "429 (tokens keep working)",
    Group.HTTP,
)
HTTP_AUTH_MAX_HASHING = Setting(
    "D2R_HTTP_AUTH_MAX_HASHING",
    2,
    int_at_least(1),
    "password hashes (scrypt, 16 MiB each) at once; a login beyond gets 503 without hashing",
    Group.HTTP,
)
HTTP_MAX_CONNECTIONS = Setting(
    "D2R_HTTP_MAX_CONNECTIONS",
    64,
    int_at_least(1),
    "connections the HTTP endpoint serves at once; one more gets 503",
    Group.HTTP,
)
HTTP_MAX_CONNECTIONS_PER_CLIENT = Setting(
    "D2R_HTTP_MAX_CONNECTIONS_PER_CLIENT",
    16,
    int_at_least(1),
    "... from one client address (an IPv6 client by its /64); one more gets 503",
    Group.HTTP,
)
HTTP_TLS_CERT: Setting[Path | None] = Setting(
    "D2R_HTTP_TLS_CERT",
    None,
    _existing_path,
    "serve the HTTP endpoint over HTTPS: PEM certificate chain (set with `D2R_HTTP_TLS_KEY`)",
    Group.HTTP,
)
HTTP_TLS_KEY: Setting[Path | None] = Setting(
    "D2R_HTTP_TLS_KEY",
    None,
    _existing_path,
    "the private key of `D2R_HTTP_TLS_CERT` (PEM; set both or neither)",
    Group.HTTP,
)
HTTP_TLS_CA: Setting[Path | None] = Setting(
    "D2R_HTTP_TLS_CA",
    None,
    _existing_path,
    "with HTTPS: verify TLS client certificates against this CA; **every** certificate it signs "
    "holds the `ingest` role (STOW-RS senders) and may store images, which the node warns of at "
    "start. Needs `D2R_HTTP_TLS_CERT` and `D2R_HTTP_TLS_KEY`",
    Group.HTTP,
)
STATUS_PAGE_PHI = Setting(
    "D2R_STATUS_PAGE_PHI",
    False,
    parse_bool,
    "show patient name and ID on the status page",
    Group.HTTP,
)
AUDIT_LOG = Setting(
    "D2R_AUDIT_LOG",
    Path("d2r-data/audit.jsonl"),
    Path,
    "append-only audit log of associations, received and sent objects",
    Group.AUDIT,
    shown="`<spool>/../audit.jsonl`",
    default_from=_default_audit_log,
)
AUDIT_FSYNC = Setting(
    "D2R_AUDIT_FSYNC", False, parse_bool, "fsync the audit log after every line", Group.AUDIT
)
LOG_LEVEL = Setting(
    "D2R_LOG_LEVEL",
    "INFO",
    str,
    "logs carry UIDs, never patient name, ID or birth date",
    Group.LOGGING,
)
LOG_FORMAT = Setting(
    "D2R_LOG_FORMAT",
    "text",
    _log_format,
    "`json`: one object per line with study UID, SOP UID and task id",
    Group.LOGGING,
)
#: every setting of this package: those :class:`ObservabilitySettings` reads, and
#: ``D2R_LOG_LEVEL`` (a :mod:`logging` level name; an unknown one means INFO)
SETTINGS: tuple[Setting[Any], ...] = (
    HTTP_PORT,
    HTTP_HOST,
    HTTP_AUTH,
    HTTP_TOKENS_FILE,
    HTTP_USERS_FILE,
    HTTP_TRUSTED_PROXIES,
    HTTP_PROXY_HEADER,
    HTTP_PROXY_ROLES,
    HTTP_AUTH_MAX_FAILURES,
    HTTP_AUTH_WINDOW_SECONDS,
    HTTP_AUTH_MAX_FAILURES_TOTAL,
    HTTP_AUTH_MAX_HASHING,
    HTTP_MAX_CONNECTIONS,
    HTTP_MAX_CONNECTIONS_PER_CLIENT,
    HTTP_TLS_CERT,
    HTTP_TLS_KEY,
    HTTP_TLS_CA,
    STATUS_PAGE_PHI,
    AUDIT_LOG,
    AUDIT_FSYNC,
    LOG_LEVEL,
    LOG_FORMAT,
)


@dataclass(frozen=True)
class ObservabilitySettings:
    """Settings of the HTTP endpoint, the audit log and the log format."""

    http_host: str = HTTP_HOST.default
    http_port: int = HTTP_PORT.default
    audit_log: Path = AUDIT_LOG.default
    audit_fsync: bool = AUDIT_FSYNC.default
    log_format: str = LOG_FORMAT.default
    status_page_phi: bool = STATUS_PAGE_PHI.default
    http_auth: str = HTTP_AUTH.default
    http_tokens_file: Path | None = HTTP_TOKENS_FILE.default
    http_users_file: Path | None = HTTP_USERS_FILE.default
    http_trusted_proxies: tuple[IPNetwork, ...] = HTTP_TRUSTED_PROXIES.default
    http_proxy_header: str = HTTP_PROXY_HEADER.default
    http_proxy_roles: frozenset[str] = HTTP_PROXY_ROLES.default
    http_auth_max_failures: int = HTTP_AUTH_MAX_FAILURES.default
    http_auth_window_seconds: float = HTTP_AUTH_WINDOW_SECONDS.default
    http_auth_max_failures_total: int = HTTP_AUTH_MAX_FAILURES_TOTAL.default
    http_auth_max_hashing: int = HTTP_AUTH_MAX_HASHING.default
    http_max_connections: int = HTTP_MAX_CONNECTIONS.default
    http_max_connections_per_client: int = HTTP_MAX_CONNECTIONS_PER_CLIENT.default
    http_tls_cert: Path | None = HTTP_TLS_CERT.default
    http_tls_key: Path | None = HTTP_TLS_KEY.default
    http_tls_ca: Path | None = HTTP_TLS_CA.default

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
        audit_log = AUDIT_LOG.read(env)
        if audit_log.exists() and audit_log.is_dir():
            raise ConfigError("D2R_AUDIT_LOG", f"{audit_log} is a directory, expected a file")
        tls_cert = HTTP_TLS_CERT.read(env)
        tls_key = HTTP_TLS_KEY.read(env)
        if (tls_cert is None) != (tls_key is None):
            missing = "D2R_HTTP_TLS_KEY" if tls_key is None else "D2R_HTTP_TLS_CERT"
            raise ConfigError(
                missing, "D2R_HTTP_TLS_CERT and D2R_HTTP_TLS_KEY must be set together"
            )
        tls_ca = HTTP_TLS_CA.read(env)
        if tls_ca is not None and tls_cert is None:
            raise ConfigError(
                "D2R_HTTP_TLS_CA", "needs D2R_HTTP_TLS_CERT and D2R_HTTP_TLS_KEY (HTTPS)"
            )
        return cls(
            http_host=HTTP_HOST.read(env),
            http_port=HTTP_PORT.read(env),
            audit_log=audit_log,
            audit_fsync=AUDIT_FSYNC.read(env),
            log_format=LOG_FORMAT.read(env),
            status_page_phi=STATUS_PAGE_PHI.read(env),
            http_auth=HTTP_AUTH.read(env),
            http_tokens_file=HTTP_TOKENS_FILE.read(env),
            http_users_file=HTTP_USERS_FILE.read(env),
            http_trusted_proxies=HTTP_TRUSTED_PROXIES.read(env),
            http_proxy_header=HTTP_PROXY_HEADER.read(env),
            http_proxy_roles=HTTP_PROXY_ROLES.read(env),
            http_auth_max_failures=HTTP_AUTH_MAX_FAILURES.read(env),
            http_auth_window_seconds=HTTP_AUTH_WINDOW_SECONDS.read(env),
            http_auth_max_failures_total=HTTP_AUTH_MAX_FAILURES_TOTAL.read(env),
            http_auth_max_hashing=HTTP_AUTH_MAX_HASHING.read(env),
            http_max_connections=HTTP_MAX_CONNECTIONS.read(env),
            http_max_connections_per_client=HTTP_MAX_CONNECTIONS_PER_CLIENT.read(env),
            http_tls_cert=tls_cert,
            http_tls_key=tls_key,
            http_tls_ca=tls_ca,
        )
