"""Fuzz target: the STOW-RS receiver (:class:`dicom_node.stow.StowReceiver`), in-process.

Each input is a request: its first byte picks the route, the framing (Content-Length or chunked,
or a Content-Length header written by the input: its second line) and the quoting of the
boundary; the boundary is the input's first line (up to 100 bytes) and the rest is the body.
The receiver runs on a spool and a study database in a temporary folder.

Properties: the answer is one of :data:`ANSWERS` (never 500, never an exception logged as
unexpected); a body refused whole (400, 411, 413, 415) leaves nothing in the spool or the database;
a request with nothing stored (409) leaves no instance file; every instance recorded as stored
is on disk with the data set bytes of its part; no temporary file outlives the request.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fuzz._harness import (
    KnownGap,
    LogWatch,
    OneInput,
    check,
    fuzz_main,
    instrumented,
    quiet_logging,
    tolerating,
)

with instrumented("dicom_node", "multipart", "pydicom"):
    from dicom_node.spool import Spool, dataset_offset
    from dicom_node.stow import StowReceiver
    from studydb.records import InstanceRecord
    from studydb.store import StudyStore

#: the statuses a STOW-RS request may get here (the spool never runs full, the route is valid)
ANSWERS = frozenset({200, 202, 400, 409, 411, 413, 415})
REFUSED_WHOLE = frozenset({400, 411, 413, 415})
#: the largest body the receiver takes (small, so that inputs can cross it)
MAX_BYTES = 32 * 1024
STUDY = "1.2.826.0.1.3680043.8.498.10"
ROUTES = ("/dicom-web/studies", f"/dicom-web/studies/{STUDY}")
#: none: the failures found so far are fixed (their inputs are in fuzz/regressions/stow)
KNOWN_GAPS: tuple[KnownGap, ...] = ()


class _Recording:
    """The study store, remembering what the receiver recorded during one request."""

    def __init__(self, store: StudyStore) -> None:
        self.store = store
        self.instances: list[tuple[InstanceRecord, str]] = []
        self.rejections = 0

    def record_instance(self, record: InstanceRecord, *, outcome: str) -> str:
        recorded = self.store.record_instance(record, outcome=outcome)
        self.instances.append((record, recorded))
        return recorded

    def record_rejection(self, **kwargs: Any) -> None:
        self.store.record_rejection(**kwargs)
        self.rejections += 1


def request_of(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """(route, lower-case headers, body) of an input."""
    flags = data[0] if data else 0
    first, _, body = data[1:].partition(b"\n")
    boundary = first[:100].rstrip(b"\r").decode("latin-1")
    if flags & 2:
        boundary = '"' + boundary.replace("\\", "\\\\").replace('"', '\\"') + '"'
    headers = {"content-type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    if flags & 4:
        headers["transfer-encoding"] = "chunked"
    elif flags & 8:  # the Content-Length header as the client wrote it (a second line)
        length, _, body = body.partition(b"\n")
        headers["content-length"] = length[:40].decode("latin-1")
    else:
        headers["content-length"] = str(len(body))
    return ROUTES[flags & 1], headers, body


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _clear(spool: Spool) -> None:
    for folder in (spool.instances_dir, spool.conflicts_dir):
        for child in folder.iterdir():
            shutil.rmtree(child)


def one_input_with(spool: Spool, store: StudyStore, watch: LogWatch) -> OneInput:

    def one_input(data: bytes) -> None:
        route, headers, body = request_of(data)
        _clear(spool)
        recording = _Recording(store)
        receiver = StowReceiver(spool, recording, ledger=store, max_bytes=MAX_BYTES)
        status, content_type, answer = receiver(
            "POST", route, headers, io.BytesIO(body), "127.0.0.1", "fuzz"
        )
        watch.raise_found()
        check(status in ANSWERS, f"answered {status}: {answer[:300]!r}")
        reply = json.loads(answer)
        check(isinstance(reply, dict), f"the answer is not a JSON object: {answer[:300]!r}")
        check(not _files(spool.tmp_dir), f"left in tmp/: {_files(spool.tmp_dir)}")
        stored = _files(spool.instances_dir) + _files(spool.conflicts_dir)
        if status in REFUSED_WHOLE:
            check(not stored, f"{status}, but kept {stored}")
            check(not recording.instances, f"{status}, but recorded instances")
            check(not recording.rejections, f"{status}, but recorded rejections")
            return
        check(content_type == "application/dicom+json", f"store response as {content_type}")
        referenced = reply.get("00081199", {}).get("Value", [])
        check(
            len(referenced) == len(recording.instances),
            f"{len(referenced)} referenced, {len(recording.instances)} recorded",
        )
        if status == 409:
            check(not stored, f"nothing stored, but kept {stored}")
        for record, outcome in recording.instances:
            _check_on_disk(record, outcome, body)

    return one_input


def _check_on_disk(record: InstanceRecord, outcome: str, body: bytes) -> None:
    path = Path(record.path)
    check(path.is_file(), f"{outcome} instance {record.sop_instance_uid!r} not on disk")
    content = path.read_bytes()
    dataset = content[dataset_offset(content[:144]) :]
    check(hashlib.sha256(dataset).hexdigest() == record.sha256, f"{path.name}: hash differs")
    check(dataset in body, f"{path.name}: the data set on disk is not the part's bytes")


@contextlib.contextmanager
def harness() -> Iterator[OneInput]:
    quiet_logging()
    with tempfile.TemporaryDirectory(prefix="d2r-fuzz-stow-") as tmp:
        store = StudyStore(f"sqlite:///{Path(tmp) / 'd2r.db'}")
        try:
            with LogWatch("dicom_node") as watch:
                spool = Spool(Path(tmp) / "spool")
                yield tolerating(one_input_with(spool, store, watch), KNOWN_GAPS)
        finally:
            store.close()


if __name__ == "__main__":
    fuzz_main(harness)
