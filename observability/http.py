"""The HTTP endpoint of a d2r process: metrics, health, readiness and the status page.

Standard library only (:class:`http.server.ThreadingHTTPServer` in a daemon thread, :mod:`ssl`
for HTTPS); read-only. Every request passes :class:`~observability.auth.Authenticator` first:
the probes are open, everything else needs a credential with the route's role unless the endpoint
is bound to loopback. Refusals are logged (route's role, reason, client address; never a
credential) and counted in ``d2r_http_refusals_total{reason}``.

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
``/dicom-web/...``         the STOW-RS receiver (role ``ingest``; 404 unless the node installs it)
=========================  =====================================================================

``/healthz`` and ``/readyz`` answer ``{"status": "ok"|"fail", "checks": {name: "ok"|error}}``.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from observability.auth import Authenticator, Decision, required_role
from observability.pages import StatusPages
from observability.settings import ObservabilitySettings, is_loopback

__all__ = [
    "BodyError",
    "Check",
    "ChunkedBody",
    "IngestHandler",
    "LengthBody",
    "ObservabilityServer",
    "ObservabilitySettings",
    "certificate_name",
    "run_checks",
    "tls_context",
]

logger = logging.getLogger(__name__)

#: Most bytes of an unread request body read and dropped before a refusal is answered.
DRAIN_BYTES = 16 * 1024 * 1024
#: A health or readiness check: returns normally when fine, raises (any exception) when not.
Check = Callable[[], None]


def tls_context(cert: Any, key: Any, ca: Any = None) -> ssl.SSLContext:
    """A server context for HTTPS: TLS 1.2 or newer, the certificate chain and its key.

    With ``ca`` a client certificate is asked for and, when presented, verified against it
    (a client without one still connects and authenticates otherwise).
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def certificate_name(connection: Any) -> str | None:
    """The subject common name of the verified client certificate of ``connection``, if any."""
    if not isinstance(connection, ssl.SSLSocket):
        return None
    try:
        cert = connection.getpeercert()
    except (ValueError, OSError):
        return None
    if not cert:  # none presented (a presented one that fails verification fails the handshake)
        return None
    subject: Any = cert.get("subject", ())
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName" and value:
                return str(value)
    return "certificate"


class IngestHandler(Protocol):
    """The STOW-RS receiver the node installs for ``/dicom-web/`` routes.

    Called with the method, the route, the lower-case headers, the de-framed body, the client
    address and the authenticated user's name; returns (status, content type, body).
    """

    def __call__(
        self,
        method: str,
        route: str,
        headers: Mapping[str, str],
        body: Any,
        client: str,
        user: str,
    ) -> tuple[int, str, bytes]: ...


class BodyError(ValueError):
    """A request body that breaks its own framing (chunk sizes, early end)."""


class LengthBody:
    """A body of ``Content-Length`` bytes: ``read`` returns b"" at its end; raises
    :class:`BodyError` when the connection ends first."""

    def __init__(self, stream: Any, length: int) -> None:
        self._stream = stream
        self._left = length

    def read(self, size: int = -1, /) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if size < 0 else min(size, self._left)
        data = self._stream.read(want)
        if not data:
            raise BodyError(f"body ended {self._left} bytes early")
        self._left -= len(data)
        return bytes(data)


