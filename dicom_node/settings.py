"""Node configuration: :class:`NodeSettings`, built once by an entry point.

Values come from ``D2R_*`` variables: a config file in systemd ``EnvironmentFile``
syntax (:func:`~d2r_core.config.read_config_file`) overridden by the process environment
(:func:`~d2r_core.config.merged_environment`). Core code receives a :class:`NodeSettings` and
never reads ``os.environ``. Every invalid value raises :class:`~d2r_core.errors.ConfigError`,
whose one-line message names the setting.

>>> s = NodeSettings.from_env({"D2R_AE_TITLE": "CXR_AI", "D2R_PORT": "11112"})
>>> s.ae_title, s.port
('CXR_AI', 11112)

The destinations are the delivery package's (:class:`delivery.settings.DeliverySettings`).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from d2r_core.config import (
    GIB,
    IPNetwork,
    TlsSettings,
    env_setting,
    existing_file,
    int_at_least,
    non_negative_float,
    parse_ae_titles,
    parse_bool,
    parse_networks,
    parse_port,
    positive_float,
    refuse_placeholder,
    validate_ae_title,
)
from d2r_core.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_PIXEL_BYTES",
    "NodeSettings",
    "default_node_name",
    "parse_max_pixel_bytes",
    "parse_node_name",
]

#: the most listener processes one node runs (D2R_LISTENER_PROCESSES)
MAX_LISTENER_PROCESSES = 64
#: D2R_MAX_PIXEL_BYTES unset: 40 MiB of pixel data per image (a 4300 x 4300 16-bit detector
#: image is 37 MB, a 3000 x 3000 RGB film scan 27 MB), which a worker reads and preprocesses in
#: about 4 times that
DEFAULT_MAX_PIXEL_BYTES = 40 * 1024**2
#: the most D2R_MAX_PIXEL_BYTES may be: what the model's preprocessing decodes at most
MAX_PIXEL_BYTES_CEILING = 128 * 1024**2


_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def parse_node_name(text: str) -> str:
    """D2R_NODE_NAME: 1-64 letters, digits, dots, dashes or underscores."""
    if not _NODE_NAME.fullmatch(text):
        raise ValueError("expected 1-64 letters, digits, '.', '-' or '_' (e.g. the pod name)")
    return text


def default_node_name() -> str:
    """The host name, made a valid node name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-._")[:64]
    return name or "d2r-node"


