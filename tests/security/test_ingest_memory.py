"""What one hostile request or association can make the node hold in memory.

The node runs in a process of its own (:mod:`tests.security.ingest_node`, default settings);
each case resets the process's peak resident set (``/proc/PID/clear_refs``), sends over a real
socket, and compares the peak (``VmHWM``) with the resident set before. A data set is
:data:`SIZE` bytes; the node may grow by at most :data:`LIMIT`, half of it, while receiving
one: a path that held the data set in memory even once would cross it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dsutils import encode

from d2r_core import statuses
from tests.security.ingest_node import AE_TITLE
from tests.security.listener import store_statuses, storescu
from tests.support.dicom_files import make_dx
from tests.support.processes import REPO, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIB = 1024 * 1024
#: size of the pixel data of one large instance (``D2R_TEST_INGEST_MIB`` overrides it)
SIZE = int(os.environ.get("D2R_TEST_INGEST_MIB", "128")) * MIB
#: growth of the node's peak resident set allowed while it receives one of them
LIMIT = SIZE // 2
VERIFICATION = "1.2.840.10008.1.1"
BOUNDARY = "d2r-memory-boundary"


@dataclass
class Node:
    pid: int
    dicom: int
    http: int
    folder: Path

    def spooled(self, study_uid: str) -> list[Path]:
        return sorted((self.folder / "spool" / "instances" / study_uid).glob("*.dcm"))

    def quarantined(self, study_uid: str) -> list[Path]:
        return sorted((self.folder / "spool" / "conflicts" / study_uid).glob("*.dcm"))

    def tmp(self) -> list[Path]:
        return sorted((self.folder / "spool" / "tmp").iterdir())


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@contextmanager
def peak_growth(node: Node) -> Iterator[list[int]]:
    """Yield a list that holds, after the block, how far the peak resident set rose in it."""
    Path(f"/proc/{node.pid}/clear_refs").write_text("5")  # the peak restarts from now
    before = _kib(node.pid, "VmHWM")
    growth: list[int] = []
    yield growth
    growth.append(_kib(node.pid, "VmHWM") - before)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    folder = tmp_path_factory.mktemp("ingest-node")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.security.ingest_node", str(folder)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ports = json.loads(proc.stdout.readline())
        yield Node(proc.pid, ports["dicom"], ports["http"], folder)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder / "spool", ignore_errors=True)


def large_instance(path: Path, *, study_uid: str, sop_uid: str, fill: int) -> Path:
    """A PS3.10 DX file whose pixel data is :data:`SIZE` bytes of ``fill``, written in pieces."""
    ds = make_dx(None, study_uid=study_uid, sop_uid=sop_uid, rows=16, cols=16)
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    block = bytes([fill]) * MIB
    with path.open("wb") as f:
        f.write(buf.getvalue())
        f.write(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", SIZE))
        for _ in range(SIZE // MIB):
            f.write(block)
    return path


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("large")
    study_uid, resent_uid, posted_uid = generate_uid(), generate_uid(), generate_uid()
    yield {
        "study": study_uid,
        "first": large_instance(folder / "a.dcm", study_uid=study_uid, sop_uid=resent_uid, fill=1),
        "other": large_instance(folder / "b.dcm", study_uid=study_uid, sop_uid=resent_uid, fill=2),
        "posted": large_instance(folder / "c.dcm", study_uid=study_uid, sop_uid=posted_uid, fill=3),
        "posted_uid": posted_uid,
    }
    shutil.rmtree(folder)  # hundreds of MiB: not kept for the next runs


def c_store(node: Node, path: Path) -> list[int]:
    return store_statuses(storescu(node.dicom, path, aec=AE_TITLE))


def stow(node: Node, path: Path) -> requests.Response:
    """POST one file as a one-part STOW-RS request, streamed (chunked) from the disk."""

    def body() -> Iterator[bytes]:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with path.open("rb") as f:
            while chunk := f.read(MIB):
                yield chunk
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    return requests.post(
        f"http://127.0.0.1:{node.http}/dicom-web/studies",
        data=body(),
        headers={"Content-Type": content_type},
        timeout=120,
    )


def test_a_re_sent_c_store_is_compared_without_holding_it(
    node: Node, instances: dict[str, Any]
) -> None:
    study_uid = instances["study"]
    assert c_store(node, instances["first"]) == [statuses.SUCCESS]
    (first,) = node.spooled(study_uid)
    stored = first.read_bytes()[-16:]
    with peak_growth(node) as resend:
        assert c_store(node, instances["first"]) == [statuses.SUCCESS]  # identical: duplicate
    assert node.spooled(study_uid) == [first] and node.quarantined(study_uid) == []
    with peak_growth(node) as conflict:
        assert c_store(node, instances["other"]) == [statuses.SUCCESS]  # different: quarantined
    assert node.spooled(study_uid) == [first] and first.read_bytes()[-16:] == stored
    (quarantined,) = node.quarantined(study_uid)
    assert quarantined.read_bytes()[-16:] == bytes([2]) * 16
    assert node.tmp() == []
    assert resend[0] < LIMIT, f"re-send: +{resend[0] / MIB:.0f} MiB for {SIZE / MIB:.0f} MiB"
    assert conflict[0] < LIMIT, f"conflict: +{conflict[0] / MIB:.0f} MiB"


def test_a_stow_rs_part_streams_to_the_spool(node: Node, instances: dict[str, Any]) -> None:
    small = make_dx(None)
    small_path = node.folder / "small.dcm"
    small.save_as(small_path, enforce_file_format=True)
    assert stow(node, small_path).status_code == 200  # the first request of the process
    with peak_growth(node) as stored:
        rsp = stow(node, instances["posted"])
    assert rsp.status_code == 200, rsp.text
    (posted,) = [p for p in node.spooled(instances["study"]) if p.stem == instances["posted_uid"]]
    with peak_growth(node) as again:
        assert stow(node, instances["posted"]).status_code == 200  # a duplicate
    assert posted.stat().st_size >= SIZE and node.tmp() == []
    assert stored[0] < LIMIT, f"STOW-RS: +{stored[0] / MIB:.0f} MiB for {SIZE / MIB:.0f} MiB"
    assert again[0] < LIMIT, f"STOW-RS re-send: +{again[0] / MIB:.0f} MiB"


def test_a_deflated_part_is_not_read_whole_to_parse_its_header(node: Node, tmp_path: Path) -> None:
    """File Meta says Deflated; the data set is :data:`SIZE` bytes that do not inflate."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    encoded = DicomBytesIO()
    write_file_meta_info(encoded, meta, enforce_standard=True)
    path = tmp_path / "deflated.dcm"
    with path.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM" + encoded.getvalue())
        for _ in range(SIZE // MIB):
            f.write(b"\x07" * MIB)
    with peak_growth(node) as growth:
        rsp = stow(node, path)
    path.unlink()
    assert rsp.status_code == 409, rsp.text  # its header cannot be read: 0xC000
    assert node.tmp() == []
    assert growth[0] < LIMIT, f"+{growth[0] / MIB:.0f} MiB for {SIZE / MIB:.0f} MiB"


def test_a_pdu_header_claiming_512_mib_closes_the_connection(node: Node) -> None:
    """pynetdicom allocates the length a PDU header claims before any of it arrives."""
    with peak_growth(node) as growth, socket.create_connection(("127.0.0.1", node.dicom)) as s:
        s.settimeout(5)
        s.sendall(struct.pack(">BBL", 0x01, 0, 512 * MIB))  # an A-ASSOCIATE-RQ, 512 MiB long
        assert s.recv(1) == b""  # closed, not waiting for the rest
    assert growth[0] < 64 * MIB, f"+{growth[0] / MIB:.0f} MiB"


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV (PS3.8 9.3.5)."""
    pdv = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def echo_command(*, data_set: bool) -> bytes:
    cmd = Dataset()
    cmd.AffectedSOPClassUID = VERIFICATION
    cmd.CommandField = 0x0030  # C-ECHO-RQ
    cmd.MessageID = 1
    cmd.CommandDataSetType = 0x0001 if data_set else 0x0101
    body = encode(cmd, True, True)
    assert body is not None
    group = Dataset()
    group.CommandGroupLength = len(body)
    head = encode(group, True, True)
    assert head is not None
    return head + body


@contextmanager
def association(node: Node) -> Iterator[Any]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", node.dicom, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.abort()


@pytest.mark.parametrize("flood", ["command set", "data set of a C-ECHO"])
def test_a_message_that_never_ends_aborts_the_association(node: Node, flood: str) -> None:
    """Fragments pynetdicom would gather in memory without end: 2 MiB of them get an A-ABORT."""
    fragment = b"\x00" * (60 * 1024)
    with association(node) as assoc:
        context_id = assoc.accepted_contexts[0].context_id
        if flood == "command set":
            pdus = [p_data(context_id, 0x01, fragment)] * 34  # command, never the last
        else:
            pdus = [p_data(context_id, 0x03, echo_command(data_set=True))]
            pdus += [p_data(context_id, 0x00, fragment)] * 34  # data set, never the last
        with peak_growth(node) as growth:
            try:
                for pdu in pdus:
                    assoc.dul.socket.send(pdu)
                    time.sleep(0.01)
            except OSError:
                pass  # the node closed the connection first
            wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 10, "an A-ABORT")
    assert growth[0] < 64 * MIB
    # the node still serves
    with association(node) as assoc:
        assert assoc.send_c_echo().Status == statuses.SUCCESS
