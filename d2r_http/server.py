"""The HTTP endpoint of a d2r process: one server, one route table, one authentication.

Standard library only (:class:`http.server.ThreadingHTTPServer` in a daemon thread, :mod:`ssl`
for HTTPS). Each request target is parsed once by :mod:`d2r_http.routes`; the entry it matches
names both the role :class:`~d2r_http.auth.Authenticator` asks for and the handler that answers.
A target not in normal form is answered 400. The probes are open, everything else needs a
credential with the route's role unless the endpoint is bound to loopback. Refusals are logged
(route's role, reason, client address; never a credential or a path) and reported to
``on_refusal`` (the metrics count them).

Packages mount what they serve on the routes of the table: :mod:`observability.http` the
metrics, the probes and the status page; the node the STOW-RS receiver of
:mod:`dicom_node.stow` (``/dicom-web/studies``) and the FHIR endpoint of :mod:`feedback.fhir`
(``/fhir/DiagnosticReport``), each a :class:`IngestHandler` of a POST route (``receivers``). A
route with nothing mounted answers 404.

Bounds: at most ``max_connections`` connections (``max_connections_per_client`` per client), a
request head of at most :data:`MAX_HEAD_BYTES`, 30 s of silence per read.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import ssl
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, Self

from d2r_http.auth import Authenticator, Decision, Principal, client_key, is_loopback
from d2r_http.routes import UNKNOWN, BadTarget, Route, match, parse_target

__all__ = [
    "BodyError",
    "ChunkedBody",
    "Handler",
    "HttpServer",
    "IngestHandler",
    "LengthBody",
    "certificate_name",
    "not_found",
    "tls_context",
]

logger = logging.getLogger(__name__)

#: Most bytes of an unread request body read and dropped before a refusal is answered.
DRAIN_BYTES = 16 * 1024 * 1024
#: Answers a GET of a route: the route's parameters (``study``) and the authenticated caller (or
#: None) in, (status, content type, body) out.
Handler = Callable[[Mapping[str, str], Principal | None], tuple[int, str, bytes]]
#: Told the reason of each refusal (the metrics count them).
RefusalObserver = Callable[[str], None]


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
    """What answers a POST route: the STOW-RS receiver the node installs for ``/dicom-web/``
    routes, the FHIR endpoint for ``/fhir/DiagnosticReport``.

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


class HttpServer:
    """The endpoint: the handlers mounted on the route table, and (with ``ingest``) STOW-RS.

    Parameters
    ----------
    host, port : str, int
        Bind address; port 0 picks a free port (see :attr:`port` after :meth:`start`).
    handlers : mapping of str to Handler
        What answers a GET of each route, by the route's name in :data:`d2r_http.routes.ROUTES`.
    auth : Authenticator, optional
        Who may read what; by default credentials are needed (and none are known) unless
        ``host`` is loopback.
    tls : ssl.SSLContext, optional
        Serve HTTPS with this context (:func:`tls_context`).
    ingest : IngestHandler, optional
        The STOW-RS receiver for ``/dicom-web/studies`` routes (role ``ingest``); without it
        they answer 404.
    receivers : mapping of str to IngestHandler, optional
        What answers each other POST route, by the route's name (``fhir``: the FHIR endpoint,
        role ``feedback``); a POST route without one answers 404.
    max_connections, max_connections_per_client : int
        Connections served at once, in all and per client (IPv6 by /64); one more is answered
        503 and closed without a thread.
    on_refusal : callable, optional
        Told the reason of each refusal.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        handlers: Mapping[str, Handler],
        auth: Authenticator | None = None,
        tls: ssl.SSLContext | None = None,
        ingest: IngestHandler | None = None,
        receivers: Mapping[str, IngestHandler] | None = None,
        max_connections: int = 64,
        max_connections_per_client: int = 16,
        on_refusal: RefusalObserver | None = None,
    ) -> None:
        self.host = host
        self.handlers = dict(handlers)
        self.ingest = ingest
        self.receivers = dict(receivers or {})
        self.auth = auth or Authenticator(required=not is_loopback(host))
        self.tls = tls
        self.requested_port = port
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        self.on_refusal = on_refusal
        #: The request handler class bound to this server (what each connection runs).
        self.handler_class = _handler_class(self)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not started")
        return int(self._server.server_address[1])

    def start(self) -> Self:
        server = _Server(
            (self.host, self.requested_port),
            self.handler_class,
            max_connections=self.max_connections,
            max_per_client=self.max_connections_per_client,
            tls=self.tls is not None,
            on_refusal=self.count_refusal,
        )
        if self.tls is not None:  # the handshake runs in the request's thread (Handler.setup)
            server.socket = self.tls.wrap_socket(
                server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="d2r-http", kwargs={"poll_interval": 0.5}, daemon=True
        )
        self._thread.start()
        served = ", ".join(n for n in ("metrics", "healthz", "readyz") if n in self.handlers)
        logger.info(
            "HTTP endpoint on %s://%s:%d/ (%s%s%s); credentials %s",
            "https" if self.tls else "http",
            self.host,
            self.port,
            served,
            ", STOW-RS at /dicom-web/studies" if self.ingest is not None else "",
            ", FHIR at /fhir/DiagnosticReport" if "fhir" in self.receivers else "",
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
    def refused(self, method: str, route: Route, client: str, decision: Decision) -> None:
        """Log and count a refusal: the role the route needs, the reason, the address."""
        self.count_refusal(decision.reason)
        logger.warning(
            "HTTP %s refused: %d %s (route needs %s) from %s%s",
            method,
            decision.status,
            decision.reason,
            route.role,
            client,
            f" as {decision.principal.name!r}" if decision.principal else "",
        )

    def count_refusal(self, reason: str) -> None:
        """Report one refusal's reason to ``on_refusal`` (never raises)."""
        if self.on_refusal is not None:
            try:
                self.on_refusal(reason)
            except Exception:
                logger.exception("could not count an HTTP refusal")

    def receiver(self, route: Route) -> IngestHandler | None:
        """What answers a POST route (the STOW-RS receiver for ``stow``), if anything."""
        if route.name == "stow":
            return self.ingest
        return self.receivers.get(route.name)

    def answer(
        self, route: Route, params: Mapping[str, str], principal: Principal | None
    ) -> tuple[int, str, bytes]:
        """Answer a GET that the route table resolved: (status, content type, body)."""
        handler = self.handlers.get(route.name)
        if handler is None:
            return not_found()
        return handler(params, principal)


