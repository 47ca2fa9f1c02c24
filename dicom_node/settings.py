"""Node configuration: :class:`NodeSettings`, built once by an entry point.

Values come from ``D2R_*`` variables: a config file in systemd ``EnvironmentFile``
syntax (:func:`~d2r_core.config.read_config_file`) overridden by the process environment
(:func:`~d2r_core.config.merged_environment`). Core code receives a :class:`NodeSettings` and
never reads ``os.environ``. Every invalid value raises :class:`~d2r_core.errors.ConfigError`,
whose one-line message names the setting.

>>> s = NodeSettings.from_env({"D2R_AE_TITLE": "CXR_AI", "D2R_PORT": "11112"})
>>> s.ae_title, s.port
('CXR_AI', 11112)

Each setting is declared once below (:class:`~d2r_core.settings_spec.Setting`: name, default,
parser, documentation); :data:`SETTINGS` lists them. The destinations are the delivery
package's (:class:`delivery.settings.DeliverySettings`).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2r_core.config import (
    GIB,
    IPNetwork,
    TlsSettings,
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
from d2r_core.priority import Priority
from d2r_core.settings_spec import Group, Setting
from dicom_node.priority import PriorityPolicy, PriorityRule, parse_priority_rules

__all__ = [
    "DEFAULT_MAX_PIXEL_BYTES",
    "SETTINGS",
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


# --- the node's settings, declared once (README.md "Configuration" is made from them) ---

AE_TITLE = Setting(
    "D2R_AE_TITLE",
    "D2R",
    validate_ae_title,
    "our AE title (called AE of the listener, calling AE of the sender)",
    Group.LISTENER,
)
HOST = Setting("D2R_HOST", "0.0.0.0", str, "listen address", Group.LISTENER)
PORT = Setting("D2R_PORT", 11112, lambda t: parse_port(t, "D2R_PORT"), "DICOM port", Group.LISTENER)
MAX_PDU = Setting(
    "D2R_MAX_PDU",
    131072,
    int_at_least(0),
    "maximum PDU the listener accepts (`0`: unlimited, else at least 4096)",
    Group.LISTENER,
)
MAX_ASSOCIATIONS = Setting(
    "D2R_MAX_ASSOCIATIONS",
    10,
    int_at_least(1),
    "concurrent associations, per listener process",
    Group.LISTENER,
)
LISTENER_PROCESSES = Setting(
    "D2R_LISTENER_PROCESSES",
    1,
    _listener_processes,
    "processes receiving on the DICOM port (`d2r node`, `d2r serve`, up to 64): the first binds "
    "the port and also runs the assembler, reconciler and HTTP endpoint; each further one "
    "inherits the listening socket, and a process already serving associations leaves the next "
    "one to an idle process. One process receives at most about one core's worth (about "
    "300 MB/s on a 2-vCPU development machine); when a PACS sends over several associations at "
    "once, set it to the cores the node may use",
    Group.LISTENER,
)
ACSE_TIMEOUT = Setting(
    "D2R_ACSE_TIMEOUT",
    30.0,
    positive_float,
    "seconds to wait for association negotiation and release (ACSE)",
    Group.LISTENER,
)
DIMSE_TIMEOUT = Setting(
    "D2R_DIMSE_TIMEOUT",
    60.0,
    positive_float,
    "seconds to wait for a DIMSE message",
    Group.LISTENER,
)
NETWORK_TIMEOUT = Setting(
    "D2R_NETWORK_TIMEOUT",
    60.0,
    positive_float,
    "seconds of network silence before a DICOM connection is dropped; also the connect and "
    "read timeout of the DICOMweb and FHIR senders",
    Group.LISTENER,
)
MIN_FREE_BYTES = Setting(
    "D2R_MIN_FREE_BYTES",
    GIB,
    int_at_least(0),
    "below this free space the node answers 0xA700 (out of resources)",
    Group.LISTENER,
    shown="1 GiB",
)
SPOOL_DIR = Setting(
    "D2R_SPOOL_DIR",
    Path("d2r-data/spool"),
    Path,
    "received instances (as received) and the SRs written",
    Group.STORAGE,
)


def _default_database_url(env: Mapping[str, str]) -> str:
    """The SQLite file beside the spool."""
    return f"sqlite:///{SPOOL_DIR.read(env).parent / 'd2r.db'}"


DATABASE_URL = Setting(
    "D2R_DATABASE_URL",
    "sqlite:///d2r-data/d2r.db",
    _database_url,
    "study database: SQLite file or `postgresql+psycopg://...`",
    Group.STORAGE,
    shown="`sqlite:///<spool>/../d2r.db`",
    secret=True,
    default_from=_default_database_url,
)
DB_AUTO_UPGRADE = Setting(
    "D2R_DB_AUTO_UPGRADE",
    False,
    parse_bool,
    "upgrade an older database schema at start, under a lock (single-host installs); otherwise "
    "node, worker and serve stop and name `d2r db upgrade`",
    Group.STORAGE,
)
SPOOL_RETENTION_HOURS = Setting(
    "D2R_SPOOL_RETENTION_HOURS",
    72.0,
    non_negative_float,
    "remove a finished study's spooled files after this long; `0` keeps them",
    Group.STORAGE,
)
MAX_PIXEL_BYTES = Setting(
    "D2R_MAX_PIXEL_BYTES",
    DEFAULT_MAX_PIXEL_BYTES,
    parse_max_pixel_bytes,
    "largest pixel data of one stored image (Rows × Columns × frames × samples × bits "
    "allocated) that the status page previews and the worker reads; checked from the header "
    "before the pixels are read or inflated. A larger image gets no preview and its study fails "
    "with the sizes in the reason. 1 MiB to 128 MiB",
    Group.STORAGE,
    shown=f"40 MiB (`{DEFAULT_MAX_PIXEL_BYTES}`)",
)
NODE_NAME = Setting(
    "D2R_NODE_NAME",
    "",
    parse_node_name,
    "this node's name among the nodes sharing one database (letters, digits, `.`, `-`, `_`; at "
    "most 64): recorded with each received instance, shown by `d2r status`, a label on "
    "`/metrics`. Must be unique per node (Kubernetes: the pod name)",
    Group.NODES,
    shown="the host name",
    default_from=lambda env: default_node_name(),
)
NODE_HEARTBEAT_SECONDS = Setting(
    "D2R_NODE_HEARTBEAT_SECONDS",
    5.0,
    positive_float,
    "how often a node records in the study database that it is alive",
    Group.NODES,
)
NODE_EXPIRE_SECONDS = Setting(
    "D2R_NODE_EXPIRE_SECONDS",
    30.0,
    positive_float,
    "a node silent this long is taken as dead: a surviving node expires the associations it "
    "held open, so their studies complete; at least twice the heartbeat",
    Group.NODES,
)
DB_RETRY_SECONDS = Setting(
    "D2R_DB_RETRY_SECONDS",
    30.0,
    non_negative_float,
    "how long the assembler and the workers retry their database work through a database outage "
    "(a PostgreSQL restart or failover) before giving up; the study is then left to the "
    "reconciler",
    Group.NODES,
)
DB_INGEST_WAIT_SECONDS = Setting(
    "D2R_DB_INGEST_WAIT_SECONDS",
    5.0,
    non_negative_float,
    "how long an incoming instance (C-STORE, STOW-RS) waits for the database before it is "
    "refused with a failure status (C-STORE `0x0110`, STOW-RS 503): never success without a "
    "durable record",
    Group.NODES,
)
STUDY_QUIET_SECONDS = Setting(
    "D2R_STUDY_QUIET_SECONDS",
    10.0,
    positive_float,
    "a study is complete after this long without a new instance",
    Group.ASSEMBLY,
)
URGENT_QUIET_SECONDS: Setting[float | None] = Setting(
    "D2R_URGENT_QUIET_SECONDS",
    None,
    positive_float,
    "... an urgent or stat study after this long instead (a shorter quiet period for the studies "
    "that need their draft first)",
    Group.ASSEMBLY,
    shown="the quiet period",
)
STUDY_FORCE_SECONDS = Setting(
    "D2R_STUDY_FORCE_SECONDS",
    600.0,
    positive_float,
    "... or this long after its first instance, whatever happens (at least the quiet period)",
    Group.ASSEMBLY,
)
STUDY_RELEASE_GRACE_SECONDS = Setting(
    "D2R_STUDY_RELEASE_GRACE_SECONDS",
    2.0,
    non_negative_float,
    "... or this long after the association that brought its last instance was released, when "
    "no other association of the study is open (set it to the quiet period or more to rely on "
    "the quiet period alone)",
    Group.ASSEMBLY,
)
PRIORITY_RULES: Setting[tuple[PriorityRule, ...]] = Setting(
    "D2R_PRIORITY_RULES",
    (),
    parse_priority_rules,
    "priority by sender, ahead of the headers: `KEY[,KEY...]=PRIORITY` rules separated by `;`, "
    "a key a calling AE title, `called:TITLE` or an IP network, a priority `stat`, `urgent`, "
    "`routine` or `low` (e.g. `ED_CR1,ICU_DX=stat; 10.2.0.0/16=urgent`; docs/operations.md, "
    '"Priority")',
    Group.ASSEMBLY,
    shown="none",
)
PRIORITY_DEFAULT = Setting(
    "D2R_PRIORITY_DEFAULT",
    Priority.ROUTINE,
    Priority.parse,
    "the priority of a study that no rule, header or C-STORE Priority names",
    Group.ASSEMBLY,
)
PRIORITY_AGING_SECONDS = Setting(
    "D2R_PRIORITY_AGING_SECONDS",
    1800.0,
    non_negative_float,
    "a routine or low study queued this long is served as urgent, so a stream of urgent work "
    "never starves it (0: never)",
    Group.ASSEMBLY,
)
RECONCILE_SECONDS = Setting(
    "D2R_RECONCILE_SECONDS",
    30.0,
    positive_float,
    "how often the reconciler looks for queued studies whose message may be lost (expired "
    "claims are checked every half second)",
    Group.ASSEMBLY,
)
MAX_ATTEMPTS = Setting(
    "D2R_MAX_ATTEMPTS",
    3,
    int_at_least(1),
    "worker attempts per study: each claim counts one; an unexpected error or a lost worker on "
    "the last one fails the study with its stage and reason",
    Group.ASSEMBLY,
)
SEND_RETRIES = Setting(
    "D2R_SEND_RETRIES",
    5,
    int_at_least(0),
    "retries after a failed send (transient errors)",
    Group.DELIVERY,
)
SEND_RETRY_DELAY = Setting(
    "D2R_SEND_RETRY_DELAY",
    30.0,
    non_negative_float,
    "seconds before the first retry, doubled for each next one",
    Group.DELIVERY,
)
STOW_MAX_BYTES = Setting(
    "D2R_STOW_MAX_BYTES",
    GIB,
    int_at_least(1024),
    "largest STOW-RS request (`POST /dicom-web/studies` on `D2R_HTTP_PORT`); larger ones get "
    "413. Parts stream to the spool, so this bounds disk, not memory",
    Group.HTTP,
    shown="1 GiB",
)
STOW_MAX_CONCURRENT = Setting(
    "D2R_STOW_MAX_CONCURRENT",
    4,
    int_at_least(1),
    "STOW-RS requests received at once; one more gets 503 with `Retry-After` before its body is "
    "read",
    Group.HTTP,
)


def _signed_sr_max_bytes(text: str) -> int:
    value = int_at_least(0)(text)
    if 0 < value < 1024:
        raise ValueError(f"must be 0 (off) or >= 1024, got {text}")
    return value


SIGNED_SR_MAX_BYTES = Setting(
    "D2R_SIGNED_SR_MAX_BYTES",
    1 << 20,
    _signed_sr_max_bytes,
    "the largest Structured Report (Basic Text, Enhanced, Comprehensive) the node reads whole "
    "to take it as a signed report from the PACS (COMPLETE and VERIFIED: stored as the study's "
    "signed report; otherwise recorded only; never an SR d2r made); a larger SR is stored as "
    "an instance, not read. `0`: every SR is stored as an instance "
    '(docs/operations.md, "Signed reports and agreement")',
    Group.FEEDBACK,
    shown="`1048576` (1 MiB)",
)
ALLOWED_CALLING_AETS: Setting[tuple[str, ...]] = Setting(
    "D2R_ALLOWED_CALLING_AETS",
    (),
    parse_ae_titles,
    "comma-separated calling AE titles allowed to associate (with `D2R_ALLOWED_NETWORKS` also "
    "unset and `D2R_HOST` off loopback, the node warns at start)",
    Group.ACCESS,
    shown="any",
)
ALLOWED_NETWORKS: Setting[tuple[IPNetwork, ...]] = Setting(
    "D2R_ALLOWED_NETWORKS",
    (),
    parse_networks,
    "comma-separated IP addresses / CIDR networks allowed to connect",
    Group.ACCESS,
    shown="any",
)
TLS_CERT: Setting[Path | None] = Setting(
    "D2R_TLS_CERT",
    None,
    existing_file,
    "DICOM TLS on the listener: PEM certificate (chain), set with `D2R_TLS_KEY`; also the "
    "client certificate of TLS destinations (DICOM TLS, HTTPS)",
    Group.ACCESS,
)
TLS_KEY: Setting[Path | None] = Setting(
    "D2R_TLS_KEY",
    None,
    existing_file,
    "the private key of `D2R_TLS_CERT` (PEM, unencrypted; set both or neither)",
    Group.ACCESS,
)
TLS_CA: Setting[Path | None] = Setting(
    "D2R_TLS_CA",
    None,
    existing_file,
    "CA bundle: verifies clients (listener) and the destinations' certificates (DICOM TLS, and "
    "HTTPS for DICOMweb and FHIR; else the system store)",
    Group.ACCESS,
)
TLS_REQUIRE_CLIENT_CERT = Setting(
    "D2R_TLS_REQUIRE_CLIENT_CERT",
    False,
    parse_bool,
    "refuse TLS clients without a certificate signed by `D2R_TLS_CA`; DICOM TLS without it (or "
    "without `D2R_TLS_CA`) is warned at start",
    Group.ACCESS,
)
#: every setting :class:`NodeSettings` reads, in declaration order
SETTINGS: tuple[Setting[Any], ...] = (
    AE_TITLE,
    HOST,
    PORT,
    MAX_PDU,
    MAX_ASSOCIATIONS,
    LISTENER_PROCESSES,
    ACSE_TIMEOUT,
    DIMSE_TIMEOUT,
    NETWORK_TIMEOUT,
    MIN_FREE_BYTES,
    SPOOL_DIR,
    DATABASE_URL,
    DB_AUTO_UPGRADE,
    SPOOL_RETENTION_HOURS,
    MAX_PIXEL_BYTES,
    NODE_NAME,
    NODE_HEARTBEAT_SECONDS,
    NODE_EXPIRE_SECONDS,
    DB_RETRY_SECONDS,
    DB_INGEST_WAIT_SECONDS,
    STUDY_QUIET_SECONDS,
    URGENT_QUIET_SECONDS,
    STUDY_FORCE_SECONDS,
    STUDY_RELEASE_GRACE_SECONDS,
    PRIORITY_RULES,
    PRIORITY_DEFAULT,
    PRIORITY_AGING_SECONDS,
    RECONCILE_SECONDS,
    MAX_ATTEMPTS,
    SEND_RETRIES,
    SEND_RETRY_DELAY,
    STOW_MAX_BYTES,
    STOW_MAX_CONCURRENT,
    SIGNED_SR_MAX_BYTES,
    ALLOWED_CALLING_AETS,
    ALLOWED_NETWORKS,
    TLS_CERT,
    TLS_KEY,
    TLS_CA,
    TLS_REQUIRE_CLIENT_CERT,
)


@dataclass(frozen=True)
class NodeSettings:
    """Settings of the DICOM node (listener, spool, study timers, sender).

    Build with :meth:`from_env`; the defaults below are those of an unset variable.
    """

    ae_title: str = AE_TITLE.default
    host: str = HOST.default
    port: int = PORT.default
    spool_dir: Path = SPOOL_DIR.default
    database_url: str = DATABASE_URL.default
    #: upgrade a database at an older schema revision at start, under a lock (single-host installs)
    db_auto_upgrade: bool = DB_AUTO_UPGRADE.default
    study_quiet_seconds: float = STUDY_QUIET_SECONDS.default
    #: the quiet period of urgent and stat studies (None: the quiet period)
    urgent_quiet_seconds: float | None = URGENT_QUIET_SECONDS.default
    study_force_seconds: float = STUDY_FORCE_SECONDS.default
    #: complete a study this long after its last association was released (see studies.py)
    study_release_grace_seconds: float = STUDY_RELEASE_GRACE_SECONDS.default
    reconcile_seconds: float = RECONCILE_SECONDS.default
    #: worker attempts per study (claims, each ended by an unexpected error or a lost worker)
    max_attempts: int = MAX_ATTEMPTS.default
    max_pdu: int = MAX_PDU.default
    #: associations each listener process accepts at once
    max_associations: int = MAX_ASSOCIATIONS.default
    #: processes accepting associations on the one port (the first runs the assembler and HTTP)
    listener_processes: int = LISTENER_PROCESSES.default
    acse_timeout: float = ACSE_TIMEOUT.default
    dimse_timeout: float = DIMSE_TIMEOUT.default
    network_timeout: float = NETWORK_TIMEOUT.default
    send_retries: int = SEND_RETRIES.default
    send_retry_delay: float = SEND_RETRY_DELAY.default
    min_free_bytes: int = MIN_FREE_BYTES.default
    #: calling AE titles allowed to associate (empty: any)
    allowed_calling_aets: tuple[str, ...] = ALLOWED_CALLING_AETS.default
    #: peer addresses allowed to associate (empty: any)
    allowed_networks: tuple[IPNetwork, ...] = ALLOWED_NETWORKS.default
    tls: TlsSettings = TlsSettings()
    #: delete a finished study's spooled files this long after it finished (0: keep forever)
    spool_retention_hours: float = SPOOL_RETENTION_HOURS.default
    #: largest STOW-RS request body accepted (413 beyond); parts stream to the spool, so this
    #: bounds the disk a request fills, not memory
    stow_max_bytes: int = STOW_MAX_BYTES.default
    #: STOW-RS requests received at once (503 with Retry-After beyond, before the body is read)
    stow_max_concurrent: int = STOW_MAX_CONCURRENT.default
    #: the largest SR read whole to take it as a signed report (0: none is)
    signed_sr_max_bytes: int = SIGNED_SR_MAX_BYTES.default
    #: largest pixel data of one stored image that the status page and the worker read
    #: (Rows x Columns x frames x samples x bits); checked before reading or inflating pixels
    max_pixel_bytes: int = MAX_PIXEL_BYTES.default
    #: this node's name among the replicas on one database (default: the host name)
    node_name: str = field(default_factory=default_node_name)
    #: how often a node records in the study database that it is alive
    node_heartbeat_seconds: float = NODE_HEARTBEAT_SECONDS.default
    #: a node silent this long is taken as dead: a survivor expires its open associations
    node_expire_seconds: float = NODE_EXPIRE_SECONDS.default
    #: how long the assembler and the workers retry their database work through an outage
    db_retry_seconds: float = DB_RETRY_SECONDS.default
    #: how long an incoming instance waits for the database before a failure status
    db_ingest_wait_seconds: float = DB_INGEST_WAIT_SECONDS.default
    #: the routing rules and the default priority the receivers decide priorities with
    priority: PriorityPolicy = PriorityPolicy()
    #: a routine or low study queued this long is served as urgent (0: never)
    priority_aging_seconds: float = PRIORITY_AGING_SECONDS.default

    # Longer than a screen: one line per setting of the node, each read through its declaration
    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NodeSettings:
        """Build settings from ``D2R_*`` variables in ``env``.

        Raises
        ------
        ConfigError
            Naming the first invalid setting.
        """
        spool_dir = SPOOL_DIR.read(env)
        database_url = DATABASE_URL.read(env)
        quiet = STUDY_QUIET_SECONDS.read(env)
        force = STUDY_FORCE_SECONDS.read(env)
        if force < quiet:
            raise ConfigError(
                STUDY_FORCE_SECONDS.name,
                f"must be >= D2R_STUDY_QUIET_SECONDS ({quiet:g}), got {force:g}",
            )
        tls = _tls_settings(env)
        max_pdu = MAX_PDU.read(env)
        if max_pdu != 0 and max_pdu < 4096:
            raise ConfigError(MAX_PDU.name, f"must be 0 (unlimited) or >= 4096, got {max_pdu}")
        heartbeat = NODE_HEARTBEAT_SECONDS.read(env)
        expire = NODE_EXPIRE_SECONDS.read(env)
        if expire < 2 * heartbeat:
            raise ConfigError(
                NODE_EXPIRE_SECONDS.name,
                f"must be at least twice D2R_NODE_HEARTBEAT_SECONDS ({heartbeat:g} s), got "
                f"{expire:g}: a live node would be taken as dead between two heartbeats",
            )
        return cls(
            ae_title=AE_TITLE.read(env),
            host=HOST.read(env),
            port=PORT.read(env),
            spool_dir=spool_dir,
            database_url=database_url,
            db_auto_upgrade=DB_AUTO_UPGRADE.read(env),
            study_quiet_seconds=quiet,
            urgent_quiet_seconds=URGENT_QUIET_SECONDS.read(env),
            study_force_seconds=force,
            study_release_grace_seconds=STUDY_RELEASE_GRACE_SECONDS.read(env),
            reconcile_seconds=RECONCILE_SECONDS.read(env),
            max_pdu=max_pdu,
            max_associations=MAX_ASSOCIATIONS.read(env),
            listener_processes=LISTENER_PROCESSES.read(env),
            acse_timeout=ACSE_TIMEOUT.read(env),
            dimse_timeout=DIMSE_TIMEOUT.read(env),
            network_timeout=NETWORK_TIMEOUT.read(env),
            send_retries=SEND_RETRIES.read(env),
            max_attempts=MAX_ATTEMPTS.read(env),
            send_retry_delay=SEND_RETRY_DELAY.read(env),
            min_free_bytes=MIN_FREE_BYTES.read(env),
            allowed_calling_aets=ALLOWED_CALLING_AETS.read(env),
            allowed_networks=ALLOWED_NETWORKS.read(env),
            tls=tls,
            spool_retention_hours=SPOOL_RETENTION_HOURS.read(env),
            stow_max_bytes=STOW_MAX_BYTES.read(env),
            stow_max_concurrent=STOW_MAX_CONCURRENT.read(env),
            signed_sr_max_bytes=SIGNED_SR_MAX_BYTES.read(env),
            max_pixel_bytes=MAX_PIXEL_BYTES.read(env),
            node_name=NODE_NAME.read(env),
            node_heartbeat_seconds=heartbeat,
            node_expire_seconds=expire,
            db_retry_seconds=DB_RETRY_SECONDS.read(env),
            db_ingest_wait_seconds=DB_INGEST_WAIT_SECONDS.read(env),
            priority=PriorityPolicy(PRIORITY_RULES.read(env), PRIORITY_DEFAULT.read(env)),
            priority_aging_seconds=PRIORITY_AGING_SECONDS.read(env),
        )

    def retry_delay(self, attempt: int) -> float:
        """Seconds before retry ``attempt`` (1-based): the base delay doubled per attempt."""
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        return float(self.send_retry_delay * 2.0 ** (attempt - 1))


def _tls_settings(env: Mapping[str, str]) -> TlsSettings:
    cert = TLS_CERT.read(env)
    key = TLS_KEY.read(env)
    ca = TLS_CA.read(env)
    require = TLS_REQUIRE_CLIENT_CERT.read(env)
    if (cert is None) != (key is None):
        missing = "D2R_TLS_KEY" if key is None else "D2R_TLS_CERT"
        raise ConfigError(missing, "D2R_TLS_CERT and D2R_TLS_KEY must be set together")
    if require and (cert is None or ca is None):
        raise ConfigError(
            "D2R_TLS_REQUIRE_CLIENT_CERT",
            "needs D2R_TLS_CERT, D2R_TLS_KEY and D2R_TLS_CA (to verify the clients)",
        )
    return TlsSettings(cert=cert, key=key, ca=ca, require_client_cert=require)
