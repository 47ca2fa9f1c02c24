"""The HTTP endpoint's authentication: every route with no, wrong and right credentials per role,
the reverse-proxy header from an allowed and a disallowed address, the failure limiter, HTTPS
with a test CA, and refusals in the log (without secrets) and in ``/metrics``.

Clients are real HTTP connections over loopback; the proxy tests connect from another loopback
source address (127.0.0.2) to tell a trusted proxy from anyone else.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import secrets
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from d2r_core.config import parse_networks
from d2r_core.errors import ConfigError
from d2r_http.auth import Authenticator, FailureLimiter, verify_password
from d2r_http.credentials import set_user
from d2r_http.server import tls_context
from observability import metrics
from observability.http import ObservabilityServer
from observability.pages import StatusPages
from observability.settings import ObservabilitySettings
from studydb.store import StudyStore
from tests.observability.conftest import record_for
from tests.security.tls_ca import make_test_ca
from tests.support.dicom_files import make_dx
from tests.support.processes import REPO, base_env, d2r_cmd

ROLES = ("metrics", "viewer", "ingest", "feedback")
PROXY = "127.0.0.2"


@dataclass(frozen=True)
class Site:
    port: int
    study: str
    tokens: dict[str, str]  # role -> token
    passwords: dict[str, str]  # role -> password of user "<role>-user"
    server: ObservabilityServer


def _get(
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    source: str = "127.0.0.1",
    method: str = "GET",
    context: ssl.SSLContext | None = None,
) -> tuple[int, http.client.HTTPResponse, bytes]:
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    else:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=10, source_address=(source, 0), context=context
        )
    try:
        conn.request(method, path, headers=headers or {})
        rsp = conn.getresponse()
        return rsp.status, rsp, rsp.read()
    finally:
        conn.close()


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def write_credentials(folder: Path) -> tuple[Path, Path, dict[str, str], dict[str, str]]:
    """A tokens file (one token stored as its SHA-256) and a users file, one of each per role."""
    tokens = {role: secrets.token_urlsafe(24) for role in ROLES}
    lines = ["# NAME ROLES TOKEN"]
    for role, token in tokens.items():
        stored = (
            "sha256:" + hashlib.sha256(token.encode()).hexdigest() if role == "viewer" else token
        )
        lines.append(f"{role}-client {role} {stored}")
    tokens_file = folder / "tokens"
    tokens_file.write_text("\n".join(lines) + "\n")
    users_file = folder / "users"
    passwords = {role: secrets.token_urlsafe(12) for role in ROLES}
    for role, password in passwords.items():
        assert set_user(users_file, f"{role}-user", [role], password)
    return tokens_file, users_file, tokens, passwords


def start_site(
    folder: Path, *, max_failures: int = 1000, tls: ssl.SSLContext | None = None
) -> Site:
    tokens_file, users_file, tokens, passwords = write_credentials(folder)
    store = StudyStore(f"sqlite:///{folder / 'd2r.db'}")
    image_path = folder / "image.dcm"
    image = make_dx(image_path, rows=128, cols=104)
    store.record_instance(record_for(image, image_path), outcome="stored")

    def database() -> None:
        store.count_by_state()

    auth = Authenticator(
        required=True,
        tokens_file=tokens_file,
        users_file=users_file,
        trusted_proxies=parse_networks(f"{PROXY}/32"),
        proxy_header="X-Auth-User",
        proxy_roles=frozenset({"viewer"}),
        limiter=FailureLimiter(max_failures, 60.0),
    )
    server = ObservabilityServer(
        "127.0.0.1",
        0,
        registry=metrics.build_registry(None),
        health={"database": database},
        ready={"database": database},
        pages=StatusPages(store),
        auth=auth,
        tls=tls,
    ).start()
    return Site(server.port, str(image.StudyInstanceUID), tokens, passwords, server)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = start_site(tmp_path_factory.mktemp("http-auth"))
    yield s
    s.server.stop()


ROUTES = [
    ("/metrics", "metrics", 200),
    ("/", "viewer", 200),
    ("/studies/{uid}", "viewer", 200),
    ("/studies/{uid}/preview.png", "viewer", 200),
    ("/dicom-web/studies", "ingest", 404),  # no STOW-RS receiver installed on this site
    ("/fhir/DiagnosticReport", "feedback", 404),  # nor a FHIR endpoint
]


@pytest.mark.parametrize("route,needs,ok", ROUTES, ids=[r[0] for r in ROUTES])
def test_each_route_for_each_role_and_credential(
    site: Site, route: str, needs: str, ok: int
) -> None:
    path = route.format(uid=site.study)
    # No credential: 401 with both challenges.
    status, rsp, _ = _get(site.port, path)
    assert status == 401
    assert sorted(rsp.headers.get_all("WWW-Authenticate") or []) == [
        'Basic realm="d2r", charset="UTF-8"',
        'Bearer realm="d2r"',
    ]
    # Wrong credentials: 401.
    assert _get(site.port, path, _bearer(secrets.token_urlsafe(24)))[0] == 401
    assert _get(site.port, path, _basic(f"{needs}-user", "wrong-password"))[0] == 401
    assert _get(site.port, path, _basic("nobody", site.passwords[needs]))[0] == 401
    assert _get(site.port, path, {"Authorization": "Digest x"})[0] == 401
    # Right credentials: the route's role passes, the other roles get 403.
    for role in ROLES:
        want = ok if role == needs else 403
        assert _get(site.port, path, _bearer(site.tokens[role]))[0] == want, (role, "token")
        got = _get(site.port, path, _basic(f"{role}-user", site.passwords[role]))[0]
        assert got == want, (role, "basic")
    if needs == "viewer":
        status, rsp, body = _get(site.port, path, _bearer(site.tokens["viewer"]))
        assert status == 200 and body
        if path.endswith(".png"):
            assert body.startswith(b"\x89PNG")
        else:
            assert site.study in body.decode()


def test_probes_are_open_and_other_paths_need_a_credential(site: Site) -> None:
    for probe in ("/healthz", "/readyz"):
        status, _, body = _get(site.port, probe)
        assert status == 200 and b'"ok"' in body
        assert _get(site.port, probe, _bearer("wrong-token-wrong-token"))[0] == 200
    assert _get(site.port, "/nothing")[0] == 401
    assert _get(site.port, "/nothing", _bearer(site.tokens["metrics"]))[0] == 404
    # A body-carrying method is gated the same way; only the ingest route will take one.
    assert _get(site.port, "/dicom-web/studies", method="POST")[0] == 401
    ingest = _bearer(site.tokens["ingest"])
    assert _get(site.port, "/dicom-web/studies", ingest, method="POST")[0] == 404
    viewer = _bearer(site.tokens["viewer"])
    assert _get(site.port, "/dicom-web/studies", viewer, method="POST")[0] == 403
    assert _get(site.port, "/", viewer, method="POST")[0] == 405


def _stray_bits(encoded: str) -> str:
    """The same bytes in a non-canonical Base64 spelling: unused bits of the last character set
    (found by the fuzzing campaign, ``fuzz/regressions/http_request``)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = encoded.rstrip("=")
    unused = {1: 0b11, 2: 0b1111}[encoded.count("=")]  # bits after the last byte's
    last = alphabet[alphabet.index(body[-1]) | unused]
    return body[:-1] + last + "=" * encoded.count("=")


