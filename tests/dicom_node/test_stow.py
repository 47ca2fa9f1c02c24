"""The STOW-RS receiver over real HTTP on loopback: ``dicomweb-client`` and hand-made requests.

Each test runs the node's HTTP endpoint with the receiver installed, a real spool and a real
SQLite study database, and checks what the sender was told against what is on disk and in the
database: every acknowledged instance is both, nothing else is, and every refusal has its
specific status or FailureReason.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian

from d2r_core import statuses
from d2r_http.auth import Authenticator
from d2r_http.server import tls_context
from dicom_node.spool import Spool, dataset_offset
from dicom_node.stow import (
    STOW_CALLING_AE,
    STUDY_MISMATCH,
    PartResult,
    StowReceiver,
    request_status,
    store_response,
)
from observability import metrics
from observability.audit import AuditLog, ListenerAudit, read_audit
from observability.http import ObservabilityServer
from studydb.errors import DatabaseUnavailable
from studydb.store import StudyStore
from tests.security import hostile
from tests.security.tls_ca import make_test_ca
from tests.support.dicom_files import make_dx
from tests.support.processes import wait_for

BOUNDARY = "d2r-test-boundary"
RELATED = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'

FAILED_SOP = "00081198"
REFERENCED_SOP = "00081199"
FAILURE_REASON = "00081197"
SOP_INSTANCE = "00081155"


@dataclass
class Site:
    url: str
    server: ObservabilityServer
    spool: Spool
    store: StudyStore
    audit_path: Path
    released: list[int]

    def post(
        self, body: bytes | Iterator[bytes], *, path: str = "/dicom-web/studies", **kw: Any
    ) -> Any:
        headers = {"Content-Type": RELATED, **kw.pop("headers", {})}
        return requests.post(self.url + path, data=body, headers=headers, timeout=30, **kw)

    def spooled(self) -> list[Path]:
        return sorted(p for p in self.spool.instances_dir.rglob("*.dcm"))

    def received(self) -> list[dict[str, Any]]:
        return [e for e in read_audit(self.audit_path) if e["event"] == "received"]


SiteFactory = Callable[..., Site]


@pytest.fixture
def site_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteFactory]:
    servers: list[ObservabilityServer] = []

    def start(
        *,
        host: str = "127.0.0.1",
        auth: Authenticator | None = None,
        max_bytes: int = 64 * 1024 * 1024,
        max_concurrent: int = 4,
        min_free_bytes: int = 0,
        tls: ssl.SSLContext | None = None,
        recorder: Callable[[StudyStore], Any] | None = None,
    ) -> Site:
        root = tmp_path_factory.mktemp("stow")
        spool = Spool(root / "spool", min_free_bytes=min_free_bytes)
        store = StudyStore(f"sqlite:///{root / 'd2r.db'}")
        audit_path = root / "audit.jsonl"
        audit = ListenerAudit(AuditLog(audit_path))
        released: list[int] = []
        receiver = StowReceiver(
            spool,
            store if recorder is None else recorder(store),
            ledger=store,
            max_bytes=max_bytes,
            max_concurrent=max_concurrent,
            on_released=lambda: released.append(1),
            on_instance=audit.stow_instance,
        )
        server = ObservabilityServer(
            host,
            0,
            registry=metrics.build_registry(None),
            health={},
            ready={},
            auth=auth,
            tls=tls,
            ingest=receiver,
        ).start()
        servers.append(server)
        scheme = "https" if tls else "http"
        return Site(
            f"{scheme}://127.0.0.1:{server.port}", server, spool, store, audit_path, released
        )

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def site(site_factory: SiteFactory) -> Site:
    return site_factory()


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart(parts: list[tuple[str, bytes]], *, close: bool = True) -> bytes:
    """A multipart/related body; an empty content type writes a part without Content-Type."""
    out = b""
    for content_type, data in parts:
        header = f"Content-Type: {content_type}\r\n" if content_type else ""
        out += f"--{BOUNDARY}\r\n{header}\r\n".encode() + data + b"\r\n"
    return out + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def data_set_sha256(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[dataset_offset(data[:144]) :]).hexdigest()


def failures(answer: dict[str, Any]) -> dict[str, int]:
    """SOP Instance UID (or "") -> FailureReason of the FailedSOPSequence."""
    items = answer.get(FAILED_SOP, {}).get("Value", [])
    return {
        (i.get(SOP_INSTANCE, {}).get("Value") or [""])[0]: i[FAILURE_REASON]["Value"][0]
        for i in items
    }


def referenced(answer: dict[str, Any]) -> list[str]:
    items = answer.get(REFERENCED_SOP, {}).get("Value", [])
    return [i[SOP_INSTANCE]["Value"][0] for i in items]


def study(n: int = 2, **kw: Any) -> list[Dataset]:
    first = make_dx(None, rows=128, cols=104, **kw)
    rest = [
        make_dx(
            None,
            rows=128,
            cols=104,
            study_uid=first.StudyInstanceUID,
            series_uid=first.SeriesInstanceUID,
            seed=i,
        )
        for i in range(1, n)
    ]
    return [first, *rest]


# ------------------------------------------------------------------------- real clients
def test_dicomweb_client_stores_a_study_as_c_store_would(site: Site) -> None:
    images = study(3)
    uid = str(images[0].StudyInstanceUID)
    # A small chunk size makes the client send chunked transfer encoding.
    client = DICOMwebClient(f"{site.url}/dicom-web", chunk_size=16 * 1024)
    answer = client.store_instances(images, study_instance_uid=uid)

    stored = sorted(str(r.ReferencedSOPInstanceUID) for r in answer.ReferencedSOPSequence)
    assert stored == sorted(str(ds.SOPInstanceUID) for ds in images)
    assert "FailedSOPSequence" not in answer
    records = {r.sop_instance_uid: r for r in site.store.instances(uid)}
    assert sorted(records) == stored
    for ds in images:
        record = records[str(ds.SOPInstanceUID)]
        path = Path(record.path)
        # the data set bytes as sent, and the file a valid Part 10 instance
        sent = part10(ds)
        assert record.sha256 == data_set_sha256(path)
        assert (
            path.read_bytes()[dataset_offset(path.read_bytes()[:144]) :]
            == sent[dataset_offset(sent[:144]) :]
        )
        assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
        assert record.calling_ae_title == STOW_CALLING_AE
    assert list(site.spool.tmp_dir.iterdir()) == []
    # One request counts as one released association: the release-grace rule applies.
    view = site.store.get(uid)
    assert view is not None and view.instance_count == 3
    assert site.released == [1]
    lines = site.received()
    assert [(e["outcome"], e["status"], e["calling_ae_title"]) for e in lines] == [
        ("stored", "0x0000", "STOW-RS")
    ] * 3
    assert all(e["peer_address"] == "127.0.0.1" and e["user"] == "local" for e in lines)


def test_the_same_instance_posted_twice_is_stored_once(site: Site) -> None:
    (image,) = study(1)
    first = multipart([("application/dicom", part10(image))])
    again = multipart([("", part10(image))])  # no part Content-Type: the request's type
    for body in (first, again):
        rsp = site.post(body)
        assert rsp.status_code == 200, rsp.text
        assert rsp.headers["Content-Type"] == "application/dicom+json"
        assert referenced(rsp.json()) == [image.SOPInstanceUID]
    assert len(site.spooled()) == 1
    assert len(site.store.instances(image.StudyInstanceUID)) == 1
    assert [e["outcome"] for e in site.received()] == ["stored", "duplicate"]


# ------------------------------------------------------------------------- hostile input
def test_wrong_content_types_are_415(site: Site) -> None:
    (image,) = study(1)
    body = multipart([("application/dicom", part10(image))])
    for content_type in (
        "application/dicom",
        "application/json",
        f"multipart/form-data; boundary={BOUNDARY}",
        f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
    ):
        rsp = site.post(body, headers={"Content-Type": content_type})
        assert rsp.status_code == 415, content_type
    assert site.spooled() == []
    # only STOW-RS is served under /dicom-web/
    assert requests.get(f"{site.url}/dicom-web/studies", timeout=10).status_code == 405
    assert site.post(body, path="/dicom-web/studies/1.2.3/series").status_code == 404
    headers = {"Accept": "application/dicom+xml"}
    assert site.post(body, headers=headers).status_code == 406


def test_a_missing_boundary_is_400(site: Site) -> None:
    (image,) = study(1)
    body = multipart([("application/dicom", part10(image))])
    rsp = site.post(body, headers={"Content-Type": 'multipart/related; type="application/dicom"'})
    assert rsp.status_code == 400
    assert site.spooled() == []


def test_a_truncated_multipart_body_is_400_and_nothing_is_stored(site: Site) -> None:
    images = study(2)
    whole = multipart([("application/dicom", part10(ds)) for ds in images])
    # the second part cut in the middle, no closing boundary
    cut = whole[: len(whole) - len(part10(images[1])) // 2]
    for body in (cut, multipart([("application/dicom", part10(images[0]))], close=False)):
        rsp = site.post(body)
        assert rsp.status_code == 400, rsp.text
        assert "multipart" in rsp.json()["reason"]
    assert site.spooled() == []
    assert site.store.instances(images[0].StudyInstanceUID) == []
    assert list(site.spool.tmp_dir.iterdir()) == []
    assert site.received() == []


def test_a_connection_cut_inside_the_body_is_400_and_nothing_is_stored(site: Site) -> None:
    """The sender announces the whole body, sends half and stops sending."""
    images = study(2)
    body = multipart([("application/dicom", part10(ds)) for ds in images])
    port = site.server.port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = (
            f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: {RELATED}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body[: len(body) // 2])
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer[:80]
    assert b"cut off" in answer
    assert site.spooled() == []
    assert site.store.instances(images[0].StudyInstanceUID) == []
    assert list(site.spool.tmp_dir.iterdir()) == []


def test_hostile_parts_fail_with_their_reason_and_good_parts_are_stored(
    site: Site, tmp_path: Path
) -> None:
    good = study(2)
    bad_files = {
        name: make(tmp_path)
        for name, make in [
            ("truncated", hostile.truncated_header),
            ("garbage", hostile.garbage),
            ("no-sop-uid", hostile.missing_sop_instance_uid),
            ("no-study-uid", hostile.missing_study_uid),
            ("wrong-vr", hostile.wrong_vr),
        ]
    }
    huge = hostile._dx()
    data = hostile.encode(huge)
    at = data.index(b"\x08\x00\x16\x00UI")  # a 2 GiB element before the SOP Class UID
    data = data[:at] + b"\x08\x00\x07\x00UN\x00\x00" + (0x7FFFFFF0).to_bytes(4, "little") + b"\0"
    huge_path = hostile.write_raw(tmp_path / "huge.dcm", huge, data, ExplicitVRLittleEndian)
    other_class = hostile._dx()
    says_cr = Dataset()  # File Meta says CR, the data set says DX: 0xA900
    says_cr.SOPClassUID = ComputedRadiographyImageStorage
    says_cr.SOPInstanceUID = other_class.SOPInstanceUID
    mismatch = hostile.write_raw(
        tmp_path / "mismatch.dcm",
        says_cr,
        hostile.encode(other_class),
        ExplicitVRLittleEndian,
    ).read_bytes()
    parts = [
        ("application/dicom", part10(good[0])),
        ("text/plain", b"not an image"),
        ("application/dicom", b"neither preamble nor DICM"),
        *[("application/dicom", p.read_bytes()) for p, _ in bad_files.values()],
        ("application/dicom", huge_path.read_bytes()),
        ("application/dicom", mismatch),
        ("application/dicom", part10(good[1])),
    ]
    rsp = site.post(multipart(parts))
    assert rsp.status_code == 202, rsp.text
    answer = rsp.json()
    assert sorted(referenced(answer)) == sorted(str(ds.SOPInstanceUID) for ds in good)
    reasons = failures(answer)
    items = answer[FAILED_SOP]["Value"]
    assert len(items) == len(parts) - 2
    for _, ds in bad_files.values():
        assert reasons[str(ds.SOPInstanceUID)] == statuses.CANNOT_UNDERSTAND
    assert reasons[str(huge.SOPInstanceUID)] == statuses.CANNOT_UNDERSTAND
    assert reasons[str(other_class.SOPInstanceUID)] == statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert reasons[""] == statuses.CANNOT_UNDERSTAND  # the two parts without any UID
    # What was acknowledged is on disk and in the database; nothing else is.
    uids = {ds.SOPInstanceUID for ds in good}
    assert {p.stem for p in site.spooled()} == uids
    assert {r.sop_instance_uid for r in site.store.instances(good[0].StudyInstanceUID)} == uids
    rejections = site.store.rejections()
    assert len(rejections) == len(parts) - 2
    assert all(r["calling_ae_title"] == STOW_CALLING_AE for r in rejections)
    outcomes = [e["outcome"] for e in site.received()]
    assert outcomes.count("stored") == 2 and outcomes.count("rejected") == len(parts) - 2


def test_an_instance_of_another_study_is_refused_for_that_part(site: Site) -> None:
    (image,) = study(1)
    (other,) = study(1)
    body = multipart([("application/dicom", part10(image)), ("application/dicom", part10(other))])
    rsp = site.post(body, path=f"/dicom-web/studies/{image.StudyInstanceUID}")
    assert rsp.status_code == 202
    assert referenced(rsp.json()) == [image.SOPInstanceUID]
    assert failures(rsp.json()) == {str(other.SOPInstanceUID): STUDY_MISMATCH}
    # the same instance alone: every part failed
    rsp = site.post(
        multipart([("application/dicom", part10(other))]),
        path=f"/dicom-web/studies/{image.StudyInstanceUID}",
    )
    assert rsp.status_code == 409
    assert site.store.instances(other.StudyInstanceUID) == []


def test_over_the_size_limit_is_413_by_header_and_while_reading(
    site_factory: SiteFactory,
) -> None:
    site = site_factory(max_bytes=32 * 1024)
    (image,) = study(1)  # about 27 KiB of pixels
    body = multipart([("application/dicom", part10(image))] * 2)
    assert len(body) > 32 * 1024
    assert site.post(body).status_code == 413
    # no Content-Length: chunked, refused once the limit is crossed

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 4096):
            yield body[i : i + 4096]

    assert site.post(chunks()).status_code == 413
    assert site.spooled() == []
    assert list(site.spool.tmp_dir.iterdir()) == []


def test_a_part_without_preamble_is_stored_as_a_part10_file(site: Site) -> None:
    """Some senders post a data set never read from a file: File Meta, no preamble."""
    (image,) = study(1)
    raw = part10(image)[132:]
    assert raw[:2] == b"\x02\x00"
    rsp = site.post(multipart([("application/dicom", raw)]))
    assert rsp.status_code == 200, rsp.text
    (path,) = site.spooled()
    stored = path.read_bytes()
    assert stored[128:132] == b"DICM" and stored.endswith(bytes(image.PixelData))
    (record,) = site.store.instances(image.StudyInstanceUID)
    assert record.sha256 == data_set_sha256(path)


def test_a_request_beyond_the_concurrency_limit_is_503_before_its_body_is_read(
    site_factory: SiteFactory,
) -> None:
    site = site_factory(max_concurrent=1)
    big = make_dx(None, rows=512, cols=512)  # 512 KiB of pixels: streamed to tmp/ while it arrives
    body = multipart([("application/dicom", part10(big))])
    (small,) = study(1)
    small_body = multipart([("application/dicom", part10(small))])
    port = site.server.port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as first:
        head = (
            f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: {RELATED}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        first.sendall(head.encode() + body[: len(body) // 2])
        wait_for(lambda: list(site.spool.tmp_dir.iterdir()), 10, "the first request's part")
        refused = site.post(small_body)
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"]
        assert site.store.instances(small.StudyInstanceUID) == []
        first.sendall(body[len(body) // 2 :])
        answer = b""
        while chunk := first.recv(65536):
            answer += chunk
    assert answer.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), answer[:80]
    assert site.post(small_body).status_code == 200  # the slot is free again
    assert {p.stem for p in site.spooled()} == {big.SOPInstanceUID, small.SOPInstanceUID}


def test_spool_full_is_503(site_factory: SiteFactory) -> None:
    site = site_factory(min_free_bytes=1 << 62)
    (image,) = study(1)
    rsp = site.post(multipart([("application/dicom", part10(image))]))
    assert rsp.status_code == 503
    assert rsp.headers["Retry-After"]
    assert site.spooled() == []


class DatabaseDown:
    """The study database as the receiver sees it while ``down`` is set: unreachable."""

    def __init__(self, store: StudyStore) -> None:
        self.store = store
        self.down = True

    def record_instance(self, record: Any, *, outcome: str) -> str:
        if self.down:
            raise DatabaseUnavailable("the study database did not answer within 5 s")
        return self.store.record_instance(record, outcome=outcome)

    def record_rejection(self, **kwargs: Any) -> None:
        self.store.record_rejection(**kwargs)


def test_a_database_outage_is_503_and_the_resent_request_is_recorded(
    site_factory: SiteFactory,
) -> None:
    down: list[DatabaseDown] = []

    def recorder(store: StudyStore) -> DatabaseDown:
        down.append(DatabaseDown(store))
        return down[0]

    site = site_factory(recorder=recorder)
    (image,) = study(1)
    body = multipart([("application/dicom", part10(image))])
    rsp = site.post(body)
    assert rsp.status_code == 503 and rsp.headers["Retry-After"]
    assert site.store.get(image.StudyInstanceUID) is None  # never success without a record
    down[0].down = False
    rsp = site.post(body)
    assert rsp.status_code == 200, rsp.text
    assert [i.sop_instance_uid for i in site.store.instances(image.StudyInstanceUID)] == [
        image.SOPInstanceUID
    ]


def test_a_non_loopback_bind_needs_an_ingest_credential(
    site_factory: SiteFactory, tmp_path: Path
) -> None:
    tokens = {role: secrets.token_urlsafe(24) for role in ("ingest", "viewer")}
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("".join(f"{r}-client {r} {t}\n" for r, t in tokens.items()))
    site = site_factory(host="0.0.0.0", auth=Authenticator(required=True, tokens_file=tokens_file))
    (image,) = study(1)
    body = multipart([("application/dicom", part10(image))])
    assert site.post(body).status_code == 401
    bearer = {"Authorization": f"Bearer {tokens['viewer']}"}
    assert site.post(body, headers=bearer).status_code == 403
    assert site.spooled() == []
    client = DICOMwebClient(
        f"{site.url}/dicom-web", headers={"Authorization": f"Bearer {tokens['ingest']}"}
    )
    answer = client.store_instances([image])
    assert [str(r.ReferencedSOPInstanceUID) for r in answer.ReferencedSOPSequence] == [
        image.SOPInstanceUID
    ]
    assert [e["user"] for e in site.received()] == ["ingest-client"]


def test_a_verified_client_certificate_holds_the_ingest_role(
    site_factory: SiteFactory, tmp_path: Path
) -> None:
    pki = make_test_ca(tmp_path / "pki")
    other = make_test_ca(tmp_path / "other", name="other")
    site = site_factory(
        host="0.0.0.0",
        auth=Authenticator(required=True),
        tls=tls_context(pki.server.cert, pki.server.key, pki.ca),
    )
    (image,) = study(1)
    body = multipart([("application/dicom", part10(image))])
    verify = str(pki.ca)
    assert site.post(body, verify=verify).status_code == 401  # no certificate
    with pytest.raises(requests.exceptions.RequestException):  # a certificate of another CA
        site.post(body, verify=verify, cert=(str(other.client.cert), str(other.client.key)))
    client_cert = (str(pki.client.cert), str(pki.client.key))
    rsp = site.post(body, verify=verify, cert=client_cert)
    assert rsp.status_code == 200, rsp.text
    assert referenced(rsp.json()) == [image.SOPInstanceUID]
    # the certificate holds the ingest role only
    assert requests.get(f"{site.url}/metrics", verify=verify, cert=client_cert).status_code == 401
    assert [e["user"] for e in site.received()] == ["d2r-test-ca-client"]
    assert json.loads(rsp.content)  # the store response is JSON


# ------------------------------------------------------------------------- pure parts
def test_request_status_and_store_response() -> None:
    ok = PartResult("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.1", "1.2.3", statuses.SUCCESS, "stored")
    warned = PartResult("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.2", "1.2.3", 0xB000, "stored")
    bad = PartResult("", "", None, statuses.CANNOT_UNDERSTAND, reason="not DICOM")
    full = PartResult("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.3", "1.2.3", 0xA700, reason="full")
    cases = [[ok], [ok, warned], [ok, bad], [bad], [full], [bad, full], [ok, full]]
    assert [request_status(c) for c in cases] == [200, 202, 202, 409, 503, 409, 202]
    answer = store_response([ok, warned, bad, full])
    assert referenced(answer) == ["1.2.3.1", "1.2.3.2"]
    assert failures(answer) == {"": statuses.CANNOT_UNDERSTAND, "1.2.3.3": 0xA700}
    items = answer[REFERENCED_SOP]["Value"]
    assert "00081196" not in items[0] and items[1]["00081196"]["Value"] == [0xB000]
    assert store_response([]) == {}
