"""One route table decides both access and answer: every route of ``d2r_http.routes.ROUTES``
x every role x {no, wrong, right credential} x spellings of its path, over real HTTP connections.

A spelling that is not an absolute path in normal form (no leading slash, ``./``, ``//``,
percent-encoding, ``..``) is 400 whatever the credential; one that is well formed but not in the
table (trailing slash, other case) needs a credential and then answers 404. Only the canonical
spelling with the route's role ever gets the page, and no other answer carries the patient's name.
"""

from __future__ import annotations

import http.client
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from d2r_http.auth import Authenticator, FailureLimiter
from d2r_http.routes import ROUTES, BadTarget, match, parse_target
from observability import metrics
from observability.http import ObservabilityServer
from observability.pages import StatusPages
from studydb.store import StudyStore
from tests.observability.conftest import record_for
from tests.security.test_http_auth import ROLES, _basic, _bearer, write_credentials
from tests.support.dicom_files import make_dx

PATIENT = "ROUTE^TABLE^PATIENT"

#: A sample path for each entry of ROUTES (by route name and pattern), {uid} filled in.
SAMPLES = {
    "healthz": ["/healthz"],
    "readyz": ["/readyz"],
    "metrics": ["/metrics"],
    "index": ["/", "/index.html"],
    "study": ["/studies/{uid}"],
    "preview": ["/studies/{uid}/preview.png"],
    "stow": ["/dicom-web/studies", "/dicom-web/studies/{uid}"],
    "fhir": ["/fhir/DiagnosticReport"],
}


def spellings(path: str) -> dict[str, tuple[str, str]]:
    """Other spellings of ``path`` -> (spelling, what it must get: "bad" or "unknown")."""
    rest = path.lstrip("/")
    out = {
        "no-leading-slash": (rest or "", "bad"),
        "dot-segment": (f"/./{rest}", "bad"),
        "double-slash": (f"//{rest}", "bad"),
        "percent-encoded": ("/%" + f"{ord(rest[0]):02X}" + rest[1:] if rest else "/%2F", "bad"),
        "dot-dot": (f"/x/../{rest}", "bad"),
        "encoded-slash": (path.replace("/", "%2F", 2) if path.count("/") > 1 else "/%2E", "bad"),
    }
    if rest:
        out["trailing-slash"] = (f"{path}/", "unknown")
        out["upper-case"] = (path.upper(), "unknown")
    if out["no-leading-slash"][0] == "":
        del out["no-leading-slash"]
    return out


@dataclass(frozen=True)
class Site:
    port: int
    study: str
    tokens: dict[str, str]
    passwords: dict[str, str]
    stored: list[str]


