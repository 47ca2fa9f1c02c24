"""Composition helpers shared by the ``serve``, ``node`` and ``worker`` subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from d2r_core.config import merged_environment

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

logger = logging.getLogger("d2r")


def without_credentials(broker_url: str) -> str:
    """The broker URL for a log line: each entry of a Sentinel list without its password."""
    entries = []
    for entry in broker_url.split(";"):
        scheme, sep, rest = entry.strip().partition("://")
        entries.append(f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else entry)
    return ";".join(entries)


def environment(args: argparse.Namespace) -> dict[str, str]:
    """Config file values (``--config`` or ``D2R_CONFIG``) overridden by the environment."""
    path = getattr(args, "config", None) or os.environ.get("D2R_CONFIG")
    return merged_environment(path, os.environ)


def configure_logging(env: dict[str, str]) -> None:
    """Root logging: ``D2R_LOG_LEVEL`` and ``D2R_LOG_FORMAT`` (text or JSON lines)."""
    from observability import logs
    from observability.settings import ObservabilitySettings

    obs = ObservabilitySettings.from_env(env)
    logs.configure_logging(env.get("D2R_LOG_LEVEL", "INFO"), obs.log_format)


def use_multiprocess_metrics(path: Path, *, clean: bool) -> Path:
    """Make this process (and its children) write metrics to ``path`` (multiprocess mode).

    Must run before ``prometheus_client`` is first imported. ``clean`` removes the files of an
    earlier run (``d2r serve`` at start).
    """
    path = path.resolve()
    if clean and path.is_dir():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def multiprocess_dir() -> Path | None:
    """The metrics folder this process was started with, if any."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


# Longer than a screen: the endpoint's settings mapped one to one onto the authenticator, TLS and
# server parameters
def start_http(
    env: Mapping[str, str],
    *,
    collectors: Sequence[Any] = (),
    health: Mapping[str, Callable[[], None]],
    ready: Mapping[str, Callable[[], None]],
    details: Mapping[str, Callable[[], str]] | None = None,
    store: Any = None,
    ingest: Any = None,
    receivers: Mapping[str, Any] | None = None,
    agreement: Callable[[], Mapping[str, Any]] | None = None,
    node: str | None = None,
) -> Any:
    """Start the HTTP endpoint of ``D2R_HTTP_HOST:D2R_HTTP_PORT``; None when the port is 0.

    ``ingest`` is the STOW-RS receiver of the node (``/dicom-web/``), if it runs one;
    ``receivers`` what answers the other POST routes (``fhir``); ``agreement`` the figures of
    the status page's section on signed reports; ``node`` its name, a label on every metric.
    """
    from d2r_core.errors import ConfigError
    from d2r_http.auth import Authenticator, FailureLimiter
    from d2r_http.server import tls_context
    from dicom_node.settings import NodeSettings
    from observability.http import ObservabilityServer
    from observability.metrics import build_registry
    from observability.pages import StatusPages
    from observability.settings import ObservabilitySettings

    obs = ObservabilitySettings.from_env(env)
    if obs.http_port == 0:
        return None
    auth = Authenticator(
        required=obs.http_auth_required,
        tokens_file=obs.http_tokens_file,
        users_file=obs.http_users_file,
        trusted_proxies=obs.http_trusted_proxies,
        proxy_header=obs.http_proxy_header,
        proxy_roles=obs.http_proxy_roles,
        limiter=FailureLimiter(
            obs.http_auth_max_failures,
            obs.http_auth_window_seconds,
            max_total=obs.http_auth_max_failures_total,
        ),
        max_hashing=obs.http_auth_max_hashing,
    )
    if auth.required and not auth.has_credentials and obs.http_tls_ca is None:
        logger.warning(
            "HTTP endpoint on %s needs credentials but none are configured: only /healthz and "
            "/readyz answer; set D2R_HTTP_TOKENS_FILE, D2R_HTTP_USERS_FILE or "
            "D2R_HTTP_TRUSTED_PROXIES",
            obs.http_host,
        )
    tls = None
    if obs.http_tls_cert is not None and obs.http_tls_key is not None:
        try:
            tls = tls_context(obs.http_tls_cert, obs.http_tls_key, obs.http_tls_ca)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                "D2R_HTTP_TLS_CERT", f"cannot load certificate and key: {exc}"
            ) from None
    server = ObservabilityServer(
        obs.http_host,
        obs.http_port,
        registry=build_registry(multiprocess_dir(), collectors, node=node),
        health=health,
        ready=ready,
        details=details,
        pages=None
        if store is None
        else StatusPages(
            store,
            show_phi=obs.status_page_phi,
            max_pixel_bytes=NodeSettings.from_env(env).max_pixel_bytes,
            agreement=agreement,
        ),
        auth=auth,
        tls=tls,
        ingest=ingest,
        receivers=receivers,
        max_connections=obs.http_max_connections,
        max_connections_per_client=obs.http_max_connections_per_client,
    )
    try:
        return server.start()
    except OSError as exc:  # the DICOM node keeps working; probes and scrapes will notice
        logger.error(
            "HTTP endpoint not started: cannot bind %s:%d (%s); set D2R_HTTP_PORT",
            obs.http_host,
            obs.http_port,
            exc,
        )
        return None


def stop_event_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (graceful stop)."""
    stop = threading.Event()

    def _handler(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return stop


def association_rejected(audit: Any) -> Callable[[Any, str], None]:
    """Count and audit an association the listener refused itself (e.g. by peer address)."""
    from observability import metrics
    from observability.audit import ASSOCIATION

    def record(assoc: Any, reason: str) -> None:
        metrics.observe_association(False, reason)
        primitive = getattr(assoc.requestor, "primitive", None)
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        audit.try_record(
            ASSOCIATION,
            calling_ae_title=str(getattr(primitive, "calling_ae_title", "") or "").strip(),
            called_ae_title=str(getattr(primitive, "called_ae_title", "") or "").strip(),
            peer_address=assoc.requestor.address,
            peer_port=assoc.requestor.port,
            result="rejected",
            reason=reason,
            start=now,
            end=now,
            instances=0,
        )

    return record


def start_listener(
    node: Any,
    spool: Any,
    store: Any,
    listener_audit: Any,
    released: Callable[[], None],
    *,
    shared: bool = False,
    inherited: socket.socket | None = None,
) -> Any:
    """The DICOM listener of a node process, its instances audited and recorded in ``store``,
    its signed-report SRs taken by :func:`report_intake`."""
    from dicom_node.scp import AssociationStudies, start_server
    from studydb.ingest import NodeRecorder

    recorder = NodeRecorder(store, node.node_name, wait_seconds=node.db_ingest_wait_seconds)
    server = start_server(
        node,
        spool,
        listener_audit.recorder(recorder),
        block=False,
        extra_handlers=listener_audit.handlers(),
        on_rejected=association_rejected(listener_audit.audit),
        associations=AssociationStudies(recorder, on_released=released),
        shared=shared,
        inherited=inherited,
        reports=report_intake(node, store),
    )
    assert server is not None
    return server


def report_intake(node: Any, store: Any) -> Any:
    """The signed-report path for SRs from the PACS (:class:`feedback.dicom_sr.SrIntake`), or
    None when ``D2R_SIGNED_SR_MAX_BYTES`` is 0."""
    if node.signed_sr_max_bytes == 0:
        return None
    from feedback.dicom_sr import SrIntake

    return SrIntake(
        store, max_bytes=node.signed_sr_max_bytes, wait_seconds=node.db_ingest_wait_seconds
    )