class ChunkedBody:
    """A ``Transfer-Encoding: chunked`` body (RFC 9112 7.1), de-chunked as it is read."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._left = 0
        self._done = False

    def _line(self) -> bytes:
        line = self._stream.readline(4098)
        if not line.endswith(b"\n"):
            raise BodyError("chunked body cut off")
        return bytes(line)

    def read(self, size: int = -1, /) -> bytes:
        if self._done:
            return b""
        if self._left == 0:
            text = self._line().split(b";", 1)[0].strip()
            try:
                self._left = int(text, 16)
            except ValueError:
                raise BodyError("invalid chunk size") from None
            if self._left < 0:
                raise BodyError("invalid chunk size")
            if self._left == 0:
                while self._line().strip():  # trailer fields, then the empty line
                    pass
                self._done = True
                return b""
        want = self._left if size < 0 else min(size, self._left)
        data = self._stream.read(want)
        if not data:
            raise BodyError("chunked body cut off")
        self._left -= len(data)
        if self._left == 0 and self._line().strip():
            raise BodyError("chunk not followed by CRLF")
        return bytes(data)


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
    auth : Authenticator, optional
        Who may read what; by default credentials are needed (and none are known) unless
        ``host`` is loopback.
    tls : ssl.SSLContext, optional
        Serve HTTPS with this context (:func:`tls_context`).
    ingest : IngestHandler, optional
        The STOW-RS receiver for ``/dicom-web/`` routes (role ``ingest``); without it they
        answer 404.
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
        auth: Authenticator | None = None,
        tls: ssl.SSLContext | None = None,
        ingest: IngestHandler | None = None,
    ) -> None:
        self.host = host
        self.ingest = ingest
        self.auth = auth or Authenticator(required=not is_loopback(host))
        self.tls = tls
        self.requested_port = port
        self.registry = registry
        self.health = dict(health)
        self.ready = dict(ready)
        self.pages = pages
        #: The request handler class bound to this server (what each connection runs).
        self.handler_class = _handler_class(self)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not started")
        return int(self._server.server_address[1])

    def start(self) -> ObservabilityServer:
        server = _Server((self.host, self.requested_port), self.handler_class)
        if self.tls is not None:  # the handshake runs in the request's thread (Handler.setup)
            server.socket = self.tls.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="d2r-http", kwargs={"poll_interval": 0.5}, daemon=True
        )
        self._thread.start()
        logger.info(
            "HTTP endpoint on %s://%s:%d/ (metrics, healthz, readyz%s); credentials %s",
            "https" if self.tls else "http",
            self.host,
            self.port,
            ", STOW-RS at /dicom-web/studies" if self.ingest is not None else "",
            "required" if self.auth.required else "not required (loopback)",
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # -------------------------------------------------------------- request handling
    def refused(self, method: str, route: str, client: str, decision: Decision) -> None:
        """Log and count a refusal: the role the route needs, the reason, the address."""
        from observability import metrics

        metrics.observe_http_refusal(decision.reason)
        logger.warning(
            "HTTP %s refused: %d %s (route needs %s) from %s%s",
            method,
            decision.status,
            decision.reason,
            required_role(route),
            client,
            f" as {decision.principal.name!r}" if decision.principal else "",
        )

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


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A failed TLS handshake, a client gone mid-request: not worth a traceback on stderr.
        logger.debug("HTTP connection from %s failed", client_address[0], exc_info=True)


def _handler_class(owner: ObservabilityServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "d2r"
        timeout = 30  # seconds of silence before a connection (or TLS handshake) is dropped

        def setup(self) -> None:
            super().setup()
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.do_handshake()

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def _serve(self, method: str) -> None:
            route = urlsplit(self.path).path
            client = str(self.client_address[0])
            headers = {k.lower(): v for k, v in self.headers.items()}
            decision = owner.auth.decide(
                route, client, headers, certificate=certificate_name(self.connection)
            )
            if decision.status != 200:
                owner.refused(method, route, client, decision)
                self.close_connection = True  # an unread body must not be taken for a request
                self._drain(self._body(headers))
                self._refuse(decision)
                return
            if required_role(route) == "ingest":
                self._ingest(method, route, client, headers, decision)
                return
            if method != "GET":  # nothing else takes a body
                self.close_connection = True
                self._send(405, "application/json", b'{"status": "not supported"}')
                return
            try:
                status, content_type, body = owner.handle(self.path)
            except Exception:
                logger.exception("HTTP GET %s failed", route)
                status, content_type, body = 500, "application/json", b'{"status": "error"}'
            self._send(status, content_type, body)

        def _ingest(
            self,
            method: str,
            route: str,
            client: str,
            headers: dict[str, str],
            decision: Decision,
        ) -> None:
            """A ``/dicom-web/`` request: the body is de-framed here, answered by the receiver.

            The connection is closed after the answer: a refused body may be left unread.
            """
            self.close_connection = True
            if owner.ingest is None:
                self._send(404, "application/json", b'{"status": "not found"}')
                return
            body = self._body(headers)
            user = decision.principal.name if decision.principal else "anonymous"
            try:
                status, content_type, payload = owner.ingest(
                    method, route, headers, body, client, user
                )
            except Exception:
                logger.exception("HTTP %s %s failed", method, route)
                status, content_type, payload = 500, "application/json", b'{"status": "error"}'
            self._drain(body)
            extra = [("Connection", "close")]
            if status == 503:
                extra.append(("Retry-After", "60"))
            self._send(status, content_type, payload, extra)

        def _body(self, headers: dict[str, str]) -> LengthBody | ChunkedBody:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                return ChunkedBody(self.rfile)
            length = headers.get("content-length", "0").strip()
            return LengthBody(self.rfile, int(length) if length.isdigit() else 0)

        def _drain(self, body: LengthBody | ChunkedBody) -> None:
            """Read what is left of a refused body (up to :data:`DRAIN_BYTES`), so that closing
            the connection does not reset it before the client has read the answer."""
            left = DRAIN_BYTES
            try:
                while left > 0 and (chunk := body.read(min(left, 1 << 16))):
                    left -= len(chunk)
            except (OSError, ValueError):
                pass

        def _refuse(self, decision: Decision) -> None:
            headers = []
            if decision.status == 401:
                headers = [
                    ("WWW-Authenticate", 'Basic realm="d2r", charset="UTF-8"'),
                    ("WWW-Authenticate", 'Bearer realm="d2r"'),
                ]
            elif decision.status == 429:
                headers = [("Retry-After", str(max(1, math.ceil(decision.retry_after))))]
            text = {401: "unauthorized", 403: "forbidden", 429: "too many failed attempts"}
            body = json.dumps({"status": text.get(decision.status, "refused")}).encode()
            self._send(decision.status, "application/json", body, headers)

        def _send(
            self,
            status: int,
            content_type: str,
            body: bytes,
            extra: list[tuple[str, str]] | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in extra or ():
                self.send_header(name, value)
            if content_type.startswith("text/html"):
                self.send_header(
                    "Content-Security-Policy",
                    "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'",
                )
            if owner.tls is not None:
                self.send_header("Strict-Transport-Security", "max-age=31536000")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            logger.debug("HTTP %s", format % args)

    return Handler
