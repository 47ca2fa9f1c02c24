"""Fuzz target: the request line and headers of the HTTP endpoint (:mod:`observability.http`).

The endpoint is built as the node builds it (:class:`~observability.http.ObservabilityServer`
with an :class:`~d2r_http.auth.Authenticator` requiring credentials, the status pages and
the STOW-RS receiver), and each input is the raw bytes a client sends on one connection: they
are written into one end of a socket pair, which is then half-closed, and the server's request
handler class runs on the other end in this thread (so an exception escaping it is seen here).

Properties: no exception escapes the handler and none is logged as unexpected; what comes back
is empty (the connection closed) or a sequence of well-formed HTTP/1.x responses; a 200 answer
without a valid credential in the request is a health or readiness answer (a route that needs
no credential), and one with only the ``metrics`` token is that or the metrics text.
"""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fuzz._harness import (
    KnownGap,
    LogWatch,
    OneInput,
    PropertyViolation,
    check,
    fuzz_main,
    instrumented,
    quiet_logging,
    tolerating,
)

with instrumented("observability", "dicom_node", "http", "multipart"):
    from prometheus_client import CollectorRegistry, Counter
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    from d2r_http.auth import Authenticator, FailureLimiter, hash_password
    from dicom_node.spool import Spool
    from dicom_node.stow import StowReceiver
    from observability.http import ObservabilityServer
    from observability.pages import StatusPages
    from studydb.records import InstanceRecord
    from studydb.store import StudyStore

#: a token holding every role, and one holding ``metrics`` only (the seeds carry both)
FULL_TOKEN = "fuzz-full-token-0123456789abcdef"
METRICS_TOKEN = "fuzz-metrics-token-0123456789ab"
USER, PASSWORD = "viewer1", "fuzz-password-1"
#: the study the endpoint knows (one DX image), so that its page and preview render
STUDY = "1.2.826.0.1.3680043.8.498.10"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
HEALTH_BODY = re.compile(rb'\{"status": "(ok|fail)", "checks": \{')
METRICS_BODY = b"# HELP "
#: the routes that need no credential
OPEN_ROUTES = ("/healthz", "/readyz")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9]) [^\r\n]*\r\n")
#: http.server's error page, and a request line it answers in HTTP/0.9 (no status line)
_STDLIB_ERROR_PAGE = b"<!DOCTYPE HTML>"
HTTP09_ANSWER = "an answer without status line (HTTP/0.9)"
KNOWN_GAPS: tuple[KnownGap, ...] = ()


def _has_http09_line(data: bytes) -> bool:
    """Whether a line of ``data`` is what http.server reads as an HTTP/0.9 request line."""
    for line in data.split(b"\n"):
        words = str(line, "iso-8859-1").rstrip("\r\n").split()
        if (len(words) == 2 and words[0] == "GET") or (len(words) == 3 and words[2] == "HTTP/0.9"):
            return True
    return False


def _has_head_line(data: bytes) -> bool:
    """Whether a line of ``data`` may be read as a HEAD request (http.server splits on any
    whitespace ``str.split`` knows, \\x1c-\\x1f included)."""
    return any(str(line, "iso-8859-1").split()[:1] == ["HEAD"] for line in data.split(b"\n"))


def _responses(
    answer: bytes, *, http09: bool, head: bool
) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """The responses in ``answer``; raises ``PropertyViolation`` where it is not HTTP/1.x
    (``http09``: the request holds a line that http.server takes for an HTTP/0.9 request;
    ``head``: it holds a HEAD request, whose answer has no body)."""
    found = []
    at = 0
    while at < len(answer):
        line = _STATUS_LINE.match(answer, at)
        if line is None:
            rest = answer[at : at + 80]
            if rest.startswith(_STDLIB_ERROR_PAGE) or http09:
                raise PropertyViolation(f"{HTTP09_ANSWER}: {rest!r}")
            raise PropertyViolation(f"not an HTTP/1.x status line at byte {at}: {rest!r}")
        end = answer.find(b"\r\n\r\n", line.start())
        check(end >= 0, f"response headers never end: {answer[at : at + 200]!r}")
        headers: dict[bytes, bytes] = {}
        for field in answer[line.end() : end].split(b"\r\n") if end > line.end() else []:
            name, colon, value = field.partition(b":")
            check(colon and name and name == name.strip(), f"malformed header {field!r}")
            headers[name.lower()] = value.strip()
        length = headers.get(b"content-length")
        check(
            length is not None and length.isdigit(), f"response without Content-Length: {headers}"
        )
        assert length is not None
        body_end = end + 4 + int(length)
        after_headers = answer[end + 4 : end + 12]
        if head and (not after_headers or after_headers.startswith(b"HTTP/1.")):
            body_end = end + 4  # the answer to a HEAD request: headers only
        check(body_end <= len(answer), "response body shorter than its Content-Length")
        found.append((int(line.group(1)), headers, answer[end + 4 : body_end]))
        at = body_end
    return found