@dataclass(frozen=True)
class NodeSettings:
    """Settings of the DICOM node (listener, spool, study timers, sender).

    Build with :meth:`from_env`; the defaults below are those of an unset variable.
    """

    ae_title: str = "D2R"
    host: str = "0.0.0.0"
    port: int = 11112
    spool_dir: Path = Path("d2r-data/spool")
    database_url: str = "sqlite:///d2r-data/d2r.db"
    #: upgrade a database at an older schema revision at start, under a lock (single-host installs)
    db_auto_upgrade: bool = False
    study_quiet_seconds: float = 10.0
    study_force_seconds: float = 600.0
    #: complete a study this long after its last association was released (see studies.py)
    study_release_grace_seconds: float = 2.0
    reconcile_seconds: float = 30.0
    #: worker attempts per study (claims, each ended by an unexpected error or a lost worker)
    max_attempts: int = 3
    max_pdu: int = 131072
    #: associations each listener process accepts at once
    max_associations: int = 10
    #: processes accepting associations on the one port (the first runs the assembler and HTTP)
    listener_processes: int = 1
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    send_retries: int = 5
    send_retry_delay: float = 30.0
    min_free_bytes: int = GIB
    #: calling AE titles allowed to associate (empty: any)
    allowed_calling_aets: tuple[str, ...] = ()
    #: peer addresses allowed to associate (empty: any)
    allowed_networks: tuple[IPNetwork, ...] = ()
    tls: TlsSettings = TlsSettings()
    #: delete a finished study's spooled files this long after it finished (0: keep forever)
    spool_retention_hours: float = 72.0
    #: largest STOW-RS request body accepted (413 beyond); parts stream to the spool, so this
    #: bounds the disk a request fills, not memory
    stow_max_bytes: int = GIB
    #: STOW-RS requests received at once (503 with Retry-After beyond, before the body is read)
    stow_max_concurrent: int = 4
    #: largest pixel data of one stored image that the status page and the worker read
    #: (Rows x Columns x frames x samples x bits); checked before reading or inflating pixels
    max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES
    #: this node's name among the replicas on one database (default: the host name)
    node_name: str = field(default_factory=default_node_name)
    #: how often a node records in the study database that it is alive
    node_heartbeat_seconds: float = 5.0
    #: a node silent this long is taken as dead: a survivor expires its open associations
    node_expire_seconds: float = 30.0
    #: how long the assembler and the workers retry their database work through an outage
    db_retry_seconds: float = 30.0
    #: how long an incoming instance waits for the database before a failure status
    db_ingest_wait_seconds: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NodeSettings:
        """Build settings from ``D2R_*`` variables in ``env``.

        Raises
        ------
        ConfigError
            Naming the first invalid setting.
        """
        d = cls()
        spool_dir = env_setting(env, "D2R_SPOOL_DIR", d.spool_dir, Path)
        default_db = f"sqlite:///{spool_dir.parent / 'd2r.db'}"
        database_url = env_setting(env, "D2R_DATABASE_URL", default_db, _database_url)
        quiet = env_setting(env, "D2R_STUDY_QUIET_SECONDS", d.study_quiet_seconds, positive_float)
        force = env_setting(env, "D2R_STUDY_FORCE_SECONDS", d.study_force_seconds, positive_float)
        if force < quiet:
            raise ConfigError(
                "D2R_STUDY_FORCE_SECONDS",
                f"must be >= D2R_STUDY_QUIET_SECONDS ({quiet:g}), got {force:g}",
            )
        tls = _tls_settings(env)
        max_pdu = env_setting(env, "D2R_MAX_PDU", d.max_pdu, int_at_least(0))
        if max_pdu != 0 and max_pdu < 4096:
            raise ConfigError("D2R_MAX_PDU", f"must be 0 (unlimited) or >= 4096, got {max_pdu}")
        heartbeat = env_setting(
            env, "D2R_NODE_HEARTBEAT_SECONDS", d.node_heartbeat_seconds, positive_float
        )
        expire = env_setting(env, "D2R_NODE_EXPIRE_SECONDS", d.node_expire_seconds, positive_float)
        if expire < 2 * heartbeat:
            raise ConfigError(
                "D2R_NODE_EXPIRE_SECONDS",
                f"must be at least twice D2R_NODE_HEARTBEAT_SECONDS ({heartbeat:g} s), got "
                f"{expire:g}: a live node would be taken as dead between two heartbeats",
            )
        return cls(
            ae_title=env_setting(env, "D2R_AE_TITLE", d.ae_title, validate_ae_title),
            host=env_setting(env, "D2R_HOST", d.host, str),
            port=env_setting(env, "D2R_PORT", d.port, lambda t: parse_port(t, "D2R_PORT")),
            spool_dir=spool_dir,
            database_url=database_url,
            db_auto_upgrade=env_setting(env, "D2R_DB_AUTO_UPGRADE", False, parse_bool),
            study_quiet_seconds=quiet,
            study_force_seconds=force,
            study_release_grace_seconds=env_setting(
                env,
                "D2R_STUDY_RELEASE_GRACE_SECONDS",
                d.study_release_grace_seconds,
                non_negative_float,
            ),
            reconcile_seconds=env_setting(
                env, "D2R_RECONCILE_SECONDS", d.reconcile_seconds, positive_float
            ),
            max_pdu=max_pdu,
            max_associations=env_setting(
                env, "D2R_MAX_ASSOCIATIONS", d.max_associations, int_at_least(1)
            ),
            listener_processes=env_setting(
                env, "D2R_LISTENER_PROCESSES", d.listener_processes, _listener_processes
            ),
            acse_timeout=env_setting(env, "D2R_ACSE_TIMEOUT", d.acse_timeout, positive_float),
            dimse_timeout=env_setting(env, "D2R_DIMSE_TIMEOUT", d.dimse_timeout, positive_float),
            network_timeout=env_setting(
                env, "D2R_NETWORK_TIMEOUT", d.network_timeout, positive_float
            ),
            send_retries=env_setting(env, "D2R_SEND_RETRIES", d.send_retries, int_at_least(0)),
            max_attempts=env_setting(env, "D2R_MAX_ATTEMPTS", d.max_attempts, int_at_least(1)),
            send_retry_delay=env_setting(
                env, "D2R_SEND_RETRY_DELAY", d.send_retry_delay, non_negative_float
            ),
            min_free_bytes=env_setting(
                env, "D2R_MIN_FREE_BYTES", d.min_free_bytes, int_at_least(0)
            ),
            allowed_calling_aets=env_setting(env, "D2R_ALLOWED_CALLING_AETS", (), parse_ae_titles),
            allowed_networks=env_setting(env, "D2R_ALLOWED_NETWORKS", (), parse_networks),
            tls=tls,
            spool_retention_hours=env_setting(
                env, "D2R_SPOOL_RETENTION_HOURS", d.spool_retention_hours, non_negative_float
            ),
            stow_max_bytes=env_setting(
                env, "D2R_STOW_MAX_BYTES", d.stow_max_bytes, int_at_least(1024)
            ),
            stow_max_concurrent=env_setting(
                env, "D2R_STOW_MAX_CONCURRENT", d.stow_max_concurrent, int_at_least(1)
            ),
            max_pixel_bytes=env_setting(
                env, "D2R_MAX_PIXEL_BYTES", d.max_pixel_bytes, parse_max_pixel_bytes
            ),
            node_name=env_setting(env, "D2R_NODE_NAME", d.node_name, parse_node_name),
            node_heartbeat_seconds=heartbeat,
            node_expire_seconds=expire,
            db_retry_seconds=env_setting(
                env, "D2R_DB_RETRY_SECONDS", d.db_retry_seconds, non_negative_float
            ),
            db_ingest_wait_seconds=env_setting(
                env, "D2R_DB_INGEST_WAIT_SECONDS", d.db_ingest_wait_seconds, non_negative_float
            ),
        )

    def retry_delay(self, attempt: int) -> float:
        """Seconds before retry ``attempt`` (1-based): the base delay doubled per attempt."""
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        return float(self.send_retry_delay * 2.0 ** (attempt - 1))


