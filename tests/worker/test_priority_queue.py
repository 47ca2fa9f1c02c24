"""Urgent studies first: the order of the queue and of a worker's claims and batches, the
starvation guard under a continuous urgent stream, a priority change while a study is queued,
deliveries, and the order a real Redis broker hands job messages out in."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from d2r_core.priority import Priority, PriorityDecision
from dicom_node.assembler import Assembler, AssemblerConfig
from studydb.store import StudyStore
from tests.dicom_node.conftest import instance_row
from tests.support.processes import start_redis
from worker.celery_app import create_app
from worker.claims import claim_more
from worker.messages import REPORT_QUEUE, REPORT_TASK, broker_priority
from worker.settings import WorkerSettings


def _queue(store: StudyStore, uid: str, priority: Priority = Priority.ROUTINE) -> int:
    """Record one frontal instance of ``uid`` with ``priority`` and queue the study."""
    record = replace(
        instance_row(uid, uid + ".1", t=time.time()),
        priority=PriorityDecision(priority, "test"),
    )
    store.record_instance(record, outcome="stored")
    generation = store.mark_queued(uid)
    assert generation
    return generation


def _settings(**env: str) -> WorkerSettings:
    return WorkerSettings.from_env({"D2R_BATCH_WAIT_MS": "0", **env})


def test_the_queue_serves_the_highest_priority_first_oldest_first_within(
    store: StudyStore,
) -> None:
    for uid, priority in [
        ("9.1", Priority.ROUTINE),
        ("9.2", Priority.LOW),
        ("9.3", Priority.URGENT),
        ("9.4", Priority.ROUTINE),
        ("9.5", Priority.STAT),
        ("9.6", Priority.URGENT),
    ]:
        _queue(store, uid, priority)
    order = [uid for uid, _ in store.queued_studies(limit=10)]
    assert order == ["9.5", "9.3", "9.6", "9.1", "9.4", "9.2"]


def test_a_worker_fills_its_batch_urgent_studies_first(store: StudyStore) -> None:
    for uid, priority in [
        ("8.1", Priority.ROUTINE),
        ("8.2", Priority.ROUTINE),
        ("8.3", Priority.URGENT),
        ("8.4", Priority.STAT),
    ]:
        _queue(store, uid, priority)
    jobs = claim_more(store, _settings(), owner="task-1", want=3, exclude=["8.2"])
    assert [j.study_instance_uid for j in jobs] == ["8.4", "8.3", "8.1"]
    assert {store.get(j.study_instance_uid).state for j in jobs} == {"processing"}  # type: ignore[union-attr]
    # the next batch takes what is left
    jobs = claim_more(store, _settings(), owner="task-2", want=3, exclude=[])
    assert [j.study_instance_uid for j in jobs] == ["8.2"]


def _pick(store: StudyStore, *, now: float, aging: float | None) -> str:
    ((uid, generation),) = store.queued_studies(limit=1, aging_seconds=aging, now=now)
    assert store.claim(uid, generation=generation, owner="w", lease_seconds=60)
    return uid


@pytest.mark.parametrize("aging", [60.0, None])
def test_the_starvation_guard_serves_a_routine_study_within_a_continuous_urgent_stream(
    store: StudyStore, aging: float | None
) -> None:
    _queue(store, "7.0", Priority.ROUTINE)
    start = time.time()
    picks = []
    # every 10 s two urgent studies arrive and one is served: urgent work never runs out
    for k in range(1, 13):
        _queue(store, f"7.{k}.a", Priority.URGENT)
        _queue(store, f"7.{k}.b", Priority.URGENT)
        picks.append(_pick(store, now=start + 10 * k, aging=aging))
    if aging is None:
        assert "7.0" not in picks  # without the guard the routine study waits for ever
        return
    # once it has waited 60 s it counts as urgent, and is the oldest urgent one
    assert picks.index("7.0") == 5
    assert all(p != "7.0" for p in picks[:5])


def test_a_priority_raised_while_queued_sends_the_job_again_once(store: StudyStore) -> None:
    sent: list[tuple[str, Priority]] = []
    clock: list[float | None] = [None]

    def enqueue(uid: str, generation: int, images: Any) -> None:  # as the node does
        sent.append((uid, store.message_priority(uid, aging_seconds=600, now=clock[0])))

    asm = Assembler(
        store,
        AssemblerConfig(quiet_seconds=1, force_seconds=10, priority_aging_seconds=600),
        enqueue_report=enqueue,
        enqueue_send=lambda uid, dest: None,
    )
    for uid in ("6.1", "6.2"):
        store.record_instance(instance_row(uid, uid + ".1", t=time.time()), outcome="stored")
    assert sorted(asm.complete_due(now=time.time() + 5)) == ["6.1", "6.2"]
    assert sorted(sent) == [("6.1", Priority.ROUTINE), ("6.2", Priority.ROUTINE)]
    sent.clear()
    assert asm.promote_queued() == []

    store.set_priority("6.2", Priority.STAT, source="operator")
    assert asm.promote_queued() == ["6.2"]
    assert sent == [("6.2", Priority.STAT)]
    assert asm.promote_queued() == []  # once
    assert [uid for uid, _ in store.queued_studies(limit=5)] == ["6.2", "6.1"]

    # the guard: the routine study that waited past the ageing is sent again as urgent
    sent.clear()
    later = clock[0] = time.time() + 601
    assert asm.promote_queued(now=later) == ["6.1"]
    assert sent == [("6.1", Priority.URGENT)]
    assert asm.promote_queued(now=later) == []
    assert store.get("6.1").priority == "routine"  # type: ignore[union-attr]
    assert any("served as urgent" in e.detail for e in store.events("6.1"))


def test_deliveries_of_urgent_studies_go_ahead_of_routine_retries(store: StudyStore) -> None:
    for uid, priority in [("5.1", Priority.ROUTINE), ("5.2", Priority.URGENT)]:
        generation = _queue(store, uid, priority)
        assert store.claim(uid, generation=generation, owner="w", lease_seconds=60)
        assert store.mark_reported(
            uid,
            owner="w",
            result_paths=[],
            model_name="m",
            model_version="1",
            findings="",
            impression="",
            lesion_count=0,
            destinations=["PACS"],
        )
    # both first sends were lost (their worker died): the due deliveries go out again
    due = store.due_deliveries(requeue_after=300, now=time.time() + 301)
    assert due == [("5.2", "PACS"), ("5.1", "PACS")]


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    proc, url = start_redis(tmp_path)
    try:
        yield url
    finally:
        proc.stop()


#: the priorities of five job messages, in the order they are sent
SENT = [Priority.ROUTINE, Priority.LOW, Priority.URGENT, Priority.ROUTINE, Priority.STAT]


def _send_jobs(app: Any) -> None:
    for n, priority in enumerate(SENT):
        app.send_task(REPORT_TASK, args=[f"{priority}-{n}"], priority=broker_priority(priority))


def _received(app: Any) -> list[str]:
    """The jobs' arguments in the order the broker hands them out."""
    received = []
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(REPORT_QUEUE)
        for _ in SENT:
            message = queue.get(timeout=5)
            received.append(message.payload[0][0])
            message.ack()
        queue.close()
    return received


@pytest.mark.integration
def test_redis_hands_out_job_messages_by_priority(redis_url: str) -> None:
    app = create_app(WorkerSettings.from_env({"D2R_BROKER_URL": redis_url}))
    _send_jobs(app)
    assert _received(app) == ["stat-4", "urgent-2", "routine-0", "routine-3", "low-1"]


def test_the_embedded_queue_hands_out_job_messages_by_priority(tmp_path: Path) -> None:
    """``d2r serve``'s file-system queue serves the most urgent message first, as Redis does."""
    settings = WorkerSettings.from_env(
        {"D2R_SPOOL_DIR": str(tmp_path / "spool")}, default_broker="filesystem://"
    )
    app = create_app(settings)
    _send_jobs(app)
    files = sorted(os.listdir(settings.queue_dir / "messages"))
    assert all(name.endswith(f".{REPORT_QUEUE}.msg") for name in files)  # the depth gauge's form
    assert _received(app) == ["stat-4", "urgent-2", "routine-0", "routine-3", "low-1"]
