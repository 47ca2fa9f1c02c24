"""The HTTP endpoint of a d2r process: metrics, health, readiness and the status page.

Standard library only (:class:`http.server.ThreadingHTTPServer` in a daemon thread); read-only.

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
=========================  =====================================================================

``/healthz`` and ``/readyz`` answer ``{"status": "ok"|"fail", "checks": {name: "ok"|error}}``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from dicom_node.observability_settings import ObservabilitySettings

__all__ = ["Check", "ObservabilityServer", "ObservabilitySettings", "StatusPages", "run_checks"]

logger = logging.getLogger(__name__)

#: A health or readiness check: returns normally when fine, raises (any exception) when not.
Check = Callable[[], None]


def run_checks(checks: Mapping[str, Check]) -> tuple[bool, dict[str, str]]:
    """Run every check; returns whether all passed and each one's ``"ok"`` or error text."""
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = "ok"
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {exc}"[:300]
    return all(v == "ok" for v in results.values()), results


class StatusPages:
    """The status page's view of a study store (I/O around :mod:`dicom_node.status_page`).

    Parameters
    ----------
    store : StudyStore
        The study database.
    show_phi : bool
        Show patient name and ID, read from the first instance's header.
    """

    def __init__(self, store: Any, *, show_phi: bool = False, limit: int = 50) -> None:
        self.store = store
        self.show_phi = show_phi
        self.limit = limit
        self._previews: OrderedDict[tuple[str, tuple[str, ...]], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def _patient(self, study_uid: str) -> Any:
        import pydicom

        from dicom_node.status_page import PatientLabel

        for record in self.store.instances(study_uid):
            try:
                ds = pydicom.dcmread(record.path, stop_before_pixels=True)
            except Exception:
                continue
            return PatientLabel(str(ds.get("PatientName", "")), str(ds.get("PatientID", "")))
        return None

    def index(self) -> str:
        from dicom_node.status_page import render_index

        views = self.store.recent(self.limit)
        patients = None
        if self.show_phi:
            patients = {
                v.study_instance_uid: p
                for v in views
                if (p := self._patient(v.study_instance_uid)) is not None
            }
        return render_index(views, counts=self.store.count_by_state(), patients=patients)

    def study(self, study_uid: str) -> str | None:
        from dicom_node.status_page import read_sr_boxes, render_study

        view = self.store.get(study_uid)
        if view is None:
            return None
        boxes = read_sr_boxes(view.result_paths)
        return render_study(
            view,
            self.store.events(study_uid),
            boxes=boxes,
            has_preview=view.instance_count > 0,
            patient=self._patient(study_uid) if self.show_phi else None,
        )

    def preview(self, study_uid: str) -> bytes | None:
        """The preview PNG: the image the boxes refer to (else the first CR/DX instance)."""
        import pydicom

        from dicom_node.status_page import read_sr_boxes, render_preview

        view = self.store.get(study_uid)
        if view is None:
            return None
        key = (study_uid, view.result_paths)
        with self._lock:
            if key in self._previews:
                return self._previews[key]
        boxes = read_sr_boxes(view.result_paths)
        records = self.store.instances(study_uid)
        referenced = {b.sop_instance_uid for b in boxes}
        chosen = [r for r in records if r.sop_instance_uid in referenced] or [
            r for r in records if r.modality in ("CR", "DX")
        ]
        if not chosen:
            return None
        png = render_preview(pydicom.dcmread(chosen[0].path), boxes)
        with self._lock:
            self._previews[key] = png
            while len(self._previews) > 32:
                self._previews.popitem(last=False)
        return png


class ObservabilityServer:
    """``/metrics``, ``/healthz``, ``/readyz`` and (with ``pages``) the status page.

    Parameters
    ----------
    host, port : str, int
        Bind address; port 0 picks a free port (see :attr:`port` after :meth:`start`).
    registry : CollectorRegistry
        What ``/metrics`` serves.
    health, ready : mapping of str to Check
        The checks of ``/healthz`` and ``/readyz``.
    pages : StatusPages, optional
        The status page; without it ``/`` answers 404.
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
    ) -> None:
        self.host = host
        self.requested_port = port
        self.registry = registry
        self.health = dict(health)
        self.ready = dict(ready)
        self.pages = pages
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not started")
        return int(self._server.server_address[1])

    def start(self) -> ObservabilityServer:
        server = ThreadingHTTPServer((self.host, self.requested_port), _handler_class(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="d2r-http", kwargs={"poll_interval": 0.5}, daemon=True
        )
        self._thread.start()
        logger.info(
            "HTTP endpoint on http://%s:%d/ (metrics, healthz, readyz)", self.host, self.port
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # -------------------------------------------------------------- request handling
    def handle(self, path: str) -> tuple[int, str, bytes]:
        """Answer a GET of ``path``: (status, content type, body)."""
        route = urlsplit(path).path
        if route == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if route in ("/healthz", "/readyz"):
            ok, results = run_checks(self.health if route == "/healthz" else self.ready)
            body = json.dumps({"status": "ok" if ok else "fail", "checks": results}).encode()
            return (200 if ok else 503), "application/json", body
        if self.pages is None:
            return _not_found()
        if route in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", self.pages.index().encode()
        parts = route.strip("/").split("/")
        if len(parts) in (2, 3) and parts[0] == "studies":
            uid = unquote(parts[1])
            if len(parts) == 2:
                page = self.pages.study(uid)
                if page is not None:
                    return 200, "text/html; charset=utf-8", page.encode()
            elif parts[2] == "preview.png":
                png = self.pages.preview(uid)
                if png is not None:
                    return 200, "image/png", png
        return _not_found()


def _not_found() -> tuple[int, str, bytes]:
    return 404, "application/json", b'{"status": "not found"}'


def _handler_class(owner: ObservabilityServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "d2r"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            try:
                status, content_type, body = owner.handle(self.path)
            except Exception:
                logger.exception("HTTP GET %s failed", urlsplit(self.path).path)
                status, content_type, body = 500, "application/json", b'{"status": "error"}'
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            if content_type.startswith("text/html"):
                self.send_header(
                    "Content-Security-Policy",
                    "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'",
                )
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            logger.debug("HTTP %s", format % args)

    return Handler
