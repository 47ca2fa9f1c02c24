"""HTTP answers and credential files of the HTTP senders."""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from d2r_core.config import TlsSettings
from d2r_core.errors import ConfigError
from delivery.destinations import HttpEndpoint
from delivery.errors import PermanentSendError, TransientSendError
from delivery.http import MAX_ANSWER_BYTES, AnswerTooLarge, http_error, open_session


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_try_later_answers_are_transient(status: int) -> None:
    assert isinstance(http_error("x", status, "Later"), TransientSendError)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 412, 415, 422])
def test_other_client_errors_are_permanent_with_the_status(status: int) -> None:
    error = http_error("x", status, "No")
    assert isinstance(error, PermanentSendError) and error.status == status


def test_the_session_carries_the_token_and_verifies_against_the_ca(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc\n")
    ca = tmp_path / "ca.pem"
    session = open_session(HttpEndpoint("fhir", "https://h", token_file=token), TlsSettings(ca=ca))
    assert session.headers["Authorization"] == "Bearer abc"
    assert session.verify == str(ca)
    system = open_session(HttpEndpoint("fhir", "https://h"), TlsSettings()).verify
    assert system is True or Path(str(system)).exists()


def test_an_empty_credential_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        open_session(HttpEndpoint("fhir", "https://h", token_file=empty), TlsSettings())


def test_the_configured_ca_wins_over_requests_environment_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/elsewhere/bundle.pem")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/elsewhere/bundle.pem")
    ca = tmp_path / "ca.pem"
    session = open_session(HttpEndpoint("dicomweb", "https://h"), TlsSettings(ca=ca))
    merged = session.merge_environment_settings("https://h/x", {}, None, None, None)
    assert merged["verify"] == str(ca)


def _answering(body_chunks: int, chunk: bytes) -> Any:
    """A loopback HTTP server whose every POST is answered with ``body_chunks`` x ``chunk``,
    chunked, gzip-encoded when the chunk says so; returns the server (serving in a thread)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            if chunk.startswith(b"\x1f\x8b"):
                self.send_header("Content-Encoding", "gzip")
            self.end_headers()
            try:
                for _ in range(body_chunks):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass  # the client stopped reading

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_an_answer_is_read_only_up_to_its_limit() -> None:
    session = open_session(HttpEndpoint("dicomweb", "http://127.0.0.1"), TlsSettings())
    small = _answering(4, b"{}" * 512)
    big = _answering(MAX_ANSWER_BYTES // 65536 + 64, b"x" * 65536)
    # a gzip bomb: each 64 KiB chunk inflates to far more than it costs on the wire
    bomb_member = gzip.compress(b"\0" * (MAX_ANSWER_BYTES * 2))
    bomb = _answering(1, bomb_member)
    try:
        ok = session.post(f"http://127.0.0.1:{small.server_address[1]}/", data=b"x", timeout=10)
        assert ok.status_code == 200 and len(ok.content) == 4 * 1024
        for server in (big, bomb):
            with pytest.raises(AnswerTooLarge):
                session.post(f"http://127.0.0.1:{server.server_address[1]}/", data=b"x", timeout=10)
    finally:
        for server in (small, big, bomb):
            server.shutdown()
            server.server_close()
