"""Requests found by the fuzzing campaign (``fuzz/http_request.py``, inputs in
fuzz/regressions/http_request), sent to a running endpoint on loopback: each gets an HTTP/1.x
answer with a status line (an HTTP/0.9 request, or a version that is none, gets 400 in HTTP/1.0).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from d2r_http.auth import Authenticator
from observability.http import ObservabilityServer


@pytest.fixture
def port() -> Iterator[int]:
    server = ObservabilityServer(
        "127.0.0.1",
        0,
        registry=CollectorRegistry(),
        health={"database": lambda: None},
        ready={},
        auth=Authenticator(required=True),
    ).start()
    try:
        yield server.port
    finally:
        server.stop()


def _answer(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _status(answer: bytes) -> int | None:
    """The status of the first response, None without an HTTP/1.x status line."""
    found = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    return int(found.group(1)) if found else None


def test_a_well_formed_request_gets_a_status_line(port: int) -> None:
    assert _status(_answer(port, b"GET /metrics HTTP/1.1\r\nHost: node\r\n\r\n")) == 401


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /healthz\r\n",
        b"GET /healthz HTTP/0.9\r\n\r\n",
        b"GET / HTTP/1.de\r\n\r\n",
        b"HEAD / HT / HTTP/0.9\r\nHost: node\r\n\r\n",  # four words: refused while parsing
    ],
)
def test_http09_and_bad_versions(port: int, request_line: bytes) -> None:
    assert _status(_answer(port, request_line)) == 400


def test_basic_credentials_with_non_ascii_bytes(port: int) -> None:
    request = b"GET / HTTP/1.1\r\nHost: node\r\nAuthorization: Basic dmll\xff\xff=\r\n\r\n"
    assert _status(_answer(port, request)) == 401


def test_content_length_not_ascii(port: int) -> None:
    request = b"POST /metrics HTTP/1.1\r\nHost: node\r\nContent-Length: 5\xb3\r\n\r\nabcde"
    assert _status(_answer(port, request)) is not None