def not_found() -> tuple[int, str, bytes]:
    """The 404 answer of a route with nothing behind it."""
    return 404, "application/json", b'{"status": "not found"}'


#: Most bytes of a request line and its header fields together (431 beyond).
MAX_HEAD_BYTES = 32 * 1024


class _HeadLimitedReader:
    """The connection's read stream, counting the bytes of one request's head: more than the
    budget raises :class:`http.client.LineTooLong` (http.server answers 431)."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._left: int | None = None

    def limit(self, budget: int | None) -> None:
        self._left = budget

    def readline(self, size: int = -1, /) -> bytes:
        if self._left is None:
            return bytes(self._raw.readline(size))
        want = self._left + 1 if size < 0 else min(size, self._left + 1)
        line = bytes(self._raw.readline(want))
        self._left -= len(line)
        if self._left < 0:
            raise http.client.LineTooLong("request head")
        return line

    def read(self, size: int = -1, /) -> bytes:
        return bytes(self._raw.read(size))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` in all and ``max_per_client`` per
    client; a connection beyond either is answered 503 (plain HTTP) or closed (HTTPS) at once."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        max_connections: int,
        max_per_client: int,
        tls: bool,
        on_refusal: RefusalObserver,
    ) -> None:
        super().__init__(address, handler)
        self.on_refusal = on_refusal
        self.max_per_client = max_per_client
        self._tls = tls
        self._slots = threading.BoundedSemaphore(max_connections)
        self._per_client: dict[str, int] = {}
        self._lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        key = client_key(str(client_address[0]))
        with self._lock:
            taken = self._per_client.get(key, 0) < self.max_per_client and self._slots.acquire(
                blocking=False
            )
            if taken:
                self._per_client[key] = self._per_client.get(key, 0) + 1
        if not taken:
            self.on_refusal("connection_limit")
            logger.warning("HTTP connection from %s refused: connection limit", client_address[0])
            if not self._tls:
                with contextlib.suppress(OSError):
                    request.setblocking(False)
                    request.send(_BUSY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(key)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(client_key(str(client_address[0])))

    def _release(self, key: str) -> None:
        with self._lock:
            left = self._per_client.get(key, 1) - 1
            if left > 0:
                self._per_client[key] = left
            else:
                self._per_client.pop(key, None)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A failed TLS handshake, a client gone mid-request: not worth a traceback on stderr.
        logger.debug("HTTP connection from %s failed", client_address[0], exc_info=True)


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: 20\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    b'{"status": "busy"}\r\n'
)


# Longer than a screen: the request handler class, whose methods are each short, closes over the
# server it answers for
def _handler_class(owner: HttpServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "d2r"
        sys_version = ""
        #: what an error answer before the version is known speaks (http.server: HTTP/0.9)
        default_request_version = "HTTP/1.0"
        timeout = 30  # seconds of silence before a connection (or TLS handshake) is dropped
        _unread: LengthBody | ChunkedBody | None = None  # a body to drain after the answer

        def setup(self) -> None:
            super().setup()
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.do_handshake()
            self.rfile = _HeadLimitedReader(self.rfile)  # type: ignore[assignment]

        def handle_one_request(self) -> None:
            self.rfile.limit(MAX_HEAD_BYTES)  # type: ignore[attr-defined]
            super().handle_one_request()

        def parse_request(self) -> bool:
            ok = super().parse_request()
            self.rfile.limit(None)  # type: ignore[attr-defined]
            if ok and (self.request_version == "HTTP/0.9" or len(self.requestline.split()) != 3):
                # http.server would answer HTTP/0.9 (a body, no status line): refuse it in 1.0
                self.request_version = "HTTP/1.0"
                self.close_connection = True
                self.send_error(400, "HTTP/0.9 is not supported")
                return False
            return ok

        def send_error(
            self, code: int, message: str | None = None, explain: str | None = None
        ) -> None:
            # whatever the request line claimed, an error answer has a status line and headers
            if self.request_version == "HTTP/0.9":
                self.request_version = "HTTP/1.0"
            super().send_error(code, message, explain)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve("HEAD")

        def _other(self) -> None:
            """Methods no route takes: the table still decides (405 on a route, after its
            credential; 404 elsewhere). Unknown methods get http.server's 501."""
            self._serve(self.command)

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _other  # noqa: N815

        def _serve(self, method: str) -> None:
            client = str(self.client_address[0])
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                # the request line as sent: http.server's self.path has "//" collapsed already
                words = self.requestline.split()
                target = parse_target(words[1] if len(words) == 3 else "")
            except BadTarget as exc:
                owner.count_refusal("bad_target")
                logger.warning("HTTP %s refused: 400 %s from %s", method, exc, client)
                self._drain_and_close(headers)
                self._send(400, "application/json", b'{"status": "bad request target"}')
                return
            route, params = match(target)
            decision = owner.auth.decide(
                route.role, client, headers, certificate=certificate_name(self.connection)
            )
            if decision.status != 200:
                owner.refused(method, route, client, decision)
                self._drain_and_close(headers)
                self._refuse(decision)
                return
            receiver = owner.receiver(route)
            if route is UNKNOWN or ("POST" in route.methods and receiver is None):
                self._drain_and_close(headers)
                self._send(*not_found())
                return
            allowed = (*route.methods, "HEAD") if "GET" in route.methods else route.methods
            if method not in allowed:
                self._drain_and_close(headers)
                self._send(
                    405,
                    "application/json",
                    b'{"status": "method not allowed"}',
                    [("Allow", ", ".join(allowed))],
                )
                return
            if receiver is not None:
                self._ingest(receiver, route, method, target.path, client, headers, decision)
                return
            if _declares_body(headers):  # a GET with a body: answer, then close
                self.close_connection = True
            principal = decision.principal if route.role is not None else None
            if route.role is None:
                principal = owner.auth.identify(client, headers)
            try:
                status, content_type, body = owner.answer(route, params, principal)
            except Exception:
                logger.exception("HTTP GET %s failed", route.name)
                status, content_type, body = 500, "application/json", b'{"status": "error"}'
            self._send(status, content_type, body)

        def _ingest(
            self,
            receiver: IngestHandler,
            route: Route,
            method: str,
            path: str,
            client: str,
            headers: dict[str, str],
            decision: Decision,
        ) -> None:
            """A request to a POST route (STOW-RS, FHIR): the body is de-framed here, answered
            by the route's receiver.

            The connection is closed after the answer: a refused body may be left unread.
            """
            self.close_connection = True
            body = self._body(headers)
            user = decision.principal.name if decision.principal else "anonymous"
            try:
                status, content_type, payload = receiver(method, path, headers, body, client, user)
            except Exception:
                logger.exception("HTTP %s of route %s failed", method, route.name)
                status, content_type, payload = 500, "application/json", b'{"status": "error"}'
            self._unread = body
            extra = [("Connection", "close")]
            if status == 503:
                extra.append(("Retry-After", "60"))
            self._send(status, content_type, payload, extra)

        def _body(self, headers: dict[str, str]) -> LengthBody | ChunkedBody:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                return ChunkedBody(self.rfile)
            length = headers.get("content-length", "0").strip()
            # ASCII digits only: str.isdigit() also holds for "5³", which int() refuses
            return LengthBody(self.rfile, int(length) if _ascii_digits(length) else 0)

        def _drain_and_close(self, headers: dict[str, str]) -> None:
            """Before a refusal: the connection closes after it (an unread body must not be
            taken for a request), and what the client sends of the body is read after the answer
            has gone out (:meth:`_send`)."""
            self.close_connection = True
            if _declares_body(headers):
                self._unread = self._body(headers)

        def _drain(self, body: LengthBody | ChunkedBody) -> None:
            """Read what is left of an unread body (up to :data:`DRAIN_BYTES`), so that closing
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
            elif decision.status in (429, 503):
                headers = [("Retry-After", str(max(1, math.ceil(decision.retry_after))))]
            text = {
                401: "unauthorized",
                403: "forbidden",
                429: "too many failed attempts",
                503: "busy",
            }
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
            self.send_header("X-Content-Type-Options", "nosniff")
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
            if self.command != "HEAD":
                self.wfile.write(body)
            unread, self._unread = self._unread, None
            if unread is not None:  # the answer first: a client that reads while it sends
                self.wfile.flush()  # sees it at once
                self._drain(unread)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            logger.debug("HTTP %s", format % args)

    return Handler


def _ascii_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _declares_body(headers: Mapping[str, str]) -> bool:
    length = headers.get("content-length", "").strip()
    return "transfer-encoding" in headers or (bool(length) and length != "0")
