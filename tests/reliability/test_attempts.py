"""Every study ends: an unexpected error in any stage, injected into the real worker process,
spends one of ``D2R_MAX_ATTEMPTS`` (default 3) attempts; then the study is ``failed`` with the
stage, the exception class and the message in its timeline, counted in ``/metrics`` and written
to the audit log, and ``d2r retry --reprocess`` runs it again.

The fault comes from ``tests/support/fault_injection/sitecustomize.py`` (test-only, loaded by the
worker through ``PYTHONPATH``); the node, the worker, Redis and Orthanc are the real ones.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from observability.audit import STUDY_FAILED, read_audit
from tests.reliability.stack import Stack, make_stack, send_datasets
from tests.support.dicom_files import make_dx
from tests.support.processes import free_port, run_d2r, wait_for
from tests.support.prometheus import sample_value

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAULTS_DIR = Path(__file__).resolve().parents[1] / "support" / "fault_injection"
REPORT_STAGES = (
    "spool-read",
    "decode",
    "preprocess",
    "predict",
    "sr-build",
    "write-results",
)


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def _sample(text: str, name: str, stage: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{stage="{stage}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_fault_in_each_stage_fails_the_study_after_bounded_attempts(
    orthanc_factory: Any, model_dir: Path, tmp_path: Path
) -> None:
    node_http, worker_http = free_port(), free_port()
    s: Stack = make_stack(orthanc_factory, model_dir, tmp_path, D2R_HTTP_PORT=str(node_http))
    try:
        studies = {
            stage: make_dx(None, rows=96, cols=80, seed=700 + n)
            for n, stage in enumerate((*REPORT_STAGES, "send", "none"))
        }
        uid_of = {stage: str(ds.StudyInstanceUID) for stage, ds in studies.items()}
        faults = tmp_path / "faults.json"
        faults.write_text(json.dumps({uid_of[st]: st for st in uid_of if st != "none"}))
        s.start_node()
        s.start_worker(
            TEST_FAULTS_FILE=str(faults),
            PYTHONPATH=os.pathsep.join([str(FAULTS_DIR), os.environ.get("PYTHONPATH", "")]),
            D2R_HTTP_PORT=str(worker_http),
        )
        assert len(send_datasets(s.node_port, studies.values())) == len(studies)
        s.wait_states(uid_of.values(), {"done", "failed"}, timeout=240)

        assert s.state(uid_of["none"]) == "done"  # the fault hook touches only listed studies
        for stage in REPORT_STAGES:
            uid = uid_of[stage]
            view = s.view(uid)
            assert view is not None and view.state == "failed", (stage, view)
            assert view.reason == f"{stage}: RuntimeError: injected fault at {stage}"
            assert view.attempts == 3 and view.stage == stage
            events = s.store.events(uid)
            failed_attempts = [e.detail for e in events if e.kind == "attempt-failed"]
            assert len(failed_attempts) == 3, failed_attempts
            assert failed_attempts[-1].startswith(f"attempt 3 of 3 failed at {stage}: RuntimeError")
            assert [e.kind for e in events].count("processing") == 3
            assert not view.result_paths and not s.sr_classes(uid)
            assert "SYNTHETIC" not in json.dumps([e.detail for e in events])  # no PHI
        send = s.view(uid_of["send"])
        assert send is not None and send.state == "failed"
        (delivery,) = send.deliveries
        assert delivery.state == "failed" and delivery.attempts == 3
        assert delivery.last_error == "unexpected: send: RuntimeError: injected fault at send"

        worker_metrics = _metrics(worker_http)
        for stage in (*REPORT_STAGES, "send"):
            assert _sample(worker_metrics, "d2r_attempt_failures_total", stage) == 3, stage
            assert _sample(worker_metrics, "d2r_studies_failed_after_attempts_total", stage) == 1
        oldest = sample_value(_metrics(node_http), "d2r_oldest_unfinished_study_age_seconds")
        assert oldest == 0.0

        audit_path = Path(s.env["D2R_AUDIT_LOG"])
        failed = {
            r["study_instance_uid"]: r for r in read_audit(audit_path) if r["event"] == STUDY_FAILED
        }
        for stage in (*REPORT_STAGES, "send"):
            assert failed[uid_of[stage]]["stage"] == stage
            assert failed[uid_of[stage]]["exception"] == "RuntimeError"

        listing = run_d2r("audit", "--event", "study-failed", env=s.env)
        assert listing.returncode == 0, listing.stderr
        assert "injected fault at decode" in listing.stdout
        assert len(listing.stdout.strip().splitlines()) == len(REPORT_STAGES) + 1

        # the operator fixes the cause and runs the study again
        faults.write_text("{}")
        uid = uid_of["predict"]
        res = run_d2r("retry", "--reprocess", uid, env=s.env)
        assert res.returncode == 0, res.stderr
        s.wait_states([uid], {"done"}, timeout=90)
        assert len(s.sr_classes(uid)) == 2  # TID 1500 + text SR, once
        assert [e.kind for e in s.store.events(uid)].count("reported") == 1
        view = s.view(uid)
        assert view is not None and view.attempts == 1 and view.generation == 2
    finally:
        s.stop()


def test_status_stuck_lists_a_study_that_stays_in_its_state(
    orthanc_factory: Any, model_dir: Path, tmp_path: Path
) -> None:
    node_http = free_port()
    s: Stack = make_stack(orthanc_factory, model_dir, tmp_path, D2R_HTTP_PORT=str(node_http))
    try:
        s.start_node()  # no worker: the study stays queued
        (ds,) = [make_dx(None, rows=64, cols=64, seed=790)]
        assert send_datasets(s.node_port, [ds])
        uid = str(ds.StudyInstanceUID)
        wait_for(lambda: s.state(uid) == "queued", 60, "queued")
        wait_for(
            lambda: (
                (
                    sample_value(_metrics(node_http), "d2r_oldest_unfinished_study_age_seconds")
                    or 0.0
                )
                >= 2.0
            ),
            30,
            "the oldest-unfinished gauge to grow",
        )
        listing = run_d2r("status", "--stuck", "1", env=s.env)
        assert listing.returncode == 0 and uid in listing.stdout and "queued" in listing.stdout
        fresh = run_d2r("status", "--stuck", "--json", env=s.env)  # default 900 s
        assert json.loads(fresh.stdout) == []
    finally:
        s.stop()
