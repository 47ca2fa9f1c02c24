"""The sender against real peers: dcmtk storescp, a closed port, and our own listener."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

from d2r_core import statuses
from delivery.destinations import DicomPeer
from delivery.dimse import SendOptions, echo, send_datasets
from delivery.errors import PermanentSendError, TransientSendError
from tests.dicom_node.node_harness import Node, free_port

pytestmark = pytest.mark.integration

STORESCP = Path("/usr/bin/storescp")
FAST = SendOptions(acse_timeout=5, dimse_timeout=10, network_timeout=10)


def basic_text_sr(text: str = "No acute cardiopulmonary abnormality.") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "SYNTHETIC^CHEST"
    ds.PatientID = "SYN-000001"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator = "18748-4", "LN"
    title.CodeMeaning = "Diagnostic imaging report"
    ds.ConceptNameCodeSequence = Sequence([title])
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    item.ConceptNameCodeSequence = Sequence([name])
    item.TextValue = text
    ds.ContentSequence = Sequence([item])
    return ds


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "storescp exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"storescp did not listen on {port}")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[DicomPeer, Path]]:
    if not STORESCP.exists():
        pytest.skip("dcmtk storescp is not installed")
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [str(STORESCP), "+B", "-od", str(out), "-aet", "PACS", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc)
        yield DicomPeer("PACS", "127.0.0.1", port), out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_send_sr_to_storescp(storescp: tuple[DicomPeer, Path]) -> None:
    destination, out = storescp
    reports = [basic_text_sr("first"), basic_text_sr("second")]
    result = send_datasets(reports, destination, ae_title="D2R", options=FAST)
    assert result == [statuses.SUCCESS, statuses.SUCCESS]
    received = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in out.iterdir()}
    assert set(received) == {r.SOPInstanceUID for r in reports}
    for report in reports:
        got = received[report.SOPInstanceUID]
        assert got.ContentSequence[0].TextValue == report.ContentSequence[0].TextValue
        assert got.SOPClassUID == BasicTextSRStorage


def test_echo_storescp(storescp: tuple[DicomPeer, Path]) -> None:
    assert echo(storescp[0], ae_title="D2R", options=FAST) == statuses.SUCCESS


def test_closed_port_is_transient() -> None:
    closed = DicomPeer("PACS", "127.0.0.1", free_port())
    with pytest.raises(TransientSendError, match="PACS@127.0.0.1"):
        send_datasets([basic_text_sr()], closed, ae_title="D2R", options=FAST)
    with pytest.raises(TransientSendError):
        echo(closed, ae_title="D2R", options=FAST)


def test_sop_class_not_accepted_is_permanent() -> None:
    """A peer that negotiates no SR storage (here: a CT-only SCP) refuses the context."""
    from pynetdicom import AE

    peer = AE(ae_title="CTONLY")
    peer.add_supported_context("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    server = peer.start_server(("127.0.0.1", 0), block=False)
    assert server is not None
    try:
        port = server.server_address[1]
        destination = DicomPeer("CTONLY", "127.0.0.1", port)
        with pytest.raises(PermanentSendError) as info:
            send_datasets([basic_text_sr()], destination, ae_title="D2R", options=FAST)
        assert info.value.status == statuses.SOP_CLASS_NOT_SUPPORTED
    finally:
        server.shutdown()


def test_rejected_association_is_transient(node: Node) -> None:
    wrong_called_ae = DicomPeer("NOTTHENODE", "127.0.0.1", node.port)
    with pytest.raises(TransientSendError, match="rejected"):
        send_datasets([basic_text_sr()], wrong_called_ae, ae_title="D2R", options=FAST)


def test_failure_status_from_peer_is_permanent(node: Node) -> None:
    # a DX whose data set says it is CR: the listener answers 0xA900
    from tests.support.dicom_files import make_dx

    ds = make_dx(None, rows=16, cols=16)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    destination = DicomPeer(node.settings.ae_title, "127.0.0.1", node.port)
    assert send_datasets([], destination, ae_title="D2R") == []
    ok = make_dx(None, rows=16, cols=16)
    assert send_datasets([ok], destination, ae_title="D2R", options=FAST) == [statuses.SUCCESS]
    assert node.store.outcomes(ok.SOPInstanceUID) == ["stored"]
    del ds.StudyInstanceUID
    with pytest.raises(PermanentSendError) as info:
        send_datasets([ds], destination, ae_title="D2R", options=FAST)
    assert info.value.status == statuses.CANNOT_UNDERSTAND