def test_a_basic_credential_is_read_in_its_canonical_spelling_only(site: Site) -> None:
    credential = f"viewer-user:{site.passwords['viewer']}".encode()  # 28 bytes: padded
    encoded = base64.b64encode(credential).decode()
    stray = _stray_bits(encoded)
    assert stray != encoded and base64.b64decode(stray) == credential
    assert _get(site.port, "/", {"Authorization": f"Basic {encoded}"})[0] == 200
    assert _get(site.port, "/", {"Authorization": f"Basic {stray}"})[0] == 401


def test_proxy_header_only_from_a_trusted_address(site: Site) -> None:
    header = {"X-Auth-User": "dr.house"}
    status, _, body = _get(site.port, "/", header, source=PROXY)
    assert status == 200 and site.study in body.decode()
    assert _get(site.port, "/metrics", header, source=PROXY)[0] == 403  # proxy users: viewer
    assert _get(site.port, "/", header, source="127.0.0.1")[0] == 401
    assert _get(site.port, "/", {"x-auth-user": "dr.house"}, source="127.0.0.3")[0] == 401
    assert _get(site.port, "/", source=PROXY)[0] == 401  # the proxy without the header
    # The proxy may pass its own Authorization on (an OIDC token): its header decides.
    passed_on = {**header, "Authorization": "Bearer eyJ-an-id-token-d2r-does-not-know"}
    assert _get(site.port, "/", passed_on, source=PROXY)[0] == 200


