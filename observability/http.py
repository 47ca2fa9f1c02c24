"""What a d2r process serves on its HTTP endpoint (:mod:`d2r_http`): metrics, health,
readiness, the status page, and the node's STOW-RS receiver and FHIR endpoint.

:class:`ObservabilityServer` is the endpoint with these handlers mounted on the route table;
the server, its authentication, TLS and bounds are :mod:`d2r_http`'s. Refusals are counted in
``d2r_http_refusals_total{reason}``.

=========================  =====================================================================
path                       answer
=========================  =====================================================================
``/metrics``               Prometheus text format (every process, in multiprocess mode)
``/healthz``               200 while the process runs and its database answers, else 503
``/readyz``                200 when it can do its work (node: listener bound, database, broker;
                           worker: model loaded, broker), else 503
``/``                      recent studies (node and ``serve`` only)
``/studies/<uid>``         one study: timings, report text, deliveries, event timeline
``/studies/<uid>/preview.png``  the frontal image with the predicted boxes
``/dicom-web/studies``     the STOW-RS receiver (role ``ingest``; 404 unless the node installs it)
``/fhir/DiagnosticReport``  ``POST``: a signed report from the RIS (role ``feedback``;
                           :mod:`feedback.fhir`; 404 unless the node installs it)
=========================  =====================================================================

``/healthz`` and ``/readyz`` answer ``{"status": "ok"|"fail", "checks": {name: "ok"|"fail"}}``;
a caller with a valid credential also gets ``"errors": {name: text}``.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from typing import Any

from d2r_http.auth import Authenticator, Principal
from d2r_http.server import Handler, HttpServer, IngestHandler, not_found
from observability.pages import StatusPages

__all__ = ["Check", "ObservabilityServer", "run_checks"]

logger = logging.getLogger(__name__)

#: A health or readiness check: returns normally when fine, raises (any exception) when not.
Check = Callable[[], None]


def run_checks(checks: Mapping[str, Check]) -> tuple[bool, dict[str, str], dict[str, str]]:
    """Run every check: whether all passed, each one's ``"ok"`` or ``"fail"``, and the error
    text of each failed one (for logs and authenticated callers only: it can name hosts, users
    and paths)."""
    results: dict[str, str] = {}
    errors: dict[str, str] = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = "ok"
        except Exception as exc:
            results[name] = "fail"
            errors[name] = f"{type(exc).__name__}: {exc}"[:300]
    return not errors, results, errors


def _count_refusal(reason: str) -> None:
    from observability import metrics

    metrics.observe_http_refusal(reason)


def _detail(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as exc:  # a fact that cannot be read is not a failed probe
        return f"unknown ({type(exc).__name__})"


class ObservabilityServer(HttpServer):
    """``/metrics``, ``/healthz``, ``/readyz``, (with ``pages``) the status page, (with
    ``ingest``) the STOW-RS receiver and (with ``receivers``) the other POST routes, such as
    the FHIR endpoint, on one :class:`~d2r_http.server.HttpServer`.

    Parameters
    ----------
    host, port : str, int
        Bind address; port 0 picks a free port (see :attr:`port` after :meth:`start`).
    registry : CollectorRegistry
        What ``/metrics`` serves.
    health, ready : mapping of str to Check
        The checks of ``/healthz`` and ``/readyz``.
    details : mapping of str to callable, optional
        Facts ``/readyz`` adds for a caller that authenticated, e.g. the inference backend.
    pages : StatusPages, optional
        The status page; without it ``/`` answers 404.
    auth, tls, ingest, receivers, max_connections, max_connections_per_client
        As for :class:`~d2r_http.server.HttpServer`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: Any,
        health: Mapping[str, Check],
        ready: Mapping[str, Check],
        pages: StatusPages | None = None,
        details: Mapping[str, Callable[[], str]] | None = None,
        auth: Authenticator | None = None,
        tls: ssl.SSLContext | None = None,
        ingest: IngestHandler | None = None,
        receivers: Mapping[str, IngestHandler] | None = None,
        max_connections: int = 64,
        max_connections_per_client: int = 16,
    ) -> None:
        self.registry = registry
        self.health = dict(health)
        self.ready = dict(ready)
        self.details = dict(details or {})
        self.pages = pages
        self._last_errors: dict[str, str] = {}
        self._errors_lock = threading.Lock()
        handlers: dict[str, Handler] = {
            "metrics": self._metrics,
            "healthz": lambda _params, who: self.probe("healthz", detailed=who is not None),
            "readyz": lambda _params, who: self.probe("readyz", detailed=who is not None),
        }
        if pages is not None:
            handlers.update(index=self._index, study=self._study, preview=self._preview)
        super().__init__(
            host,
            port,
            handlers=handlers,
            auth=auth,
            tls=tls,
            ingest=ingest,
            receivers=receivers,
            max_connections=max_connections,
            max_connections_per_client=max_connections_per_client,
            on_refusal=_count_refusal,
        )

    def probe(self, name: str, *, detailed: bool) -> tuple[int, str, bytes]:
        """``/healthz`` or ``/readyz``: each check's ``ok``/``fail``; the error texts only for a
        caller that authenticated (``detailed``). A check's error is logged when it changes."""
        ok, results, errors = run_checks(self.health if name == "healthz" else self.ready)
        with self._errors_lock:
            for check, text in errors.items():
                if self._last_errors.get(f"{name}/{check}") != text:
                    logger.warning("%s check %s fails: %s", name, check, text)
            for check in results:
                key = f"{name}/{check}"
                if check in errors:
                    self._last_errors[key] = errors[check]
                elif self._last_errors.pop(key, None) is not None:
                    logger.info("%s check %s passes again", name, check)
        answer: dict[str, Any] = {"status": "ok" if ok else "fail", "checks": results}
        if detailed and errors:
            answer["errors"] = errors
        if detailed and name == "readyz" and self.details:
            answer["details"] = {key: _detail(fn) for key, fn in self.details.items()}
        return (200 if ok else 503), "application/json", json.dumps(answer).encode()

    def _metrics(
        self, _params: Mapping[str, str], _who: Principal | None
    ) -> tuple[int, str, bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)

    def _index(self, _params: Mapping[str, str], _who: Principal | None) -> tuple[int, str, bytes]:
        assert self.pages is not None
        return 200, "text/html; charset=utf-8", self.pages.index().encode()

    def _study(self, params: Mapping[str, str], _who: Principal | None) -> tuple[int, str, bytes]:
        assert self.pages is not None
        page = self.pages.study(params["study"])
        if page is None:
            return not_found()
        return 200, "text/html; charset=utf-8", page.encode()

    def _preview(self, params: Mapping[str, str], _who: Principal | None) -> tuple[int, str, bytes]:
        assert self.pages is not None
        png = self.pages.preview(params["study"])
        if png is None:
            return not_found()
        return 200, "image/png", png
