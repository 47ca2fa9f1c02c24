"""Batched inference on real processes: ``d2r worker`` with ``D2R_BATCH_MAX`` > 1 over a real
Redis, ``d2r node``, Orthanc as the PACS.

Each study of a batch ends on its own (an undecodable image, or one whose model call fails,
fails only its study; the fault comes from ``tests/support/fault_injection``), and a
worker killed with -9 in the middle of a batch leaves every study to be reported exactly once
by the next worker (each claim is a lease of its own; the reconciler re-queues them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.stack import Stack, make_stack, send_datasets, sigkill
from tests.support.dicom_files import make_dx
from tests.support.processes import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BATCH = {"D2R_BATCH_MAX": "4", "D2R_BATCH_WAIT_MS": "500"}
FAULTS_DIR = Path(__file__).resolve().parents[1] / "support" / "fault_injection"


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


def _owner(s: Stack, uid: str) -> str:
    """The task that claimed ``uid`` first (from its ``processing`` event)."""
    claims = [e.detail for e in s.store.events(uid) if e.kind == "processing"]
    assert claims, uid
    found = re.match(r"claimed by task (\S+)", claims[0])
    assert found, claims[0]
    return found.group(1)


def _queue(s: Stack, seed: int, n: int = 4) -> list[str]:
    """Send ``n`` one-image studies and wait until all are queued (no worker yet)."""
    studies = [make_dx(None, rows=512, cols=416, seed=seed + k) for k in range(n)]
    assert len(send_datasets(s.node_port, studies)) == n
    uids = [str(ds.StudyInstanceUID) for ds in studies]
    s.wait_states(uids, {"queued"}, timeout=60)
    return uids


def test_a_poisoned_study_fails_alone_and_the_rest_of_its_batch_is_reported(
    stack: Any, tmp_path: Path
) -> None:
    s: Stack = stack()
    s.start_node()
    good = [make_dx(None, rows=512, cols=416, seed=400 + k) for k in range(3)]
    bad = make_dx(None, rows=512, cols=416, seed=410)
    bad.PixelData = bytes(bad.PixelData)[: len(bad.PixelData) // 3]  # cannot be decoded
    crash = make_dx(None, rows=512, cols=416, seed=420)  # the model call fails on it
    studies = [good[0], bad, good[1], crash, good[2]]
    assert len(send_datasets(s.node_port, studies)) == len(studies)
    uids = [str(ds.StudyInstanceUID) for ds in studies]
    bad_uid, crash_uid = str(bad.StudyInstanceUID), str(crash.StudyInstanceUID)
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({crash_uid: "predict"}))
    s.wait_states(uids, {"queued"}, timeout=60)

    s.start_worker(
        D2R_BATCH_MAX="5",
        D2R_BATCH_WAIT_MS="500",
        TEST_FAULTS_FILE=str(faults),
        PYTHONPATH=os.pathsep.join([str(FAULTS_DIR), os.environ.get("PYTHONPATH", "")]),
    )
    s.wait_states(uids, {"done", "failed"}, timeout=240)

    assert len({_owner(s, uid) for uid in uids}) == 1, "the five studies were one batch"
    view = s.view(bad_uid)
    assert view is not None and view.state == "failed"
    assert view.reason is not None and view.reason.startswith("cannot decode the image"), view
    assert view.attempts == 1  # bad input: not retried
    assert not s.sr_classes(bad_uid)
    view = s.view(crash_uid)  # an unexpected error: its own attempts, then failed
    assert view is not None and view.state == "failed", view
    assert view.reason == "predict: RuntimeError: injected fault at predict"
    assert view.attempts == 3 and not s.sr_classes(crash_uid)
    for uid in uids:
        if uid not in (bad_uid, crash_uid):
            assert s.state(uid) == "done", s.logs()
            s.assert_reported_exactly_once(uid)
    worker_log = (s.tmp / "worker0.log").read_text(encoding="utf-8")
    assert "batch of 5 studies" in worker_log
    # as for one study, the first sends ran in the worker's background thread, not as tasks
    assert not re.search(r"d2r\.send_reports\[", worker_log), worker_log


def test_worker_killed_mid_batch_reports_each_study_exactly_once(stack: Any) -> None:
    s: Stack = stack()
    s.start_node()
    caught: list[str] = []
    sent: list[str] = []
    for attempt in range(3):  # a batch is quick: catch one while all its studies are claimed
        uids = _queue(s, 500 + 10 * attempt)
        sent += uids
        worker = s.start_worker(**BATCH)

        def claimed(batch: list[str] = uids) -> bool:
            return any(s.state(u) != "queued" for u in batch)

        wait_for(claimed, 120, "a claim", interval=0.005)

        def all_claimed(batch: list[str] = uids) -> bool:
            return all(s.state(u) == "processing" for u in batch)

        with contextlib.suppress(TimeoutError):
            wait_for(all_claimed, 5, "the whole batch claimed", interval=0.005)
        states = {u: s.state(u) for u in uids}
        sigkill(worker)
        if all(state == "processing" for state in states.values()):
            caught = uids
            break
    assert caught, "never caught a batch while all its studies were processing"
    assert len({_owner(s, uid) for uid in caught}) == 1
    assert all(s.state(uid) == "processing" for uid in caught)

    s.start_worker(**BATCH)  # the reconciler re-queues each expired claim
    s.wait_states(sent, {"done"}, timeout=240)
    for uid in sent:
        s.assert_reported_exactly_once(uid)
    for uid in caught:
        kinds = [e.kind for e in s.store.events(uid)]
        assert kinds.count("processing") >= 2, kinds  # claimed again after the lease expired
        assert kinds.count("reported") == 1