def test_refusals_are_logged_without_secrets_and_counted(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    def refused(reason: str) -> float:
        text = _get(site.port, "/metrics", _bearer(site.tokens["metrics"]))[2].decode()
        for line in text.splitlines():
            if line.startswith(f'd2r_http_refusals_total{{reason="{reason}"}}'):
                return float(line.split()[-1])
        return 0.0

    before = {r: refused(r) for r in ("bad_token", "bad_password", "missing_role")}
    wrong_token = secrets.token_urlsafe(24)
    with caplog.at_level(logging.WARNING, logger="observability.http"):
        _get(site.port, f"/studies/{site.study}", _bearer(wrong_token))
        _get(site.port, "/", _basic("viewer-user", "not-the-password-42"))
        _get(site.port, "/metrics", _bearer(site.tokens["viewer"]))
    assert refused("bad_token") == before["bad_token"] + 1
    assert refused("bad_password") == before["bad_password"] + 1
    assert refused("missing_role") == before["missing_role"] + 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "401 bad_token (route needs viewer) from 127.0.0.1" in logged
    assert "403 missing_role (route needs metrics) from 127.0.0.1 as 'viewer-client'" in logged
    for secret in (wrong_token, "not-the-password-42", site.tokens["viewer"], site.study):
        assert secret not in logged


def test_failed_attempts_are_rate_limited_per_client(tmp_path: Path) -> None:
    s = start_site(tmp_path, max_failures=3)
    try:
        good = _bearer(s.tokens["viewer"])
        for _ in range(3):
            assert _get(s.port, "/", _bearer("guessed-token-guessed"))[0] == 401
        status, rsp, _ = _get(s.port, "/", good)
        assert status == 429 and 1 <= int(rsp.headers["Retry-After"]) <= 60
        assert _get(s.port, "/healthz")[0] == 200  # probes are never limited
        assert _get(s.port, "/", good, source="127.0.0.3")[0] == 200  # another client
        # Asking without a credential (a browser's first request) is not a failure.
        for _ in range(5):
            assert _get(s.port, "/", source="127.0.0.4")[0] == 401
        assert _get(s.port, "/", good, source="127.0.0.4")[0] == 200
    finally:
        s.server.stop()


def test_https_with_a_test_ca(tmp_path: Path) -> None:
    pki = make_test_ca(tmp_path / "pki")
    other = make_test_ca(tmp_path / "other", name="other")
    s = start_site(tmp_path, tls=tls_context(pki.server.cert, pki.server.key))
    try:
        trusting = ssl.create_default_context(cafile=str(pki.ca))
        status, rsp, _ = _get(s.port, "/healthz", context=trusting)
        assert status == 200 and rsp.headers["Strict-Transport-Security"]
        assert _get(s.port, "/metrics", context=trusting)[0] == 401
        status, _, body = _get(s.port, "/metrics", _bearer(s.tokens["metrics"]), context=trusting)
        assert status == 200 and b"d2r_http_refusals_total" in body
        with pytest.raises(ssl.SSLCertVerificationError):
            _get(s.port, "/healthz", context=ssl.create_default_context(cafile=str(other.ca)))
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            _get(s.port, "/healthz")  # plain HTTP to the TLS port
        # The endpoint still answers after the failed handshakes.
        assert _get(s.port, "/readyz", context=trusting)[0] == 200
    finally:
        s.server.stop()


def test_settings(tmp_path: Path) -> None:
    tokens_file, users_file, _, _ = write_credentials(tmp_path)
    pki = make_test_ca(tmp_path / "pki")
    s = ObservabilitySettings.from_env(
        {
            "D2R_HTTP_HOST": "0.0.0.0",
            "D2R_HTTP_TOKENS_FILE": str(tokens_file),
            "D2R_HTTP_USERS_FILE": str(users_file),
            "D2R_HTTP_TRUSTED_PROXIES": "10.0.0.0/8",
            "D2R_HTTP_PROXY_ROLES": "viewer,ingest",
            "D2R_HTTP_TLS_CERT": str(pki.server.cert),
            "D2R_HTTP_TLS_KEY": str(pki.server.key),
            "D2R_HTTP_TLS_CA": str(pki.ca),
        }
    )
    assert s.http_auth_required and s.http_proxy_roles == {"viewer", "ingest"}
    assert s.http_tls_ca == pki.ca
    assert not ObservabilitySettings.from_env({}).http_auth_required  # loopback by default
    assert ObservabilitySettings.from_env({"D2R_HTTP_AUTH": "required"}).http_auth_required
    assert ObservabilitySettings.from_env({"D2R_HTTP_HOST": "::1"}).http_auth_required is False
    bad_tokens = tmp_path / "bad-tokens"
    bad_tokens.write_text("prom scraper 0123456789abcdef0123\n")
    for env, setting in [
        ({"D2R_HTTP_TLS_CERT": str(pki.server.cert)}, "D2R_HTTP_TLS_KEY"),
        ({"D2R_HTTP_TLS_CA": str(pki.ca)}, "D2R_HTTP_TLS_CA"),  # needs HTTPS
        ({"D2R_HTTP_TLS_CA": str(tmp_path / "missing")}, "D2R_HTTP_TLS_CA"),
        ({"D2R_HTTP_TOKENS_FILE": str(bad_tokens)}, "D2R_HTTP_TOKENS_FILE"),
        ({"D2R_HTTP_TOKENS_FILE": str(tmp_path / "missing")}, "D2R_HTTP_TOKENS_FILE"),
        ({"D2R_HTTP_USERS_FILE": str(tokens_file)}, "D2R_HTTP_USERS_FILE"),
        ({"D2R_HTTP_PROXY_ROLES": "admin"}, "D2R_HTTP_PROXY_ROLES"),
        ({"D2R_HTTP_AUTH": "off"}, "D2R_HTTP_AUTH"),
        ({"D2R_HTTP_TRUSTED_PROXIES": "proxy.example"}, "D2R_HTTP_TRUSTED_PROXIES"),
    ]:
        with pytest.raises(ConfigError) as info:
            ObservabilitySettings.from_env(env)
        assert info.value.setting == setting
        assert "0123456789abcdef0123" not in str(info.value)  # no token in the message


def run_d2r(*args: str, input: str) -> subprocess.CompletedProcess[str]:  # noqa: A002
    return subprocess.run(
        d2r_cmd(*args),
        env=base_env(),
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_http_user_command_writes_a_hashed_password(tmp_path: Path) -> None:
    users = tmp_path / "users"
    res = run_d2r(
        "http-user", "ann", "--role", "viewer", "--role", "metrics", "--file", str(users),
        "--password-stdin", input="correct horse battery\n",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert users.stat().st_mode & 0o777 == 0o600
    name, roles, encoded = users.read_text().strip().split(":")
    assert (name, roles) == ("ann", "metrics,viewer")
    assert "correct horse" not in users.read_text()
    assert verify_password("correct horse battery", encoded)
    assert not verify_password("correct horse batter", encoded)
    short = run_d2r(
        "http-user", "bob", "--role", "viewer", "--file", str(users), "--password-stdin",
        input="short\n",
    )  # fmt: skip
    assert short.returncode == 1 and "at least 8" in short.stderr


def test_limiter_window_passes() -> None:
    limiter = FailureLimiter(2, 10.0)
    limiter.record_failure("10.0.0.1", now=0.0)
    assert limiter.retry_after("10.0.0.1", now=0.5) == 0.0
    limiter.record_failure("10.0.0.1", now=1.0)
    assert limiter.retry_after("10.0.0.1", now=1.5) == pytest.approx(8.5)
    assert limiter.retry_after("10.0.0.2", now=1.5) == 0.0
    assert limiter.retry_after("10.0.0.1", now=10.5) == 0.0  # the first failure left the window


def test_credentials_files_are_reread_when_they_change(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    old, new = secrets.token_hex(16), secrets.token_hex(16)
    tokens.write_text(f"prom metrics {old}\n")
    auth = Authenticator(required=True, tokens_file=tokens)

    def status(token: str) -> int:
        return auth.decide("metrics", "10.0.0.9", {"authorization": f"Bearer {token}"}).status

    assert (status(old), status(new)) == (200, 401)
    tokens.write_text(f"prom metrics {new}\n# rotated\n")
    assert (status(old), status(new)) == (401, 200)
    tokens.write_text("prom metrics short\n")  # a broken edit keeps the last good file
    assert status(new) == 200
