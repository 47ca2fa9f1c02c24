"""The study database: state machine, idempotency, reconciler queries, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from dicom_node.assembler import Assembler, AssemblerConfig
from studydb.store import StudyStore
from tests.dicom_node.conftest import instance_row as _record


def test_first_instance_opens_a_receiving_study(store: StudyStore) -> None:
    store.record_instance(_record("1.2.3", "1.2.3.4"), outcome="stored")
    view = store.get("1.2.3")
    assert view is not None
    assert view.state == "receiving" and view.instance_count == 1
    assert [i.sop_instance_uid for i in store.instances("1.2.3")] == ["1.2.3.4"]


def test_quiet_period_and_force_timeout(store: StudyStore) -> None:
    store.record_instance(_record("1.2.3", "1.2.3.4", t=1000), outcome="stored")
    store.record_instance(_record("1.2.3", "1.2.3.5", t=1008), outcome="stored")
    assert store.due_for_completion(quiet_seconds=10, force_seconds=60, now=1015) == []
    assert store.due_for_completion(quiet_seconds=10, force_seconds=60, now=1018) == ["1.2.3"]
    # a study that never goes quiet still completes at the force timeout
    assert store.due_for_completion(quiet_seconds=100, force_seconds=12, now=1013) == ["1.2.3"]


def test_released_association_completes_after_grace_unless_another_is_open(
    store: StudyStore,
) -> None:
    import time

    t = time.time()
    store.record_instance(_record("1.2.3", "1.2.3.4", t=t), outcome="stored")
    store.open_association("1.2.3")  # association A
    store.record_instance(_record("1.2.3", "1.2.3.5", t=t), outcome="stored")
    store.open_association("1.2.3")  # association B, same study, still sending

    def due(at: float) -> list[tuple[str, str]]:
        return store.completion_due(
            quiet_seconds=600, force_seconds=6000, release_grace_seconds=2, now=at
        )

    store.close_association(["1.2.3"], released=True)  # A released, B open
    assert due(time.time() + 60) == []
    store.close_association(["1.2.3"], released=True)  # B released too
    released = time.time()
    assert due(released - 1) == []  # within the grace period
    assert due(released + 3) == [("1.2.3", "association released")]
    # A later instance on a new association re-arms the rule until that one is released.
    store.record_instance(_record("1.2.3", "1.2.3.6", t=time.time() + 1), outcome="stored")
    store.open_association("1.2.3")
    assert due(time.time() + 60) == []
    store.close_association(["1.2.3"], released=False)  # aborted: only the quiet period is left
    assert due(time.time() + 60) == []
    assert due(time.time() + 700) == [("1.2.3", "quiet period")]


def test_assembler_woken_by_a_release_completes_before_its_next_tick(
    store: StudyStore,
) -> None:
    import time

    reports: list[str] = []
    asm = Assembler(
        store,
        AssemblerConfig(
            quiet_seconds=600, force_seconds=6000, release_grace_seconds=0.2, tick_seconds=120
        ),
        enqueue_report=lambda uid, gen, imgs: reports.append(uid),
        enqueue_send=lambda uid, dest: None,
    )
    asm.start()
    try:
        time.sleep(0.5)  # its first tick has run; the next would come two minutes later
        store.record_instance(_record("1.1", "1.1.1", t=time.time()), outcome="stored")
        store.open_association("1.1")
        store.close_association(["1.1"], released=True)
        asm.wake_after(0.25)
        deadline = time.time() + 30
        while not reports and time.time() < deadline:
            time.sleep(0.05)
        assert reports == ["1.1"]
    finally:
        asm.stop()


def test_duplicate_and_conflict_are_recorded_not_double_counted(store: StudyStore) -> None:
    store.record_instance(_record("1.2.3", "1.2.3.4"), outcome="stored")
    store.record_instance(_record("1.2.3", "1.2.3.4"), outcome="duplicate")
    store.record_instance(_record("1.2.3", "1.2.3.4"), outcome="conflict")
    view = store.get("1.2.3")
    assert view is not None and view.instance_count == 1
    kinds = [e.kind for e in store.events("1.2.3")]
    assert kinds.count("duplicate") == 1 and kinds.count("conflict") == 1


def test_claim_is_exclusive_and_generation_checked(store: StudyStore) -> None:
    store.record_instance(_record("1.2.3", "1.2.3.4"), outcome="stored")
    gen = store.mark_queued("1.2.3")
    assert gen == 1
    assert not store.claim("1.2.3", generation=2, owner="a", lease_seconds=60)
    assert store.claim("1.2.3", generation=1, owner="a", lease_seconds=60)
    assert not store.claim("1.2.3", generation=1, owner="b", lease_seconds=60)
    # the same task id (a redelivered message) may take it again
    assert store.claim("1.2.3", generation=1, owner="a", lease_seconds=60)
    # an expired lease may be taken over
    assert store.claim("1.2.3", generation=1, owner="a", lease_seconds=-1)
    assert store.claim("1.2.3", generation=1, owner="b", lease_seconds=60)
    assert not store.claim("1.2.3", generation=1, owner="c", lease_seconds=60)


def test_concurrent_claims_only_one_wins(store: StudyStore) -> None:
    store.record_instance(_record("1.2.3", "1.2.3.4"), outcome="stored")
    store.mark_queued("1.2.3")
    wins: list[str] = []
    barrier = threading.Barrier(4)

    def claim(owner: str) -> None:
        barrier.wait()
        if store.claim("1.2.3", generation=1, owner=owner, lease_seconds=60):
            wins.append(owner)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def test_late_instance_reopens_a_queued_study_and_invalidates_its_job(store: StudyStore) -> None:
    store.record_instance(_record("1.2.3", "1.2.3.4"), outcome="stored")
    assert store.mark_queued("1.2.3") == 1
    store.record_instance(_record("1.2.3", "1.2.3.5", t=2000), outcome="stored")
    view = store.get("1.2.3")
    assert view is not None and view.state == "receiving"
    assert not store.claim("1.2.3", generation=1, owner="a", lease_seconds=60)
    assert store.mark_queued("1.2.3") == 2


def test_late_instance_after_claim_does_not_restart_the_report(store: StudyStore) -> None:
    store.record_instance(_record("1.2.3", "1.2.3.4"), outcome="stored")
    store.mark_queued("1.2.3")
    assert store.claim("1.2.3", generation=1, owner="a", lease_seconds=60)
    store.record_instance(_record("1.2.3", "1.2.3.5", t=2000), outcome="stored")
    view = store.get("1.2.3")
    assert view is not None and view.state == "processing"
    assert "late-instance" in [e.kind for e in store.events("1.2.3")]


def _reported(store: StudyStore, destinations: list[str]) -> None:
    store.record_instance(_record("1.2.3", "1.2.3.4"), outcome="stored")
    store.mark_queued("1.2.3")
    assert store.claim("1.2.3", generation=1, owner="a", lease_seconds=60)
    assert store.mark_reported(
        "1.2.3",
        owner="a",
        result_paths=["/r/1.dcm", "/r/2.dcm"],
        model_name="m",
        model_version="1",
        findings="f",
        impression="i",
        lesion_count=2,
        destinations=destinations,
    )


def test_delivery_retries_with_backoff_then_fails_and_retry_resends(store: StudyStore) -> None:
    _reported(store, ["PACS@127.0.0.1:104", "RIS@127.0.0.1:105"])
    view = store.get("1.2.3")
    assert view is not None and view.state == "sending"
    kw: dict[str, Any] = {"max_attempts": 3, "retry_delay": 10.0}
    assert (
        store.record_delivery_attempt("1.2.3", "RIS@127.0.0.1:105", ok=True, error=None, **kw)
        == "sent"
    )
    for attempt in (1, 2):
        state = store.record_delivery_attempt(
            "1.2.3", "PACS@127.0.0.1:104", ok=False, error="refused", **kw
        )
        assert state == "pending"
        d = store.delivery("1.2.3", "PACS@127.0.0.1:104")
        assert d is not None and d.attempts == attempt and d.next_attempt_at is not None
    assert store.due_deliveries(requeue_after=60) == []  # backing off
    assert (
        store.record_delivery_attempt(
            "1.2.3", "PACS@127.0.0.1:104", ok=False, error="refused", **kw
        )
        == "failed"
    )
    view = store.get("1.2.3")
    assert view is not None and view.state == "failed" and "1 destination" in (view.reason or "")

    assert store.reset_for_retry("1.2.3") == "sending"
    assert store.due_deliveries(requeue_after=60) == [("1.2.3", "PACS@127.0.0.1:104")]
    assert (
        store.record_delivery_attempt("1.2.3", "PACS@127.0.0.1:104", ok=True, error=None, **kw)
        == "sent"
    )
    view = store.get("1.2.3")
    assert view is not None and view.state == "done"
    # a done study is not retried unless asked to reprocess
    assert store.reset_for_retry("1.2.3") == "done"
    assert store.reset_for_retry("1.2.3", reprocess=True) == "receiving"


def test_retry_one_destination_resends_only_that_delivery(store: StudyStore) -> None:
    pacs, ris = "PACS@127.0.0.1:104", "mllp://127.0.0.1:2575"
    _reported(store, [pacs, ris])
    kw: dict[str, Any] = {"max_attempts": 1, "retry_delay": 10.0}
    for destination in (pacs, ris):
        assert (
            store.record_delivery_attempt("1.2.3", destination, ok=False, error="down", **kw)
            == "failed"
        )
    view = store.get("1.2.3")
    assert view is not None and view.state == "failed"

    assert store.reset_for_retry("1.2.3", destination="mllp://elsewhere:1") == "failed"
    assert store.reset_for_retry("1.2.3", destination=ris) == "sending"
    assert store.due_deliveries(requeue_after=60) == [("1.2.3", ris)]
    pacs_delivery = store.delivery("1.2.3", pacs)
    assert pacs_delivery is not None and pacs_delivery.state == "failed"
    events = [e for e in store.events("1.2.3") if e.kind == "retry"]
    assert [e.detail for e in events] == [f"operator retry: re-send to {ris}"]
    # the delivery is pending now: a second retry of it changes nothing
    assert store.reset_for_retry("1.2.3", destination=ris) == "sending"
    assert len([e for e in store.events("1.2.3") if e.kind == "retry"]) == 1
    assert store.record_delivery_attempt("1.2.3", ris, ok=True, error=None, **kw) == "sent"
    view = store.get("1.2.3")
    assert view is not None and view.state == "failed"  # the PACS delivery still failed
    with pytest.raises(ValueError):
        store.reset_for_retry("1.2.3", destination=pacs, reprocess=True)


def test_no_destinations_means_done(store: StudyStore) -> None:
    _reported(store, [])
    view = store.get("1.2.3")
    assert view is not None and view.state == "done"


def test_reconciler_requeues_lost_jobs_and_expired_leases(store: StudyStore) -> None:
    store.record_instance(_record("1.2.3", "1.2.3.4"), outcome="stored")
    store.mark_queued("1.2.3")
    store.record_instance(_record("1.2.4", "1.2.4.5"), outcome="stored")
    store.mark_queued("1.2.4")
    assert store.claim("1.2.4", generation=1, owner="dead", lease_seconds=5)
    import time

    now = time.time()
    assert store.requeue_candidates(requeue_after=60, now=now) == []
    later = sorted(store.requeue_candidates(requeue_after=60, now=now + 120))
    assert later == [("1.2.3", 1), ("1.2.4", 1)]


def test_assembler_queues_skips_and_reconciles(store: StudyStore) -> None:
    reports: list[tuple[str, int, list[str]]] = []
    sends: list[tuple[str, str]] = []
    asm = Assembler(
        store,
        AssemblerConfig(quiet_seconds=5, force_seconds=60, requeue_after=30),
        enqueue_report=lambda uid, gen, imgs: reports.append(
            (uid, gen, [i.sop_instance_uid for i in imgs])
        ),
        enqueue_send=lambda uid, dest: sends.append((uid, dest)),
    )
    store.record_instance(_record("1.1", "1.1.1", view="AP", t=1000), outcome="stored")
    store.record_instance(_record("1.1", "1.1.2", view="PA", t=1000), outcome="stored")
    store.record_instance(_record("1.1", "1.1.3", view="LL", t=1000), outcome="stored")
    store.record_instance(_record("2.2", "2.2.1", view="LL", t=1000), outcome="stored")
    store.record_instance(_record("3.3", "3.3.1", modality="CT", t=1000), outcome="stored")
    assert asm.complete_due(now=1010) == ["1.1"]
    assert reports[0][0] == "1.1" and reports[0][2][0] == "1.1.2"  # PA first
    assert "1.1.3" not in reports[0][2]
    skipped = {v.study_instance_uid: v.reason for v in store.recent(state="skipped")}
    assert set(skipped) == {"2.2", "3.3"} and all(skipped.values())
    # the job message is lost: the reconciler re-sends it
    import time

    assert asm.reconcile(now=time.time() + 31) == ["1.1"]
    assert [r[0] for r in reports] == ["1.1", "1.1"]


def test_unexpected_errors_spend_attempts_then_fail_with_the_reason(store: StudyStore) -> None:
    store.record_instance(_record("1.2.3", "1.2.3.4"), outcome="stored")
    store.mark_queued("1.2.3")
    reason = "predict: RuntimeError: out of memory"
    for attempt in (1, 2):
        assert store.claim(
            "1.2.3", generation=1, owner=f"t{attempt}", lease_seconds=30, max_attempts=3
        )
        view = store.get("1.2.3")
        assert view is not None and view.attempts == attempt
        assert (
            store.record_failed_attempt(  # another owner's report changes nothing
                "1.2.3", owner="other", stage="predict", reason=reason, max_attempts=3
            )
            == "processing"
        )
        new = store.record_failed_attempt(
            "1.2.3", owner=f"t{attempt}", stage="predict", reason=reason, max_attempts=3
        )
        assert new == "queued"
    assert store.claim("1.2.3", generation=1, owner="t3", lease_seconds=30, max_attempts=3)
    assert (
        store.record_failed_attempt(
            "1.2.3", owner="t3", stage="predict", reason=reason, max_attempts=3
        )
        == "failed"
    )
    view = store.get("1.2.3")
    assert view is not None
    assert (view.state, view.reason, view.attempts, view.stage) == ("failed", reason, 3, "predict")
    details = [e.detail for e in store.events("1.2.3") if e.kind == "attempt-failed"]
    assert details[-1] == f"attempt 3 of 3 failed at {reason}"
    # an operator retry starts the attempts again
    assert store.reset_for_retry("1.2.3", reprocess=True) == "receiving"
    assert store.mark_queued("1.2.3") == 2
    view = store.get("1.2.3")
    assert view is not None and view.attempts == 0


def test_expired_claims_are_requeued_until_the_last_attempt_then_failed(
    store: StudyStore,
) -> None:
    import time

    store.record_instance(_record("1.2.3", "1.2.3.4"), outcome="stored")
    store.mark_queued("1.2.3")
    now = time.time()
    for attempt in (1, 2):
        assert store.claim(
            "1.2.3", generation=1, owner=f"w{attempt}", lease_seconds=30, max_attempts=2
        )
        assert store.requeue_candidates(requeue_after=float("inf"), max_attempts=2, now=now) == []
        later = store.requeue_candidates(
            requeue_after=float("inf"), max_attempts=2, now=now + 60 * attempt
        )
        if attempt == 1:
            assert later == [("1.2.3", 1)]
            assert store.fail_exhausted(max_attempts=2, now=now + 60) == []
            store.touch_queued("1.2.3", detail="re-sent")
        else:  # the last attempt's claim expired: failed, never queued again
            assert later == []
    store.renew_lease("1.2.3", owner="w2", lease_seconds=30, not_after=now + 90, stage="decode")
    assert store.fail_exhausted(max_attempts=2, now=now + 200) == ["1.2.3"]
    view = store.get("1.2.3")
    assert view is not None and view.state == "failed"
    assert view.reason is not None and view.reason.startswith("decode: WorkerLost:")
    # a redelivered message of the dead worker cannot claim it
    assert not store.claim("1.2.3", generation=1, owner="w1", lease_seconds=30, max_attempts=2)


def test_lease_renewal_never_passes_the_task_time_limit(store: StudyStore) -> None:
    import time

    store.record_instance(_record("1.2.3", "1.2.3.4"), outcome="stored")
    store.mark_queued("1.2.3")
    assert store.claim("1.2.3", generation=1, owner="w", lease_seconds=30)
    now = time.time()
    assert store.renew_lease("1.2.3", owner="w", lease_seconds=30, not_after=now + 5)
    assert not store.renew_lease("1.2.3", owner="x", lease_seconds=30, not_after=now + 60)
    # a hung worker keeps renewing, but its claim ends at the time limit
    assert store.requeue_candidates(requeue_after=float("inf"), now=now + 4) == []
    assert store.requeue_candidates(requeue_after=float("inf"), now=now + 6) == [("1.2.3", 1)]


def test_stuck_studies_and_the_oldest_unfinished_age(store: StudyStore) -> None:
    import time

    store.record_instance(_record("1.2.3", "1.2.3.4"), outcome="stored")
    store.mark_queued("1.2.3")
    now = time.time()
    assert [v.study_instance_uid for v in store.stuck(older_than=60, now=now + 120)] == ["1.2.3"]
    assert store.stuck(older_than=60, now=now) == []
    assert 119 <= store.oldest_unfinished_age(now=now + 120) <= 121
    store.mark_failed("1.2.3", "x")  # not processing: unchanged
    assert store.claim("1.2.3", generation=1, owner="w", lease_seconds=30)
    store.mark_failed("1.2.3", "done with it", owner="w")
    assert store.stuck(older_than=0, now=now + 120) == []
    assert store.oldest_unfinished_age(now=now + 120) == 0.0


def test_assembler_requeues_a_dead_workers_study_then_fails_it_on_the_last_attempt(
    store: StudyStore,
) -> None:
    import time

    reports: list[str] = []
    failed: list[tuple[str, str]] = []
    asm = Assembler(
        store,
        AssemblerConfig(quiet_seconds=5, force_seconds=60, requeue_after=300, max_attempts=2),
        enqueue_report=lambda uid, gen, imgs: reports.append(uid),
        enqueue_send=lambda uid, dest: None,
        on_failed=lambda uid, stage: failed.append((uid, stage)),
    )
    store.record_instance(_record("1.1", "1.1.1", t=1000), outcome="stored")
    assert asm.complete_due(now=1010) == ["1.1"]
    now = time.time()
    assert store.claim("1.1", generation=1, owner="w1", lease_seconds=30, max_attempts=2)
    assert asm.reap_expired(now=now + 10) == []  # the claim still holds
    assert asm.reap_expired(now=now + 31) == ["1.1"]  # the worker died: queued again at once
    assert store.get("1.1").state == "queued"  # type: ignore[union-attr]
    assert store.claim("1.1", generation=1, owner="w2", lease_seconds=30, max_attempts=2)
    store.renew_lease("1.1", owner="w2", lease_seconds=30, not_after=now + 600, stage="predict")
    assert asm.reap_expired(now=now + 100) == []
    assert failed == [("1.1", "predict")] and reports == ["1.1", "1.1"]
    view = store.get("1.1")
    assert view is not None and view.state == "failed" and "WorkerLost" in (view.reason or "")
