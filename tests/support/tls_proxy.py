"""A TLS front for a plain loopback HTTP server.

The Debian Orthanc exits with SIGSEGV when started with ``SslEnabled``, so its own HTTPS cannot
be used: Python's ``ssl`` terminates TLS with a test CA's server certificate, optionally
requiring a client certificate, and relays the bytes both ways to the server behind it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path

from tests.support.processes import free_port


def _relay(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


class TlsProxy:
    """``https://127.0.0.1:{port}`` in front of ``127.0.0.1:{target}``."""

    def __init__(self, target: int, cert: Path, key: Path, client_ca: Path | None = None):
        self.target = target
        self.port = free_port()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        if client_ca is not None:
            self.context.load_verify_locations(client_ca)
            self.context.verify_mode = ssl.CERT_REQUIRED
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._handle, args=(raw,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        with client, socket.create_connection(("127.0.0.1", self.target)) as server:
            back = threading.Thread(target=_relay, args=(server, client), daemon=True)
            back.start()
            _relay(client, server)
            back.join(30)

    def close(self) -> None:
        """Stop accepting connections."""
        self._listener.close()
