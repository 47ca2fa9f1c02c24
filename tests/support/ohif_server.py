"""Serve the prebuilt OHIF viewer and Orthanc's DICOMweb API from one origin.

The browser sees a single origin, so Orthanc needs no CORS set-up:

- ``/app-config.js`` is generated (:func:`app_config_js`), not read from disk;
- ``/dicom-web*`` and ``/wado*`` are forwarded to Orthanc with their method,
  query, body and headers. The browser's ``Host`` header is kept because
  Orthanc builds the BulkDataURIs of its metadata from it; hop-by-hop headers
  and ``Accept-Encoding`` are dropped and the body goes back whole with a
  ``Content-Length`` (multipart answers pass through unchanged);
- any other path is a file of ``dist/`` or, for client-side routes such as
  ``/viewer``, ``index.html``.
"""

from __future__ import annotations

import http.client
import json
import logging
import mimetypes
import shutil
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.errors import ViewerError

logger = logging.getLogger(__name__)

PROXIED_PREFIXES = ("/dicom-web", "/wado")
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
DROPPED_REQUEST_HEADERS = HOP_BY_HOP_HEADERS | {"accept-encoding", "content-length"}
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP_HEADERS | {"content-length", "server", "date"}
CONTENT_TYPES = {
    ".wasm": "application/wasm",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".woff2": "font/woff2",
    ".html": "text/html; charset=utf-8",
}


def data_source_config(name: str = "orthanc") -> dict[str, Any]:
    """Return OHIF's DICOMweb data source for the same-origin Orthanc proxy."""
    return {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": name,
        "configuration": {
            "friendlyName": "Orthanc (test)",
            "name": name,
            "qidoRoot": "/dicom-web",
            "wadoRoot": "/dicom-web",
            "wadoUriRoot": "/wado",
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }


def app_config_js() -> str:
    """Return the ``app-config.js`` the viewer loads (``window.config = {...}``).

    The stock build has its extensions and modes compiled in, so both lists stay empty.
    """
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "defaultDataSourceName": "orthanc",
        "dataSources": [data_source_config("orthanc")],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


def content_type(path: Path) -> str:
    """Return the Content-Type for a file of ``dist/``."""
    known = CONTENT_TYPES.get(path.suffix.lower())
    if known:
        return known
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


class _Handler(BaseHTTPRequestHandler):
    """Request handler; the server object carries ``dist`` and the Orthanc address."""

    protocol_version = "HTTP/1.1"
    server: ViewerHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("viewer server: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    def do_OPTIONS(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path.startswith(PROXIED_PREFIXES):
                self._proxy()
            elif path == "/app-config.js":
                self._send_bytes(app_config_js().encode(), "text/javascript")
            else:
                self._static(path)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("viewer server: client closed %s", path)

    def _send_bytes(self, body: bytes, ctype: str, status: int = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _static(self, url_path: str) -> None:
        dist = self.server.dist
        candidate = (dist / url_path.lstrip("/")).resolve()
        inside = candidate == dist or dist in candidate.parents
        if not (inside and candidate.is_file()):
            candidate = dist / "index.html"
        size = candidate.stat().st_size
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type(candidate))
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if self.command != "HEAD":
            with candidate.open("rb") as f:
                shutil.copyfileobj(f, self.wfile, 1 << 20)

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {
            key: value
            for key, value in self.headers.items()
            if key.lower() not in DROPPED_REQUEST_HEADERS
        }
        connection = http.client.HTTPConnection(
            self.server.orthanc_host, self.server.orthanc_port, timeout=60
        )
        try:
            # skip_host: the browser's Host header (kept in ``headers``) goes through as-is.
            connection.putrequest(
                self.command, self.path, skip_host=True, skip_accept_encoding=True
            )
            for key, value in headers.items():
                connection.putheader(key, value)
            if body is not None:
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            payload = response.read()
            reply_headers = response.getheaders()
            status = response.status
        except OSError as e:
            logger.warning("viewer server: proxy %s failed: %s", self.path, e)
            self._send_bytes(str(e).encode(), "text/plain", HTTPStatus.BAD_GATEWAY)
            return
        finally:
            connection.close()
        self.send_response(status)
        for key, value in reply_headers:
            if key.lower() not in DROPPED_RESPONSE_HEADERS:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


class ViewerHTTPServer(ThreadingHTTPServer):
    """Threaded HTTP server with the viewer's ``dist`` and the Orthanc address."""

    daemon_threads = True

    def __init__(self, dist: Path, orthanc_host: str, orthanc_port: int) -> None:
        self.dist = dist.resolve()
        self.orthanc_host = orthanc_host
        self.orthanc_port = orthanc_port
        super().__init__(("127.0.0.1", 0), _Handler)


class OhifServer:
    """The same-origin OHIF + DICOMweb server, run in a background thread.

    Parameters
    ----------
    dist
        The viewer's prebuilt ``dist/`` directory (holds ``index.html``).
    orthanc_port
        HTTP port of an Orthanc on loopback with the DICOMweb plugin.
    """

    def __init__(self, dist: Path, orthanc_port: int, orthanc_host: str = "127.0.0.1") -> None:
        if not (Path(dist) / "index.html").is_file():
            raise ViewerError(f"no OHIF build at {dist} (index.html missing)")
        self._httpd = ViewerHTTPServer(Path(dist), orthanc_host, orthanc_port)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The loopback port the server listens on."""
        port: int = self._httpd.server_address[1]
        return port

    @property
    def base_url(self) -> str:
        """The viewer's origin, e.g. ``http://127.0.0.1:40000``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Serve in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, name="ohif-server", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(10)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> OhifServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
