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
========================  =========================  =============================================

>>> s = ObservabilitySettings.from_env({"D2R_SPOOL_DIR": "/var/lib/d2r/spool"})
>>> s.http_port, str(s.audit_log), s.log_format
(8080, '/var/lib/d2r/audit.jsonl', 'text')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dicom_node.settings import ConfigError, NodeSettings, env_setting, parse_bool

__all__ = ["LOG_FORMATS", "ObservabilitySettings"]

LOG_FORMATS = ("text", "json")


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
        return cls(
            http_host=env_setting(env, "D2R_HTTP_HOST", d.http_host, str),
            http_port=env_setting(env, "D2R_HTTP_PORT", d.http_port, _http_port),
            audit_log=audit_log,
            audit_fsync=env_setting(env, "D2R_AUDIT_FSYNC", d.audit_fsync, parse_bool),
            log_format=env_setting(env, "D2R_LOG_FORMAT", d.log_format, _log_format),
            status_page_phi=env_setting(env, "D2R_STATUS_PAGE_PHI", d.status_page_phi, parse_bool),
        )
