"""Fuzz target: the C-STORE path from P-DATA to the spool, over a real socket.

A listener is started once per process as ``d2r node`` starts it
(:func:`cli.runtime.start_listener`: the study database a real SQLite file, the spool a real
folder, audit and metrics wired). Each input opens an association on loopback (a valid
A-ASSOCIATE-RQ proposing :data:`CONTEXTS`) and then, by its first byte:

* bit 0 clear, **C-STORE**: the rest of the input is the data set of a C-STORE-RQ on the
  context that bits 1-3 pick, framed as P-DATA-TF PDUs, then A-RELEASE-RQ;
* bit 0 set, **raw**: the rest of the input is sent as it is (PDUs, or anything); the
  connection is half-closed once the listener has been silent for :data:`RAW_IDLE_SECONDS`.

Properties: the listener accepts every association (it never dies); it answers or closes the
connection within :data:`HANG_SECONDS`; every instance it acknowledges with Success is in the
spool, with exactly the data set bytes sent (C-STORE mode) or at least a file (raw mode); no
temporary file outlives the association; nothing in the listener logs an unexpected exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
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
from tests.support import upper_layer

with instrumented("dicom_node", "pynetdicom", "pydicom", "cli", "observability"):
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEGBaseline8Bit,
        RLELossless,
    )

    from cli.runtime import start_listener
    from d2r_core import statuses
    from dicom_node.errors import InstanceRejected
    from dicom_node.metadata import parse_header
    from dicom_node.settings import NodeSettings
    from dicom_node.spool import Spool, dataset_offset, safe_name
    from observability.audit import AuditLog, ListenerAudit
    from studydb.store import StudyStore

AE_TITLE = "D2RFUZZ"
CALLING = "FUZZSCU"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
#: the presentation contexts every association proposes: (ID, abstract syntax, transfer syntax)
CONTEXTS = (
    (1, DX, ExplicitVRLittleEndian),
    (3, DX, ImplicitVRLittleEndian),
    (5, CR, ExplicitVRLittleEndian),
    (7, SC, ExplicitVRLittleEndian),
    (9, DX, DeflatedExplicitVRLittleEndian),
    (11, DX, ExplicitVRBigEndian),
    (13, DX, JPEGBaseline8Bit),
    (15, DX, RLELossless),
)
#: seconds the listener has to answer or close after the input was sent
HANG_SECONDS = 10.0
#: raw mode: silence after which the connection is half-closed (the input may be incomplete)
RAW_IDLE_SECONDS = 0.05
#: what the C-STORE-RQ names when the data set gives no usable UIDs
FALLBACK_INSTANCE = "1.2.826.0.1.3680043.8.498.99"
TMP_LEFT = "temporary files outlive the association"
KNOWN_GAPS: tuple[KnownGap, ...] = ()


def _receive_all(sock: socket.socket, *, half_close_after: float | None = None) -> bytes:
    """Everything the listener sends until it closes; with ``half_close_after``, the sending
    side is shut down once the listener has been silent that long (it may wait for more)."""
    deadline = time.monotonic() + HANG_SECONDS
    received = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PropertyViolation(
                f"the listener neither answered nor closed within {HANG_SECONDS:g} s"
            )
        sock.settimeout(left if half_close_after is None else min(left, half_close_after))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if half_close_after is not None:
                half_close_after = None
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
            continue
        except ConnectionResetError:  # an abort may reset: the connection ended
            return bytes(received)
        if not chunk:
            return bytes(received)
        received += chunk


def _associate(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_SECONDS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(upper_layer.associate_rq(AE_TITLE, CALLING, CONTEXTS))
    answer = b""
    while len(answer) < 6 or len(answer) < 6 + int.from_bytes(answer[2:6], "big"):
        try:
            chunk = sock.recv(65536)
        except OSError as exc:
            sock.close()
            raise PropertyViolation(f"the listener did not negotiate: {exc}") from None
        if not chunk:
            break
        answer += chunk
    if answer[:1] != bytes([upper_layer.ASSOCIATE_AC]):
        sock.close()
        raise PropertyViolation(f"the listener refused a valid association: {answer[:16]!r}")
    return sock


class _Node:
    """The listener under test, its spool and its study database."""

    def __init__(self, folder: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        self.settings = NodeSettings.from_env(
            {
                "D2R_AE_TITLE": AE_TITLE,
                "D2R_HOST": "127.0.0.1",
                "D2R_PORT": str(port),
                "D2R_SPOOL_DIR": str(folder / "spool"),
                "D2R_MIN_FREE_BYTES": "0",
                "D2R_ACSE_TIMEOUT": "5",
                "D2R_NETWORK_TIMEOUT": "5",
                "D2R_DIMSE_TIMEOUT": "5",
                "D2R_MAX_ASSOCIATIONS": "32",
            }
        )
        self.store = StudyStore(f"sqlite:///{folder / 'd2r.db'}")
        self.spool = Spool(self.settings.spool_dir, min_free_bytes=0)
        self.audit = AuditLog(folder / "audit.jsonl")
        self.server: Any = start_listener(
            self.settings, self.spool, self.store, ListenerAudit(self.audit), released=lambda: None
        )

    def close(self) -> None:
        self.server.shutdown()
        self.store.close()
        self.audit.close()

    def copies(self, sop_instance_uid: str) -> list[Path]:
        """Every spool file holding a copy of ``sop_instance_uid`` (first copy, conflicts)."""
        name = safe_name(sop_instance_uid)
        return [
            *self.spool.instances_dir.glob(f"*/{name}.dcm"),
            *self.spool.conflicts_dir.glob(f"*/{name}.*.dcm"),
        ]

    def tmp_files(self) -> list[Path]:
        deadline = time.monotonic() + 2.0
        while (left := sorted(self.spool.tmp_dir.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.01)  # the association's close handler may still be running
        return left

    def clear(self) -> None:
        """Empty the spool (each input starts from an empty one)."""
        for folder in (self.spool.instances_dir, self.spool.conflicts_dir, self.spool.tmp_dir):
            for child in folder.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)


def _data_set_hash(path: Path) -> str:
    content = path.read_bytes()
    return hashlib.sha256(content[dataset_offset(content[:144]) :]).hexdigest()


def _affected_instance(dataset: bytes, syntax: str) -> str:
    """The SOP Instance UID the C-STORE-RQ names: the data set's own where it can be read (so
    that a mutated data set can still be stored), else :data:`FALLBACK_INSTANCE`."""
    try:
        header = parse_header(dataset, syntax)
    except InstanceRejected:
        return FALLBACK_INSTANCE
    uid = header.sop_instance_uid
    return uid if uid.isascii() and len(uid) <= 64 else FALLBACK_INSTANCE


def _pynetdicom_refusal(record: logging.LogRecord) -> bool:
    """A traceback pynetdicom logs for input it cannot decode before it aborts or drops the
    association (its DUL and state machine do this), for a connection it closes, or for its own
    PDU-logging handlers: the answer the property asks for, unless the exception was raised in
    the node's own code."""
    if not record.name.startswith("pynetdicom.") or not record.exc_info:
        return False
    if isinstance(record.exc_info[1], OSError):  # the connection closes (the node's PDU limit)
        return True
    frames = traceback.extract_tb(record.exc_info[2])
    return not frames or "site-packages" in frames[-1].filename


