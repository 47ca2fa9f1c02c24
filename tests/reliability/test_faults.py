"""Fault injection on real processes over loopback: the expected outcome is always "every
acknowledged instance processed, every study reported exactly once".

Topology: ``d2r node`` + ``d2r worker`` (a real Celery worker) on a real Redis, Orthanc as the PACS,
a randomly initialised D2R-Net checkpoint. Recovery runs on the default settings (30 s claim
lease renewed every 10 s, 600 s task time limit, reconciler every 30 s); only the lost-broker-
message test shortens the visibility timeout, the one bound on re-sending a queued job.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.stack import Stack, make_stack, send_datasets, sigkill
from tests.support.dicom_files import make_dx
from tests.support.processes import run_d2r, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _study(seed: int, n: int = 1) -> list[Any]:
    first = make_dx(None, rows=512, cols=416, seed=seed)
    more = [
        make_dx(None, study_uid=first.StudyInstanceUID, rows=64, cols=64, seed=seed + k)
        for k in range(1, n)
    ]
    return [first, *more]


@pytest.fixture
def stack(orthanc_factory: Any, model_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    created: list[Stack] = []

    def build(**env: str) -> Stack:
        s = make_stack(orthanc_factory, model_dir, tmp_path, **env)
        created.append(s)
        return s

    yield build
    for s in created:
        s.stop()


def test_worker_killed_mid_inference_completes_exactly_once(stack: Any) -> None:
    s: Stack = stack()
    s.start_node()
    worker = s.start_worker()
    caught: str | None = None
    sent: list[str] = []
    for attempt in range(4):  # inference is quick: catch one study while it is processing
        (ds,) = _study(100 + attempt)
        uid = str(ds.StudyInstanceUID)
        assert send_datasets(s.node_port, [ds]) == [ds.SOPInstanceUID]
        sent.append(uid)

        def claimed(u: str = uid) -> bool:
            return s.state(u) in ("processing", "sending", "done")

        try:
            wait_for(claimed, 90, "claim", interval=0.005)
        except TimeoutError:
            pytest.fail(s.logs())
        if s.state(uid) == "processing":
            sigkill(worker)
            caught = uid
            break
    assert caught is not None, "never caught a study while processing"
    assert s.state(caught) == "processing"

    restarted = time.monotonic()
    worker = s.start_worker()  # a fresh worker; the reconciler re-queues the expired claim
    assert s.orthanc is not None
    try:
        wait_for(lambda: len(s.sr_classes(caught)) == 2, 90, "the SRs in the PACS", interval=0.5)
    except TimeoutError:
        pytest.fail(s.logs())
    recovered = time.monotonic() - restarted
    print(f"SRs of the killed worker's study in the PACS {recovered:.1f} s after a new worker")
    assert recovered < 60.0, recovered
    s.wait_states(sent, {"done"}, timeout=120)
    for uid in sent:
        s.assert_reported_exactly_once(uid)
    kinds = [e.kind for e in s.store.events(caught)]
    assert kinds.count("processing") >= 2  # claimed again after the lease expired
    assert kinds.count("reported") == 1


def test_redis_restart_loses_no_study(stack: Any) -> None:
    # a lost queued message is re-sent after D2R_VISIBILITY_TIMEOUT (it cannot be told from a
    # long queue sooner); shortened here, with the task time limit it must exceed
    s: Stack = stack(
        D2R_TASK_TIME_LIMIT="15", D2R_VISIBILITY_TIMEOUT="20", D2R_RECONCILE_SECONDS="1"
    )
    s.start_node()
    s.start_worker()
    before = _study(200)
    assert send_datasets(s.node_port, before)
    s.wait_states([before[0].StudyInstanceUID], {"done"}, timeout=120)

    assert s.redis is not None
    s.redis.kill9()  # no persistence: whatever was queued in Redis is gone
    during = _study(201)
    assert send_datasets(s.node_port, during) == [during[0].SOPInstanceUID]
    time.sleep(3)  # the study completes and its job cannot be queued
    s.start_redis()  # same port, empty
    after = _study(202)
    assert send_datasets(s.node_port, after)
    uids = [x[0].StudyInstanceUID for x in (before, during, after)]
    s.wait_states(uids, {"done"}, timeout=150)
    for uid in uids:
        s.assert_reported_exactly_once(uid)


def test_pacs_down_then_back_delivers_with_visible_retries(stack: Any, tmp_path: Path) -> None:
    s: Stack = stack(D2R_SEND_RETRIES="8", D2R_SEND_RETRY_DELAY="1")
    assert s.orthanc is not None
    s.orthanc.stop(graceful=False)  # the PACS is down
    s.start_node()
    s.start_worker()
    (ds,) = _study(300)
    uid = str(ds.StudyInstanceUID)
    assert send_datasets(s.node_port, [ds])

    def retries() -> int:
        return sum(e.kind == "send-retry" for e in s.store.events(uid))

    try:
        wait_for(lambda: retries() >= 2, 120, "two failed attempts", interval=0.5)
    except TimeoutError:
        pytest.fail(s.logs())
    res = run_d2r("status", "--json", uid, env=s.env)
    status = json.loads(res.stdout)
    assert status["state"] == "sending"
    (delivery,) = status["deliveries"]
    assert delivery["state"] == "pending" and delivery["attempts"] >= 2
    assert "transient" in (delivery["last_error"] or "")
    listing = run_d2r("status", uid, env=s.env).stdout
    assert "send-retry" in listing

    s.orthanc.start()  # back, same ports
    s.wait_states([uid], {"done"}, timeout=120)
    s.assert_reported_exactly_once(uid)
    final = s.view(uid)
    assert final is not None and final.deliveries[0].attempts >= 3


def test_node_killed_while_instances_arrive_processes_every_acknowledged_one(
    stack: Any,
) -> None:
    s: Stack = stack(D2R_STUDY_QUIET_SECONDS="2")
    s.start_node()
    s.start_worker()
    studies = [_study(400 + n, n=3) for n in range(8)]
    acknowledged: list[str] = []
    done_sending = threading.Event()

    def sender() -> None:
        for study in studies:
            acknowledged.extend(send_datasets(s.node_port, study))
            time.sleep(0.1)
        done_sending.set()

    thread = threading.Thread(target=sender)
    thread.start()
    wait_for(lambda: len(acknowledged) >= 6, 60, "the first acknowledgements", interval=0.02)
    assert s.node is not None
    sigkill(s.node)  # mid-stream: some stores are refused or aborted, never falsely acknowledged
    time.sleep(1.0)
    s.start_node()
    thread.join(120)
    assert done_sending.is_set()

    by_study: dict[str, list[str]] = {}
    for study in studies:
        for ds in study:
            if str(ds.SOPInstanceUID) in acknowledged:
                by_study.setdefault(str(ds.StudyInstanceUID), []).append(str(ds.SOPInstanceUID))
    total = sum(len(study) for study in studies)
    assert 6 <= len(acknowledged) <= total
    recorded = {i.sop_instance_uid for uid in by_study for i in s.store.instances(uid)}
    assert set(acknowledged) <= recorded  # nothing acknowledged was lost
    s.wait_states(by_study, {"done"}, timeout=180)
    for uid in by_study:
        s.assert_reported_exactly_once(uid)
