"""``d2r node`` with ``D2R_LISTENER_PROCESSES=2``: two processes receive on one port.

Real processes throughout: ``d2r node`` over a private Redis, its listener process, pynetdicom
as the sending modality. Which process serves a connection is read from ``/proc`` (the owner
of the node's end of the TCP connection).
"""

from __future__ import annotations

import os
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

from studydb.records import QUEUED
from studydb.store import StudyStore
from tests.support.dicom_files import make_dx
from tests.support.listener_process import lone_listener_process
from tests.support.processes import (
    REPO,
    Process,
    base_env,
    d2r_cmd,
    free_port,
    start_redis,
    wait_for,
    wait_port,
)

pytestmark = pytest.mark.integration


class Node:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port, self.http_port = free_port(), free_port()
        self.redis, url = start_redis(tmp)
        self.env = base_env(
            D2R_AE_TITLE="D2R",
            D2R_HOST="127.0.0.1",
            D2R_PORT=str(self.port),
            D2R_HTTP_PORT=str(self.http_port),
            D2R_SPOOL_DIR=str(tmp / "data" / "spool"),
            D2R_MIN_FREE_BYTES="0",
            D2R_AUDIT_LOG=str(tmp / "data" / "audit.jsonl"),
            D2R_BROKER_URL=url,
            D2R_MODEL=str(REPO / "models" / "d2r-demo-phantom"),
            D2R_LISTENER_PROCESSES="2",
            # only a released association completes a study in the test's time
            D2R_STUDY_QUIET_SECONDS="600",
            D2R_STUDY_FORCE_SECONDS="900",
            D2R_STUDY_RELEASE_GRACE_SECONDS="0.5",
        )
        self.proc = Process(d2r_cmd("node"), env=self.env, log=tmp / "node.log")
        self.wait_ready()

    def readyz(self) -> int:
        try:
            url = f"http://127.0.0.1:{self.http_port}/readyz"
            with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - loopback
                return int(answer.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def wait_ready(self) -> None:
        wait_port(self.port, timeout=60)
        wait_for(lambda: self.readyz() == 200, 60, "the node's /readyz")

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - loopback
            return str(answer.read().decode())

    def listener_pids(self) -> list[int]:
        """The node's listener processes (children running ``cli.listeners``)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and b"cli.listeners" in cmdline:
                found.append(int(entry.name))
        return found

    def stop(self) -> None:
        self.proc.stop()
        self.redis.stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    running = Node(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def _associate(port: int) -> Association:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", port, ae_title="D2R")
    assert assoc.is_established
    return assoc


def _server_side_owner(node_port: int, client_port: int, pids: list[int]) -> int | None:
    """The process among ``pids`` holding the node's end of the connection from ``client_port``."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == node_port and (
                int(remote.rsplit(":", 1)[1], 16) == client_port
            ):
                inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        if f"socket:[{inode}]" in links:
            return pid
    return None


def _client_port(assoc: Association) -> int:
    transport = assoc.dul.socket
    assert transport is not None and transport.socket is not None
    return int(transport.socket.getsockname()[1])


def _owners(node: Node, held: list[Association]) -> list[int | None]:
    pids = [node.proc.pid, *node.listener_pids()]
    return [_server_side_owner(node.port, _client_port(assoc), pids) for assoc in held]


def test_associations_spread_over_the_listener_processes_and_each_study_completes(
    node: Node, tmp_path: Path
) -> None:
    children = node.listener_pids()
    assert len(children) == 1
    held = [_associate(node.port) for _ in range(4)]
    studies = [generate_uid() for _ in held]
    try:
        owners = _owners(node, held)
        assert set(owners) == {node.proc.pid, children[0]}, owners
        for k, (assoc, study) in enumerate(zip(held, studies, strict=True)):
            ds = make_dx(tmp_path / f"dx{k}.dcm", study_uid=study, seed=k)
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        for assoc in held:
            assoc.release()

    store = StudyStore(f"sqlite:///{tmp_path / 'data' / 'd2r.db'}")  # the node's default
    try:
        # released in either process, each study completes by the grace period, not the quiet one
        def queued() -> bool:
            views = [store.get(uid) for uid in studies]
            return all(v is not None and v.state == QUEUED for v in views)

        wait_for(queued, 60, "all four studies queued after their associations were released")
        assert all(len(store.instances(uid)) == 1 for uid in studies)
    finally:
        store.close()
    # one /metrics counts what every listener process received
    received = [
        float(line.rsplit(" ", 1)[1])
        for line in node.metrics().splitlines()
        if line.startswith("d2r_instances_received_total{")
    ]
    assert sum(received) == 4


def test_a_dead_listener_process_is_restarted_and_the_node_takes_its_processes_along(
    node: Node,
) -> None:
    (first,) = node.listener_pids()
    os.kill(first, signal.SIGKILL)
    states = []

    def restarted() -> bool:
        states.append(node.readyz())
        pids = node.listener_pids()
        return bool(pids) and pids[0] != first and states[-1] == 200

    wait_for(restarted, 60, "a new listener process", interval=0.05)
    assert 503 in states  # not ready while a listener process was down
    log = node.proc.log_tail(20000)
    assert "listener process 2 (pid" in log
    assert "listener-2 d2r: listener process 2 serving" in log  # its own lines carry its name
    (second,) = node.listener_pids()
    held = [_associate(node.port) for _ in range(4)]
    try:
        assert set(_owners(node, held)) == {node.proc.pid, second}
    finally:
        for assoc in held:
            assoc.release()

    # the node stops its listener processes (SIGTERM to the node alone, as systemd's main PID)
    os.kill(node.proc.pid, signal.SIGTERM)
    assert node.proc.proc.wait(60) == 0
    wait_for(lambda: not Path(f"/proc/{second}").exists(), 30, "the listener process to stop")


def test_a_listener_process_stops_when_its_node_dies(node: Node) -> None:
    (child,) = node.listener_pids()
    os.kill(node.proc.pid, signal.SIGKILL)  # the node alone: a crash
    node.proc.proc.wait(10)
    wait_for(lambda: not Path(f"/proc/{child}").exists(), 30, "the orphaned listener to stop")
    # nothing holds the port now: a restarted node can listen on it again
    restarted = Process(d2r_cmd("node"), env=node.env, log=node.tmp / "node2.log")
    try:
        wait_port(node.port, timeout=60)
        wait_for(lambda: node.readyz() == 200, 60, "the restarted node's /readyz")
    finally:
        restarted.stop()


def test_a_listener_process_tells_its_node_when_it_serves_and_when_a_study_was_released(
    tmp_path: Path,
) -> None:
    released = threading.Event()
    study = generate_uid()
    with lone_listener_process(tmp_path, on_released=released.set) as lone:
        assoc = _associate(lone.port)
        assert assoc.send_c_store(make_dx(None, study_uid=study)).Status == 0x0000
        assert not released.is_set()
        assoc.release()
        assert released.wait(30), "no release message from the listener process"
    assert lone.processes.pids() == []
    store = StudyStore(lone.database)
    try:
        assert len(store.instances(study)) == 1
    finally:
        store.close()