def _request(
    port: int, method: str, target: str, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        # putrequest sends the target as given: no client-side normalisation
        conn.putrequest(method, target, skip_host=False, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        body = b"--x--\r\n" if method == "POST" else b""
        if method == "POST":
            conn.putheader(
                "Content-Type", 'multipart/related; type="application/dicom"; boundary=x'
            )
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        rsp = conn.getresponse()
        return rsp.status, rsp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("routes")
    tokens_file, users_file, tokens, passwords = write_credentials(folder)
    store = StudyStore(f"sqlite:///{folder / 'd2r.db'}")
    image_path = folder / "image.dcm"
    image = make_dx(image_path, rows=96, cols=80)
    image.PatientName = PATIENT
    image.save_as(image_path, enforce_file_format=True)
    store.record_instance(record_for(image, image_path), outcome="stored")
    stored: list[str] = []

    def ingest(
        method: str, route: str, headers: Any, body: Any, client: str, user: str
    ) -> tuple[int, str, bytes]:
        stored.append(route)
        while body.read(65536):
            pass
        return 200, "application/dicom+json", b"{}"

    server = ObservabilityServer(
        "127.0.0.1",
        0,
        registry=metrics.build_registry(None),
        health={"database": lambda: None},
        ready={"database": lambda: None},
        pages=StatusPages(store, show_phi=True),
        auth=Authenticator(
            required=True,
            tokens_file=tokens_file,
            users_file=users_file,
            limiter=FailureLimiter(100000, 60.0, max_total=100000),
        ),
        ingest=ingest,
        receivers={"fhir": ingest},
    ).start()
    yield Site(server.port, str(image.StudyInstanceUID), tokens, passwords, stored)
    server.stop()


def test_every_route_has_samples() -> None:
    """A route added to the table without samples here would go untested."""
    assert {route.name for _, route in ROUTES} == set(SAMPLES)
    for name, paths in SAMPLES.items():
        for path in paths:
            route, _ = match(parse_target(path.format(uid="1.2.3")))
            assert route.name == name


CASES = [(name, path) for name, paths in SAMPLES.items() for path in paths]


@pytest.mark.parametrize("name,template", CASES, ids=[c[1] for c in CASES])
def test_access_follows_the_table(site: Site, name: str, template: str) -> None:
    path = template.format(uid=site.study)
    route, _ = match(parse_target(path))
    method = route.methods[0]
    credentials: dict[str, dict[str, str]] = {"none": {}}
    credentials["wrong-token"] = _bearer(secrets.token_urlsafe(24))
    credentials["wrong-password"] = _basic("viewer-user", "not-the-password")
    for role in ROLES:
        credentials[f"{role}-token"] = _bearer(site.tokens[role])
        credentials[f"{role}-basic"] = _basic(f"{role}-user", site.passwords[role])

    def expected(credential: str) -> int:
        if route.role is None:
            return 200
        if credential == "none" or credential.startswith("wrong"):
            return 401
        return 200 if credential.split("-")[0] == route.role else 403

    for credential, headers in credentials.items():
        status, body = _request(site.port, method, path, headers)
        assert status == expected(credential), (path, credential, body[:200])
        if status != 200 or route.name not in ("index", "study"):
            assert PATIENT.encode() not in body, (path, credential)
        elif route.name in ("index", "study"):
            assert PATIENT.encode() in body  # the page itself, with PHI on
    for spelling, (target, kind) in spellings(path).items():
        for credential, headers in credentials.items():
            status, body = _request(site.port, method, target, headers)
            if kind == "bad":
                want = 400
            elif credential == "none" or credential.startswith("wrong"):
                want = 401
            else:
                want = 404
            assert status == want, (spelling, target, credential, body[:200])
            assert PATIENT.encode() not in body, (spelling, target, credential)


def test_other_methods_and_no_body_leaks(site: Site) -> None:
    viewer = _bearer(site.tokens["viewer"])
    ingest = _bearer(site.tokens["ingest"])
    assert _request(site.port, "POST", f"/studies/{site.study}", viewer)[0] == 405
    assert _request(site.port, "GET", "/dicom-web/studies", ingest)[0] == 405
    status, body = _request(site.port, "HEAD", "/", viewer)
    assert (status, body) == (200, b"")  # HEAD: the page's headers only
    assert _request(site.port, "HEAD", "/")[0] == 401
    assert _request(site.port, "PUT", "/metrics", _bearer(site.tokens["metrics"]))[0] == 405
    assert _request(site.port, "DELETE", f"/studies/{site.study}")[0] == 401
    assert _request(site.port, "DELETE", "studies/x", viewer)[0] == 400
    assert _request(site.port, "FROB", "/metrics")[0] == 501  # unknown to HTTP
    before = len(site.stored)
    assert _request(site.port, "POST", "/dicom-web/studies", ingest)[0] == 200
    assert site.stored[before:] == ["/dicom-web/studies"]
    feedback = _bearer(site.tokens["feedback"])
    assert _request(site.port, "GET", "/fhir/DiagnosticReport", feedback)[0] == 405
    assert _request(site.port, "POST", "/fhir/DiagnosticReport", ingest)[0] == 403
    assert _request(site.port, "POST", "/fhir/DiagnosticReport", feedback)[0] == 200
    assert site.stored[-1] == "/fhir/DiagnosticReport"
    # the ingest role never reads pages, whatever the spelling
    for target in (f"studies/{site.study}", f"/studies/{site.study}/preview.png/"):
        status, body = _request(site.port, "GET", target, ingest)
        assert status in (400, 404) and PATIENT.encode() not in body


@pytest.mark.parametrize(
    "target",
    [
        "studies/1",
        "*",
        "http://host/metrics",
        "//metrics",
        "/./metrics",
        "/a/../metrics",
        "/%6Detrics",
        "/studies/1%2F2",
        "/metrics#x",
        "/metr\x01ics",
        "/métrics",
        "/" + "a" * 3000,
        "/metrics?\x7f",
    ],
)
def test_targets_not_in_normal_form_are_refused(target: str) -> None:
    with pytest.raises(BadTarget):
        parse_target(target)


def test_probes_name_only_the_failing_check(tmp_path: Path) -> None:
    tokens_file, _, tokens, _ = write_credentials(tmp_path)

    def database() -> None:
        raise OSError("connection to postgres://d2r@db.internal:5432 /var/lib/d2r failed")

    server = ObservabilityServer(
        "127.0.0.1",
        0,
        registry=metrics.build_registry(None),
        health={"database": database},
        ready={"database": database, "broker": lambda: None},
        auth=Authenticator(required=True, tokens_file=tokens_file),
    ).start()
    try:
        for probe in ("/healthz", "/readyz"):
            status, body = _request(server.port, "GET", probe)
            assert status == 503
            text = body.decode()
            assert "fail" in text and "database" in text
            for secret in ("postgres", "db.internal", "d2r@", "/var/lib", "OSError"):
                assert secret not in text
            # a caller with a credential is told why
            status, body = _request(server.port, "GET", probe, _bearer(tokens["metrics"]))
            assert status == 503 and b"db.internal" in body
    finally:
        server.stop()
