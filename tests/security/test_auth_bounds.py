"""Authentication cannot be turned against the server: password hashes run a few at a time,
a client over its failure budget (or all clients over theirs) is refused before hashing, IPv6
clients count by /64, and the endpoint bounds its connections and each request's head.
Clients are real connections over loopback."""

from __future__ import annotations

import hashlib
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from d2r_http.auth import Authenticator, FailureLimiter, client_key
from d2r_http.server import MAX_HEAD_BYTES
from observability import metrics
from observability.http import ObservabilityServer
from tests.security.test_http_auth import _basic, _bearer, write_credentials


def test_ipv6_clients_count_by_their_64() -> None:
    limiter = FailureLimiter(3, 60.0, max_total=1000)
    for n in range(3):
        limiter.record_failure(f"2001:db8:1:2::{n + 1:x}", now=100.0)
    assert limiter.retry_after("2001:db8:1:2:ffff::9", now=101.0) > 0  # same /64
    assert limiter.retry_after("2001:db8:1:3::1", now=101.0) == 0  # next /64
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("192.0.2.7") == "192.0.2.7"


def test_address_rotation_runs_into_the_shared_budget() -> None:
    limiter = FailureLimiter(10, 60.0, max_total=50, max_clients=8)
    for n in range(50):  # every failure from another address: the per-client table churns
        limiter.record_failure(f"10.0.{n // 250}.{n % 250}", now=100.0)
    assert limiter.total_retry_after(now=101.0) == pytest.approx(59.0)
    assert limiter.total_retry_after(now=161.0) == 0  # the window passes


@pytest.fixture
def credentials(tmp_path: Path) -> tuple[Path, Path, dict[str, str], dict[str, str]]:
    return write_credentials(tmp_path)


def _server(
    auth: Authenticator, *, max_connections: int = 64, max_connections_per_client: int = 16
) -> ObservabilityServer:
    return ObservabilityServer(
        "127.0.0.1",
        0,
        registry=metrics.build_registry(None),
        health={},
        ready={},
        auth=auth,
        max_connections=max_connections,
        max_connections_per_client=max_connections_per_client,
    ).start()


def _status(port: int, path: str, headers: dict[str, str]) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers)
        rsp = conn.getresponse()
        rsp.read()
        return rsp.status
    finally:
        conn.close()


@pytest.fixture
def hash_counter(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts scrypt runs (password checks and the unknown users' reference hash) and the most
    that ran at once."""
    seen = {"calls": 0, "now": 0, "most": 0}
    lock = threading.Lock()
    real = hashlib.scrypt

    def counting(password: bytes, **kwargs: Any) -> bytes:
        with lock:
            seen["calls"] += 1
            seen["now"] += 1
            seen["most"] = max(seen["most"], seen["now"])
        try:
            time.sleep(0.05)  # hold the slot a little, as a loaded machine would
            return real(password, **kwargs)
        finally:
            with lock:
                seen["now"] -= 1

    monkeypatch.setattr(hashlib, "scrypt", counting)
    yield seen


def test_concurrent_wrong_passwords_hash_a_few_at_a_time(
    credentials: tuple[Path, Path, dict[str, str], dict[str, str]],
    hash_counter: dict[str, int],
) -> None:
    tokens_file, users_file, tokens, passwords = credentials
    auth = Authenticator(
        required=True,
        tokens_file=tokens_file,
        users_file=users_file,
        limiter=FailureLimiter(1000, 60.0, max_total=1000),
        max_hashing=2,
    )
    server = _server(auth, max_connections=128, max_connections_per_client=128)
    try:
        guesses = [_basic(f"user-{n}", f"guess-{n}") for n in range(64)]
        with ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(lambda h: _status(server.port, "/metrics", h), guesses))
        assert set(answers) <= {401, 503}
        assert answers.count(503) > 0  # the gate refused some without hashing
        assert hash_counter["most"] <= 2
        # one scrypt per 401, plus the unknown users' reference hash if this process had none
        assert hash_counter["calls"] - answers.count(401) in (0, 1)
        # a right token needs no hash and is never refused for it
        assert _status(server.port, "/metrics", _bearer(tokens["metrics"])) == 200
        assert _status(server.port, "/healthz", {}) == 200
    finally:
        server.stop()


def test_a_client_over_its_budget_is_refused_before_hashing(
    credentials: tuple[Path, Path, dict[str, str], dict[str, str]],
    hash_counter: dict[str, int],
) -> None:
    tokens_file, users_file, _, passwords = credentials
    auth = Authenticator(
        required=True,
        tokens_file=tokens_file,
        users_file=users_file,
        limiter=FailureLimiter(3, 60.0, max_total=5),
    )
    server = _server(auth)
    start = hash_counter["calls"]  # the unknown users' reference hash may have been made now
    try:
        answers = [_status(server.port, "/metrics", _basic("x", f"guess-{n}")) for n in range(6)]
        assert answers == [401, 401, 401, 429, 429, 429]
        assert hash_counter["calls"] - start == 3
        # from all clients together: 5 failures (3 here, 2 from elsewhere) stop password checks
        auth.limiter.record_failure("10.9.9.9")
        auth.limiter.record_failure("10.9.9.10")
        lowered = {k.lower(): v for k, v in _basic("metrics-user", passwords["metrics"]).items()}
        decision = auth.decide("metrics", "10.1.1.1", lowered)
        assert (decision.status, decision.reason) == (429, "rate_limited_all")
        assert hash_counter["calls"] - start == 3  # none of these hashed
    finally:
        server.stop()


def test_connections_are_bounded_per_client_and_in_all(
    credentials: tuple[Path, Path, dict[str, str], dict[str, str]],
) -> None:
    tokens_file, _, tokens, _ = credentials
    auth = Authenticator(required=True, tokens_file=tokens_file)
    server = _server(auth, max_connections=6, max_connections_per_client=3)
    held: list[socket.socket] = []
    try:
        for _ in range(3):  # idle connections hold their slots
            held.append(socket.create_connection(("127.0.0.1", server.port)))
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", server.port))
        extra.settimeout(5)
        answer = extra.recv(4096)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503")
        # another client address still gets in, up to the total
        other = http.client.HTTPConnection(
            "127.0.0.1", server.port, timeout=10, source_address=("127.0.0.2", 0)
        )
        other.request("GET", "/healthz")
        assert other.getresponse().status == 200
        other.close()
        for sock in held:
            sock.close()
        held.clear()
        time.sleep(0.3)
        assert _status(server.port, "/metrics", _bearer(tokens["metrics"])) == 200
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_a_request_head_is_bounded(
    credentials: tuple[Path, Path, dict[str, str], dict[str, str]],
) -> None:
    tokens_file, _, _, _ = credentials
    server = _server(Authenticator(required=True, tokens_file=tokens_file))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            filler = b"X-Filler: " + b"a" * 8000 + b"\r\n"
            try:
                for _ in range(2 * MAX_HEAD_BYTES // len(filler)):
                    sock.sendall(filler)
                sock.sendall(b"\r\n")
            except OSError:
                pass  # the server may close while we are still sending
            answer = sock.recv(4096)
        assert answer.startswith((b"HTTP/1.1 431", b"HTTP/1.0 431"))
        assert _status(server.port, "/healthz", {}) == 200
    finally:
        server.stop()
