"""Several active nodes on one study database: instances and associations recorded per node,
a dead node's associations expired, reconciler steps won by one node, duty leases, the spool
check, database outages and the single-node lock of SQLite (on SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from d2r_core.errors import ConfigError
from dicom_node.assembler import (
    SPOOL_RECOVERED,
    SPOOL_UNRECORDED,
    UNRECORDED_GRACE_SECONDS,
    Assembler,
    AssemblerConfig,
)
from dicom_node.spool import Spool, dataset_offset
from studydb.engine import hold_single_node_lock, transient_database_error
from studydb.errors import DatabaseUnavailable
from studydb.ingest import NodeRecorder
from studydb.store import StudyStore
from tests.dicom_node.conftest import instance_row
from tests.support.dicom_files import make_dx
from tests.support.postgres import private_postgres_server
from tests.support.processes import (
    Process,
    base_env,
    d2r_cmd,
    free_port,
    run_d2r,
    wait_for,
    wait_port,
)


def test_instances_record_the_node_that_received_them(store: StudyStore) -> None:
    a = NodeRecorder(store, "node-a", wait_seconds=0)
    b = NodeRecorder(store, "node-b", wait_seconds=0)
    assert a.record_instance(instance_row("1.2", "1.2.1"), outcome="stored") == "stored"
    assert b.record_instance(instance_row("1.2", "1.2.2"), outcome="stored") == "stored"
    assert [i.received_by for i in store.instances("1.2")] == ["node-a", "node-b"]
    view = store.get("1.2")
    assert view is not None and view.received_by == (("node-a", 1), ("node-b", 1))


def test_a_duplicate_without_a_row_is_recorded_as_stored(store: StudyStore) -> None:
    """The spool held the file of a refused request: the database decides, not the spool."""
    assert store.record_instance(instance_row("1.2", "1.2.1"), outcome="duplicate") == "stored"
    assert [i.sop_instance_uid for i in store.instances("1.2")] == ["1.2.1"]
    assert "recorded-late" in [e.kind for e in store.events("1.2")]
    # from now on the same instance is a duplicate of the recorded one
    assert store.record_instance(instance_row("1.2", "1.2.1"), outcome="duplicate") == "duplicate"
    assert len(store.instances("1.2")) == 1


def test_a_conflict_without_a_row_records_the_acknowledged_copy(store: StudyStore) -> None:
    quarantined = replace(instance_row("1.2", "1.2.1"), path="/spool/conflicts/1.2/1.2.1.ab.dcm")
    assert store.record_instance(quarantined, outcome="conflict") == "stored"
    (row,) = store.instances("1.2")
    assert row.path == quarantined.path


def test_a_dead_nodes_open_associations_are_expired_by_a_survivor(store: StudyStore) -> None:
    for node in ("node-a", "node-b"):
        store.register_node(node, host="h", pid=1)
    store.record_instance(instance_row("1.2", "1.2.1", t=time.time() - 1), outcome="stored")
    store.open_association("1.2", node="node-a")  # node-a dies with this association open
    store.open_association("1.2", node="node-b")
    store.close_association(["1.2"], released=True, node="node-b")
    # node-a's association holds the early-completion rule
    rule = {"quiet_seconds": 1e6, "force_seconds": 1e7, "release_grace_seconds": 2.0}
    assert store.due_for_completion(**rule, now=time.time() + 5) == []
    # node-a stops beating; node-b keeps beating
    now = time.time()
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE nodes SET heartbeat_at = :t WHERE name = 'node-a'"), {"t": 0})
    assert store.expire_silent_nodes(expire_seconds=30, now=now) == {"node-a": ["1.2"]}
    assert store.expire_silent_nodes(expire_seconds=30, now=now) == {}
    assert {n.name: n.open_associations for n in store.nodes()} == {"node-a": 0, "node-b": 0}
    assert "association-expired" in [e.kind for e in store.events("1.2")]
    # an expired association counts as aborted, not released: the quiet period is left...
    assert store.due_for_completion(**rule, now=time.time() + 5) == []
    quiet = {**rule, "quiet_seconds": 3.0}
    assert store.due_for_completion(**quiet, now=time.time() + 5) == ["1.2"]
    # ...and the next association's release completes the study: node-a no longer holds it
    store.record_instance(instance_row("1.2", "1.2.2", t=time.time()), outcome="stored")
    store.open_association("1.2", node="node-b")
    store.close_association(["1.2"], released=True, node="node-b")
    assert store.due_for_completion(**rule, now=time.time() + 5) == ["1.2"]
    # node-a's late close (it was only cut off) is not counted twice
    store.close_association(["1.2"], released=True, node="node-a")
    assert store.due_for_completion(**rule, now=time.time() + 5) == ["1.2"]


def test_a_restarted_node_expires_what_its_previous_run_left_open(store: StudyStore) -> None:
    store.register_node("node-a", host="h", pid=1)
    store.record_instance(instance_row("1.2", "1.2.1"), outcome="stored")
    store.open_association("1.2", node="node-a")
    assert store.register_node("node-a", host="h", pid=2) == ["1.2"]
    assert store.nodes()[0].pid == 2 and store.nodes()[0].open_associations == 0


def test_one_node_wins_each_reconciler_step(store: StudyStore) -> None:
    store.record_instance(instance_row("1.2", "1.2.1", t=1000), outcome="stored")
    generation = store.mark_queued("1.2")
    now = time.time() + 600
    assert store.requeue_candidates(requeue_after=300, now=now) == [("1.2", generation)]
    wins = [
        store.touch_queued(
            "1.2", detail="re-sent", generation=generation, requeue_after=300, now=now
        )
        for _ in range(2)
    ]
    assert wins == [True, False]  # the second node finds it re-queued just now


def test_one_node_hands_each_due_delivery_to_the_queue(store: StudyStore) -> None:
    store.record_instance(instance_row("1.2", "1.2.1"), outcome="stored")
    generation = store.mark_queued("1.2")
    assert store.claim("1.2", generation=generation, owner="t1", lease_seconds=30)
    assert store.mark_reported(
        "1.2",
        owner="t1",
        result_paths=["/r/sr.dcm"],
        model_name="m",
        model_version="1",
        findings="",
        impression="",
        lesion_count=0,
        destinations=["pacs"],
    )
    now = time.time() + 600
    assert store.due_deliveries(requeue_after=300, now=now) == [("1.2", "pacs")]
    wins = [
        store.mark_delivery_enqueued("1.2", "pacs", requeue_after=300, now=now) for _ in range(2)
    ]
    assert wins == [True, False]


def test_the_same_job_again_continues_its_attempt(store: StudyStore) -> None:
    """A job put back on the queue after a database outage re-claims without spending one."""
    store.record_instance(instance_row("1.2", "1.2.1"), outcome="stored")
    generation = store.mark_queued("1.2")
    claim = {"generation": generation, "lease_seconds": 30, "max_attempts": 1}
    assert store.claim("1.2", owner="t1", **claim)
    assert store.claim("1.2", owner="t1", **claim)  # the last attempt, same job: still its own
    assert not store.claim("1.2", owner="t2", **claim)
    view = store.get("1.2")
    assert view is not None and view.attempts == 1


def test_a_duty_is_held_by_one_node_until_its_lease_ends(store: StudyStore) -> None:
    assert store.hold_duty("housekeeping", "node-a", seconds=0.5)
    assert not store.hold_duty("housekeeping", "node-b", seconds=0.5)
    assert store.hold_duty("housekeeping", "node-a", seconds=0.5)  # renewed
    time.sleep(0.6)
    assert store.hold_duty("housekeeping", "node-b", seconds=30)
    assert not store.hold_duty("housekeeping", "node-a", seconds=30)


def test_the_spool_check_records_files_without_a_row(store: StudyStore, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    ds = make_dx(tmp_path / "a.dcm", rows=16, cols=16)
    orphan = spool.path_for(ds.StudyInstanceUID, ds.SOPInstanceUID)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes((tmp_path / "a.dcm").read_bytes())
    young = spool.path_for(ds.StudyInstanceUID, "1.2.3.999")
    young.write_bytes((tmp_path / "a.dcm").read_bytes())
    broken = spool.path_for("9.9", "9.9.1")
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not DICOM")
    old = time.time() - UNRECORDED_GRACE_SECONDS - 10
    for path in (orphan, broken):
        os.utime(path, (old, old))
    asm = Assembler(
        store,
        AssemblerConfig(node="node-a"),
        enqueue_report=lambda *a: None,
        enqueue_send=lambda *a: None,
        spool=spool,
    )
    assert asm.check_spool() == (1, 1)
    (row,) = store.instances(ds.StudyInstanceUID)
    assert row.path == str(orphan) and row.received_by == "node-a"
    assert row.sha256 == spool.data_set_sha256(orphan)
    assert SPOOL_RECOVERED in [e.kind for e in store.events(ds.StudyInstanceUID)]
    with store.engine.connect() as conn:
        kinds = [r[0] for r in conn.execute(sa.text("SELECT kind FROM events")).all()]
    assert kinds.count(SPOOL_UNRECORDED) == 1
    assert asm.check_spool() == (0, 0)  # recorded once, reported once


def test_jobs_the_broker_refused_are_sent_on_a_later_tick(store: StudyStore) -> None:
    sent: list[str] = []
    down = [True]

    def enqueue(uid: str, generation: int, images: object) -> None:
        if down[0]:
            raise ConnectionError("broker unreachable")
        sent.append(uid)

    asm = Assembler(
        store,
        AssemblerConfig(quiet_seconds=1, force_seconds=10),
        enqueue_report=enqueue,
        enqueue_send=lambda *a: None,
    )
    store.record_instance(instance_row("1.2", "1.2.1", t=1000), outcome="stored")
    assert asm.complete_due() == ["1.2"] and sent == []  # queued in the database, job kept
    assert store.get("1.2").state == "queued"  # type: ignore[union-attr]
    assert asm.resend_unsent() == 0
    down[0] = False
    assert asm.resend_unsent() == 1 and sent == ["1.2"]


def test_a_new_broker_gets_every_queued_job_again(store: StudyStore) -> None:
    sent: list[str] = []
    identity = ["run-1"]
    asm = Assembler(
        store,
        AssemblerConfig(quiet_seconds=1, force_seconds=10, requeue_after=300),
        enqueue_report=lambda uid, generation, images: sent.append(uid),
        enqueue_send=lambda *a: None,
        broker_identity=lambda: identity[0],
    )
    store.record_instance(instance_row("1.2", "1.2.1", t=1000), outcome="stored")
    assert asm.complete_due() == ["1.2"] and sent == ["1.2"]
    assert not asm.check_broker()  # the first identity seen
    assert not asm.check_broker()
    identity[0] = "run-2"  # the broker restarted or failed over: its messages may be gone
    assert asm.check_broker()
    assert sent == ["1.2", "1.2"]


def test_sqlite_takes_one_node(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd2r.db'}"
    held = hold_single_node_lock(url)
    assert held is not None
    with pytest.raises(ConfigError, match="D2R_DATABASE_URL.*PostgreSQL"):
        hold_single_node_lock(url)
    held.close()
    again = hold_single_node_lock(url)  # the first node stopped
    assert again is not None
    again.close()
    assert hold_single_node_lock("postgresql+psycopg://u@h/d") is None


def test_a_database_outage_is_retried_then_reported() -> None:
    """Calls wait out a restart within their budget; beyond it they raise, nothing written."""
    with private_postgres_server() as server:
        store = StudyStore(server.url, retry_seconds=30)
        try:
            store.record_instance(instance_row("1.2", "1.2.1"), outcome="stored")
            server.stop(mode="fast")
            began = time.monotonic()
            with store.retry_budget(1.0), pytest.raises(DatabaseUnavailable):
                store.record_instance(instance_row("1.2", "1.2.2"), outcome="stored")
            assert time.monotonic() - began < 10
            # down for 2 s under a call with the whole budget: the call succeeds
            timer = threading.Timer(2.0, server.start)
            timer.start()
            assert store.record_instance(instance_row("1.2", "1.2.3"), outcome="stored") == "stored"
            timer.join()
            assert [i.sop_instance_uid for i in store.instances("1.2")] == ["1.2.1", "1.2.3"]
        finally:
            store.close()


def test_only_connection_errors_are_retried() -> None:
    class PgError(Exception):
        def __init__(self, sqlstate: str | None) -> None:
            super().__init__("x")
            self.sqlstate = sqlstate

    def wrapped(orig: Exception) -> sa.exc.OperationalError:
        return sa.exc.OperationalError("SELECT 1", {}, orig)

    assert transient_database_error(wrapped(PgError(None)))  # refused, reset, closed
    assert transient_database_error(wrapped(PgError("57P01")))  # admin shutdown
    assert transient_database_error(wrapped(PgError("08006")))  # connection failure
    assert not transient_database_error(wrapped(PgError("42P01")))  # undefined table
    assert not transient_database_error(sa.exc.IntegrityError("INSERT", {}, PgError("23505")))
    assert not transient_database_error(ValueError("x"))


def test_two_nodes_on_one_spool_publish_one_first_copy(tmp_path: Path) -> None:
    """Two spools on one folder (two nodes; their in-process locks do not see each other)
    storing one SOP Instance at once: one first copy, the other a duplicate or a conflict."""
    ds = make_dx(tmp_path / "a.dcm", rows=16, cols=16)
    raw = (tmp_path / "a.dcm").read_bytes()
    data = raw[dataset_offset(raw[:144]) :]
    other = data[:-1] + bytes([data[-1] ^ 0xFF])
    for second, expected in ((data, {"stored", "duplicate"}), (other, {"stored", "conflict"})):
        root = tmp_path / f"spool-{len(expected)}-{second is data}"
        spools = [Spool(root), Spool(root)]
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def store(
            spool: Spool, payload: bytes, barrier: threading.Barrier, outcomes: list[str]
        ) -> None:
            barrier.wait()
            outcomes.append(
                spool.store(
                    study_instance_uid=ds.StudyInstanceUID,
                    sop_instance_uid=ds.SOPInstanceUID,
                    file_meta=ds.file_meta,
                    dataset=payload,
                ).outcome
            )

        threads = [
            threading.Thread(target=store, args=(spools[0], data, barrier, outcomes)),
            threading.Thread(target=store, args=(spools[1], second, barrier, outcomes)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(outcomes) == expected
        first = spools[0].path_for(ds.StudyInstanceUID, ds.SOPInstanceUID)
        assert spools[0].data_set_sha256(first) in {
            hashlib.sha256(data).hexdigest(),
            hashlib.sha256(second).hexdigest(),
        }
        assert list(spools[0].tmp_dir.iterdir()) == []


@pytest.mark.integration
def test_a_second_node_on_one_sqlite_database_is_refused_with_one_line(tmp_path: Path) -> None:
    env = base_env(
        D2R_SPOOL_DIR=str(tmp_path / "data" / "spool"),
        D2R_BROKER_URL="filesystem://",
        D2R_HTTP_PORT="0",
        D2R_HOST="127.0.0.1",
        D2R_NODE_NAME="node-a",
    )
    port = free_port()
    first = Process(d2r_cmd("node"), env={**env, "D2R_PORT": str(port)}, log=tmp_path / "a.log")
    try:
        wait_port(port, timeout=60)
        second = run_d2r("node", env={**env, "D2R_PORT": str(free_port()), "D2R_NODE_NAME": "b"})
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "D2R_DATABASE_URL" in lines[0] and "PostgreSQL" in lines[0]
        listing = wait_for(
            lambda: (
                (out := run_d2r("status", "--nodes", env=env)).returncode == 0
                and "node-a" in out.stdout
                and out
            ),
            timeout=30,
            what="node-a in d2r status --nodes",
        )
        (row,) = [line for line in listing.stdout.splitlines() if line.startswith("node-a")]
        assert "alive" in row
    finally:
        first.stop()


@pytest.mark.integration
def test_status_shows_which_node_received_each_instance(tmp_path: Path) -> None:
    spool_dir = tmp_path / "data" / "spool"
    store = StudyStore(f"sqlite:///{tmp_path / 'data' / 'd2r.db'}")
    try:
        NodeRecorder(store, "node-a", wait_seconds=0).record_instance(
            instance_row("1.2", "1.2.1"), outcome="stored"
        )
        NodeRecorder(store, "node-b", wait_seconds=0).record_instance(
            instance_row("1.2", "1.2.2", view="LL"), outcome="stored"
        )
    finally:
        store.close()
    env = base_env(D2R_SPOOL_DIR=str(spool_dir))
    shown = run_d2r("status", "1.2", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "received by node-a: 1, node-b: 1" in shown.stdout
    rows = [line.split() for line in shown.stdout.splitlines() if line.strip().endswith("1.2.2")]
    assert rows and "node-b" in rows[0] and "LL" in rows[0]
    listing = run_d2r("status", env=env)
    assert "node-a,node-b" in listing.stdout


def test_after_a_broker_incident_the_reconciler_looks_sooner(store: StudyStore) -> None:
    """A failover's losses may show only later (a demoted master resyncs): for a while after
    any broker incident, jobs queued a minute are re-sent, not only after ``requeue_after``."""
    sent: list[str] = []
    reachable = [True]

    def identity() -> str:
        if not reachable[0]:
            raise ConnectionError("broker unreachable")
        return "run-1"

    def build() -> Assembler:
        return Assembler(
            store,
            AssemblerConfig(quiet_seconds=1, force_seconds=10, requeue_after=3600),
            enqueue_report=lambda uid, generation, images: sent.append(uid),
            enqueue_send=lambda *a: None,
            broker_identity=identity,
        )

    store.record_instance(instance_row("1.2", "1.2.1", t=1000), outcome="stored")
    store.mark_queued("1.2")
    with store.engine.begin() as conn:  # queued two minutes ago; its message lost
        conn.execute(sa.text("UPDATE studies SET queued_at = :t"), {"t": time.time() - 120})
    build().tick()
    assert sent == []  # no incident: the reconciler waits requeue_after (an hour)
    reachable[0] = False
    build().tick()
    assert sent == ["1.2"]


def test_a_node_name_still_alive_elsewhere_is_warned_about(
    store: StudyStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.register_node("node-a", host="other-host", pid=1)
    asm = Assembler(
        store,
        AssemblerConfig(node="node-a"),
        enqueue_report=lambda *a: None,
        enqueue_send=lambda *a: None,
    )
    asm.register()
    assert "give each node its own D2R_NODE_NAME" in caplog.text
    caplog.clear()
    asm.register()  # this process again: a restart, not another node
    assert "D2R_NODE_NAME" not in caplog.text


def test_associations_opened_after_the_start_is_recorded_are_not_expired_by_it(
    store: StudyStore,
) -> None:
    """The node records its start before its listeners accept associations; the assembler
    thread that starts later does not record it again, so this run's open associations stay
    counted."""
    store.register_node("node-a", host="h", pid=1)  # a previous run
    store.record_instance(instance_row("1.2", "1.2.1"), outcome="stored")
    store.open_association("1.2", node="node-a")  # left open by that run
    asm = Assembler(
        store,
        AssemblerConfig(node="node-a"),
        enqueue_report=lambda *a: None,
        enqueue_send=lambda *a: None,
    )
    asm.record_start()
    assert store.nodes()[0].open_associations == 0  # the previous run's, expired
    store.record_instance(instance_row("1.3", "1.3.1"), outcome="stored")
    store.open_association("1.3", node="node-a")  # this run's, after the listeners started
    asm.record_start()  # what the assembler thread does first
    assert store.nodes()[0].open_associations == 1