def _tls_settings(env: Mapping[str, str]) -> TlsSettings:
    cert = env_setting(env, "D2R_TLS_CERT", None, existing_file)
    key = env_setting(env, "D2R_TLS_KEY", None, existing_file)
    ca = env_setting(env, "D2R_TLS_CA", None, existing_file)
    require = env_setting(env, "D2R_TLS_REQUIRE_CLIENT_CERT", False, parse_bool)
    if (cert is None) != (key is None):
        missing = "D2R_TLS_KEY" if key is None else "D2R_TLS_CERT"
        raise ConfigError(missing, "D2R_TLS_CERT and D2R_TLS_KEY must be set together")
    if require and (cert is None or ca is None):
        raise ConfigError(
            "D2R_TLS_REQUIRE_CLIENT_CERT",
            "needs D2R_TLS_CERT, D2R_TLS_KEY and D2R_TLS_CA (to verify the clients)",
        )
    return TlsSettings(cert=cert, key=key, ca=ca, require_client_cert=require)


def _listener_processes(text: str) -> int:
    count = int_at_least(1)(text)
    if count > MAX_LISTENER_PROCESSES:
        raise ValueError(f"must be at most {MAX_LISTENER_PROCESSES}, got {count}")
    return count


def parse_max_pixel_bytes(text: str) -> int:
    """D2R_MAX_PIXEL_BYTES: at least 1 MiB, at most :data:`MAX_PIXEL_BYTES_CEILING`."""
    size = int_at_least(1024**2)(text)
    if size > MAX_PIXEL_BYTES_CEILING:
        raise ValueError(f"must be at most {MAX_PIXEL_BYTES_CEILING}, got {size}")
    return size


def _database_url(text: str) -> str:
    scheme, sep, _ = text.partition("://")
    if not sep or not scheme:
        raise ValueError("expected a database URL such as sqlite:///path")  # may hold a password
    return refuse_placeholder(text, "D2R_DATABASE_URL")