def one_input_with(node: _Node, watch: LogWatch) -> OneInput:
    message_ids = itertools.count(1)

    def one_input(data: bytes) -> None:
        if not data:
            return
        raw = bool(data[0] & 1)
        context_id, abstract, syntax = CONTEXTS[(data[0] >> 1) % len(CONTEXTS)]
        payload = data[1:]
        sent_hash = None
        with contextlib.closing(_associate(node.settings.port)) as sock:
            if raw:
                with contextlib.suppress(OSError):  # the listener may abort mid-send
                    sock.sendall(payload)
            else:
                instance = _affected_instance(payload, syntax)
                command = upper_layer.c_store_rq(next(message_ids), abstract, instance)
                sent_hash = hashlib.sha256(payload).hexdigest()
                with contextlib.suppress(OSError):
                    sock.sendall(
                        upper_layer.p_data(context_id, command, command=True)
                        + upper_layer.p_data(context_id, payload, command=False)
                        + upper_layer.release_rq()
                    )
            answer = _receive_all(sock, half_close_after=RAW_IDLE_SECONDS if raw else None)
        watch.raise_found()
        for response in upper_layer.store_responses(answer):
            if response.status != statuses.SUCCESS:
                continue
            copies = node.copies(response.sop_instance_uid)
            check(copies, f"Success for {response.sop_instance_uid!r}, but no file in the spool")
            if sent_hash is not None:
                hashes = {_data_set_hash(p) for p in copies}
                check(sent_hash in hashes, "Success, but no spool copy holds the bytes sent")
        left = node.tmp_files()
        node.clear()
        check(not left, f"{TMP_LEFT}: {[p.name for p in left]}")

    return one_input


@contextlib.contextmanager
def harness() -> Iterator[OneInput]:
    quiet_logging()
    with tempfile.TemporaryDirectory(prefix="d2r-fuzz-cstore-") as tmp:
        node = _Node(Path(tmp))
        try:
            with LogWatch(
                "dicom_node", "pynetdicom", "cli", "observability", ignore=_pynetdicom_refusal
            ) as watch:
                yield tolerating(one_input_with(node, watch), KNOWN_GAPS)
        finally:
            node.close()


if __name__ == "__main__":
    fuzz_main(harness)