def _read_all(sock: socket.socket, into: bytearray) -> None:
    while chunk := sock.recv(65536):
        into += chunk


def _add_study(store: StudyStore, folder: Path) -> None:
    """One study with one small DX image, so that its page and preview have something to show."""
    ds = Dataset()
    ds.SOPClassUID = UID(DX)
    ds.SOPInstanceUID = UID(f"{STUDY}.1.1")
    ds.StudyInstanceUID = UID(STUDY)
    ds.SeriesInstanceUID = UID(f"{STUDY}.1")
    ds.Modality = "DX"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(range(128))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    store.record_instance(
        InstanceRecord(
            study_instance_uid=STUDY,
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=DX,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            modality="DX",
            body_part_examined="CHEST",
            view_position="PA",
            series_description="",
            path=str(path),
            size=path.stat().st_size,
            sha256="0" * 64,
            calling_ae_title="FUZZ",
            received_at=datetime.now(UTC),
        ),
        outcome="stored",
    )


class _Endpoint:
    def __init__(self, folder: Path) -> None:
        tokens = folder / "tokens"
        tokens.write_text(
            f"admin metrics,viewer,ingest {FULL_TOKEN}\nscraper metrics {METRICS_TOKEN}\n"
        )
        users = folder / "users"
        users.write_text(f"{USER}:viewer,metrics,ingest:{hash_password(PASSWORD)}\n")
        self.store = StudyStore(f"sqlite:///{folder / 'd2r.db'}")
        _add_study(self.store, folder)
        spool = Spool(folder / "spool")
        registry = CollectorRegistry()
        Counter("fuzz_requests", "requests", registry=registry).inc()
        self.server = ObservabilityServer(
            "0.0.0.0",
            0,
            registry=registry,
            health={"database": lambda: None},
            ready={"listener": lambda: None},
            pages=StatusPages(self.store),
            auth=Authenticator(
                required=True,
                tokens_file=tokens,
                users_file=users,
                # every input is judged on its own: the failure limiter never blocks it
                limiter=FailureLimiter(1_000_000, 1e-6),
            ),
            ingest=StowReceiver(spool, self.store, ledger=self.store, max_bytes=64 * 1024),
        )

    def close(self) -> None:
        self.store.close()


def _exchange(endpoint: _Endpoint, data: bytes) -> bytes:
    """What the endpoint's request handler answers to ``data``, the client half-closed."""
    fake_server: Any = SimpleNamespace(server_address=("0.0.0.0", 8080))  # what the handler reads
    client, server_side = socket.socketpair()
    answer = bytearray()
    reader = threading.Thread(target=_read_all, args=(client, answer), daemon=True)
    with client, server_side:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        reader.start()
        try:
            endpoint.server.handler_class(server_side, ("127.0.0.1", 12345), fake_server)
        finally:
            server_side.close()
            reader.join()
    return bytes(answer)


def _open_headers(endpoint: _Endpoint) -> set[tuple[bytes, bytes]]:
    """(Content-Type, Content-Length) of the answers of the open routes: what a bodiless
    answer to a HEAD request without a credential may say."""
    found = set()
    for route in OPEN_ROUTES:
        request = f"GET {route} HTTP/1.1\r\nHost: node\r\n\r\n".encode()
        for status, headers, _ in _responses(
            _exchange(endpoint, request), http09=False, head=False
        ):
            check(status == 200, f"{route} answers {status}")
            found.add((headers.get(b"content-type", b""), headers.get(b"content-length", b"")))
    return found


def one_input_with(endpoint: _Endpoint, watch: LogWatch) -> OneInput:
    open_headers = _open_headers(endpoint)

    def one_input(data: bytes) -> None:
        answer = _exchange(endpoint, data)
        watch.raise_found()
        full = FULL_TOKEN.encode() in data or BASIC.encode() in data
        metrics = METRICS_TOKEN.encode() in data
        http09 = _has_http09_line(data)
        head = _has_head_line(data)
        for status, headers, body in _responses(answer, http09=http09, head=head):
            if status != 200 or full:
                continue
            if head and not body:  # HEAD: the headers of an open route's answer
                said = (headers.get(b"content-type", b""), headers.get(b"content-length", b""))
                allowed = said in open_headers or (metrics and said[0].startswith(b"text/plain"))
            else:
                allowed = bool(HEALTH_BODY.match(body)) or (
                    metrics and body.startswith(METRICS_BODY)
                )
            check(allowed, f"200 without a credential for this route: {headers} {body[:200]!r}")

    return one_input


@contextlib.contextmanager
def harness() -> Iterator[OneInput]:
    quiet_logging()
    with tempfile.TemporaryDirectory(prefix="d2r-fuzz-http-") as tmp:
        endpoint = _Endpoint(Path(tmp))
        try:
            with LogWatch("observability", "dicom_node") as watch:
                yield tolerating(one_input_with(endpoint, watch), KNOWN_GAPS)
        finally:
            endpoint.close()


if __name__ == "__main__":
    fuzz_main(harness)
