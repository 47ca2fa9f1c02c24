"""Associations kept between studies, against a real DICOM peer (a pynetdicom storage SCP)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from d2r_core import statuses
from delivery import dimse
from delivery.destinations import DicomPeer, StudyResults
from delivery.dimse import AssociationPool, DicomDestination, SendOptions, send_datasets
from delivery.errors import TransientSendError
from tests.delivery.test_dimse_integration import FAST, STORESCP, _wait_port, basic_text_sr
from tests.dicom_node.node_harness import free_port

pytestmark = pytest.mark.integration


@dataclass
class Peer:
    """A storage SCP that records the associations it accepted and what it stored."""

    server: ThreadedAssociationServer
    destination: DicomPeer
    associations: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    stored: list[tuple[int, str, str, bytes]] = field(default_factory=list)

    def wait_for(self, check: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError("the peer never got there")
            time.sleep(0.02)


def _start(transfer_syntaxes: list[str]) -> Peer:
    ae = AE(ae_title="PACS")
    ae.add_supported_context(BasicTextSRStorage, transfer_syntaxes)
    lock = threading.Lock()
    peer: Peer | None = None

    def on_accepted(event: Any) -> None:
        with lock:
            assert peer is not None
            peer.associations.append(id(event.assoc))

    def on_released(event: Any) -> None:
        with lock:
            assert peer is not None
            peer.released.append(id(event.assoc))

    def on_store(event: Any) -> int:
        with lock:
            assert peer is not None
            peer.stored.append(
                (
                    id(event.assoc),
                    str(event.request.AffectedSOPInstanceUID),
                    str(event.context.transfer_syntax),
                    event.request.DataSet.getvalue(),
                )
            )
        return 0x0000

    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[
            (evt.EVT_ACCEPTED, on_accepted),
            (evt.EVT_RELEASED, on_released),
            (evt.EVT_C_STORE, on_store),
        ],
    )
    assert server is not None
    peer = Peer(server, DicomPeer("PACS", "127.0.0.1", server.server_address[1]))
    return peer


@pytest.fixture
def peer() -> Iterator[Peer]:
    started = _start([ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    try:
        yield started
    finally:
        started.server.shutdown()


@pytest.fixture
def pool() -> Iterator[AssociationPool]:
    made = AssociationPool(idle_seconds=30)
    try:
        yield made
    finally:
        made.close()


def test_the_next_study_reuses_the_association(peer: Peer, pool: AssociationPool) -> None:
    first = [basic_text_sr("first"), basic_text_sr("first, text")]
    second = [basic_text_sr("second")]
    assert send_datasets(first, peer.destination, ae_title="D2R", options=FAST, pool=pool) == [
        statuses.SUCCESS,
        statuses.SUCCESS,
    ]
    assert send_datasets(second, peer.destination, ae_title="D2R", options=FAST, pool=pool) == [
        statuses.SUCCESS
    ]
    assert len(peer.associations) == 1 and pool.opened == 1
    assert [uid for _, uid, _, _ in peer.stored] == [
        str(ds.SOPInstanceUID) for ds in [*first, *second]
    ]
    assert pool.idle() == 1
    pool.close()
    peer.wait_for(lambda: peer.released == peer.associations)


def test_an_association_the_peer_dropped_is_reopened(peer: Peer, pool: AssociationPool) -> None:
    send_datasets([basic_text_sr("a")], peer.destination, ae_title="D2R", options=FAST, pool=pool)
    for assoc in list(peer.server.active_associations):
        assoc.abort()  # the PACS ends the idle association
    peer.wait_for(lambda: not peer.server.active_associations)
    report = basic_text_sr("b")
    assert send_datasets([report], peer.destination, ae_title="D2R", options=FAST, pool=pool) == [
        statuses.SUCCESS
    ]
    assert len(peer.associations) == 2 and pool.opened == 2
    assert peer.stored[-1][1] == str(report.SOPInstanceUID)


def test_a_destination_killed_while_idle_is_a_transient_failure(
    pool: AssociationPool, tmp_path: Path
) -> None:
    if not STORESCP.exists():
        pytest.skip("dcmtk storescp is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [str(STORESCP), "-od", str(tmp_path), "-aet", "PACS", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc)
        destination = DicomPeer("PACS", "127.0.0.1", port)
        send_datasets([basic_text_sr()], destination, ae_title="D2R", options=FAST, pool=pool)
        assert pool.idle() == 1
    finally:
        proc.kill()  # the PACS dies: the parked association and the port go
        proc.wait(timeout=10)
    with pytest.raises(TransientSendError, match="PACS@127.0.0.1"):
        send_datasets([basic_text_sr()], destination, ae_title="D2R", options=FAST, pool=pool)
    assert pool.idle() == 0


def test_an_idle_association_is_released(peer: Peer) -> None:
    pool = AssociationPool(idle_seconds=0.2)
    send_datasets([basic_text_sr()], peer.destination, ae_title="D2R", options=FAST, pool=pool)
    peer.wait_for(lambda: peer.released == peer.associations and pool.idle() == 0)
    send_datasets([basic_text_sr()], peer.destination, ae_title="D2R", options=FAST, pool=pool)
    assert pool.opened == 2
    pool.close()


def test_without_idle_time_each_send_has_its_own_association(peer: Peer) -> None:
    pool = AssociationPool(idle_seconds=0)
    for text in ("a", "b"):
        send_datasets(
            [basic_text_sr(text)], peer.destination, ae_title="D2R", options=FAST, pool=pool
        )
    assert len(peer.associations) == 2 and pool.idle() == 0
    peer.wait_for(lambda: peer.released == peer.associations)


def _written(tmp_path: Path, text: str) -> tuple[pydicom.Dataset, Path]:
    ds = basic_text_sr(text)
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path), path


def test_report_files_are_sent_as_written(
    peer: Peer, pool: AssociationPool, tmp_path: Path
) -> None:
    ds, path = _written(tmp_path, "from the results folder")
    sender = DicomDestination(peer.destination, "D2R", FAST, pool=pool)
    sender.send(StudyResults(str(ds.StudyInstanceUID), (ds,), files=(str(path),)))
    _, uid, syntax, data = peer.stored[0]
    assert uid == str(ds.SOPInstanceUID) and syntax == ExplicitVRLittleEndian
    assert path.read_bytes().endswith(data)  # the data set bytes of the file, unchanged


def test_a_peer_without_the_files_transfer_syntax_gets_it_converted(tmp_path: Path) -> None:
    implicit_only = _start([ImplicitVRLittleEndian])
    try:
        ds, path = _written(tmp_path, "converted")
        send_datasets([ds], implicit_only.destination, ae_title="D2R", options=FAST, files=[path])
        _, uid, syntax, data = implicit_only.stored[0]
        assert uid == str(ds.SOPInstanceUID) and syntax == ImplicitVRLittleEndian
        assert not path.read_bytes().endswith(data)
    finally:
        implicit_only.server.shutdown()


def test_many_studies_in_a_row_over_one_association(peer: Peer) -> None:
    """Each study takes the parked association and gives it back: every response reaches
    its request (none is taken by the association's resumed reactor), also while another
    thread keeps the interpreter busy (as the model does in the worker)."""
    pool = AssociationPool(idle_seconds=30)
    quick = SendOptions(acse_timeout=5, dimse_timeout=3, network_timeout=10)
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(range(10_000))

    spinner = threading.Thread(target=busy, daemon=True)
    spinner.start()
    try:
        for n in range(25):
            reports = [basic_text_sr(f"study {n}"), basic_text_sr(f"study {n}, text")]
            assert send_datasets(
                reports, peer.destination, ae_title="D2R", options=quick, pool=pool
            ) == [statuses.SUCCESS, statuses.SUCCESS], n
    finally:
        stop.set()
        spinner.join()
        pool.close()
    assert len(peer.stored) == 50 and pool.opened == 1


def _parked_poll_delays(pool: AssociationPool) -> list[float]:
    """How often each parked association's connection is polled (seconds)."""
    with pool._lock:
        return [assoc.dul._run_loop_delay for assoc, _ in pool._idle.values()]


def test_a_parked_association_stays_quick_for_a_burst_then_cools(
    peer: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next study of a burst finds the connection polled as often as one in use (a
    request waits for the poll to end before it leaves); an association idle for longer is
    polled slowly, and a send over it polls fast again."""
    monkeypatch.setattr(dimse, "_HOT_SECONDS", 0.3)
    pool = AssociationPool(idle_seconds=30)
    try:
        send_datasets([basic_text_sr()], peer.destination, ae_title="D2R", options=FAST, pool=pool)
        assert _parked_poll_delays(pool) == [dimse._ACTIVE_POLL_SECONDS]
        peer.wait_for(lambda: _parked_poll_delays(pool) == [dimse._PARKED_POLL_SECONDS])
        assert send_datasets(
            [basic_text_sr("after a lull")],
            peer.destination,
            ae_title="D2R",
            options=FAST,
            pool=pool,
        ) == [statuses.SUCCESS]
        assert _parked_poll_delays(pool) == [dimse._ACTIVE_POLL_SECONDS]
        assert pool.opened == 1 and len(peer.stored) == 2
    finally:
        pool.close()
