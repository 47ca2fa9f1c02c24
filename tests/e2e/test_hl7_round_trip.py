"""The draft report reaches a RIS over HL7 v2: a real study through d2r to Orthanc and to an
HL7 receiver process (hl7apy's MLLP server), with every process real.

The production topology of ``tests/reliability/stack.py`` (``d2r node``, ``d2r worker`` over
Redis, Orthanc as the PACS) with ``D2R_DESTINATIONS=<Orthanc>,mllp://127.0.0.1:<port>``.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from prometheus_client.parser import text_string_to_metric_families

from delivery.hl7 import control_id, unescape
from observability.audit import SENT, read_audit
from tests.reliability.stack import COMPREHENSIVE_SR, Stack, make_stack, send_datasets
from tests.support.dicom_files import make_dx
from tests.support.hl7_receiver import Hl7Receiver
from tests.support.processes import free_port, run_d2r, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAMILY, GIVEN = "Müller", "Zoë"


def _stack(orthanc_factory: Any, model_dir: Path, tmp: Path, **env: str) -> tuple[Stack, str]:
    ris_port = free_port()
    s = make_stack(
        orthanc_factory, model_dir, tmp, D2R_LESION_MIN_SCORE="0", D2R_AE_TITLE="D2R", **env
    )
    ris = f"mllp://127.0.0.1:{ris_port}"
    s.env["D2R_DESTINATIONS"] += f",{ris}"
    return s, ris


def _study(seed: int) -> Any:
    ds = make_dx(None, rows=96, cols=80, seed=seed)
    ds.PatientName = f"{FAMILY}^{GIVEN}"
    return ds


def _deliveries(port: int, outcome: str) -> float:
    """``d2r_deliveries_total{type="mllp",outcome=...}`` on a ``/metrics`` endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "d2r_deliveries_total"
        and sample.labels == {"type": "mllp", "outcome": outcome}
    )


def _segments(text: str, name: str) -> list[Any]:
    message = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    return [c for c in message.children if c.name == name]


def _attempts(s: Stack, uid: str, destination: str) -> int:
    """Attempts of the delivery so far (0 before the study is reported)."""
    delivery = s.store.delivery(uid, destination)
    return 0 if delivery is None else delivery.attempts


def _delivery(s: Stack, uid: str, destination: str) -> Any:
    delivery = s.store.delivery(uid, destination)
    assert delivery is not None
    return delivery


def test_ris_down_then_up_gets_the_oru_after_visible_retries(
    orthanc_factory: Any, model_dir: Path, tmp_path: Path
) -> None:
    worker_http = free_port()
    s, ris_name = _stack(orthanc_factory, model_dir, tmp_path)
    ris = Hl7Receiver(tmp_path / "ris", int(ris_name.rsplit(":", 1)[1]))
    ds = _study(seed=1701)
    uid = str(ds.StudyInstanceUID)
    try:
        s.start_node()
        s.start_worker(D2R_HTTP_PORT=str(worker_http))
        assert send_datasets(s.node_port, [ds]) == [str(ds.SOPInstanceUID)]
        # the RIS is down: the HL7 delivery is retried, visibly
        try:
            wait_for(lambda: _attempts(s, uid, ris_name) >= 2, 240, "two attempts")
        except TimeoutError:
            pytest.fail(s.logs())
        retries = [e.detail for e in s.store.events(uid) if e.kind == "send-retry"]
        assert any(ris_name in d and "transient" in d for d in retries), retries
        ris.start()
        s.wait_states([uid], {"done", "failed"}, timeout=120)
        view = s.view(uid)
        assert view is not None and view.state == "done", (view, s.logs())
        assert {d.destination: d.state for d in view.deliveries} == {
            s.env["D2R_DESTINATIONS"].split(",")[0]: "sent",
            ris_name: "sent",
        }

        (text,) = ris.received()
        assert view.model_name is not None and view.model_version is not None
        expected_id = control_id(uid, view.model_name, view.model_version)
        (msh,) = _segments(text, "MSH")
        assert msh.msh_10.to_er7() == expected_id
        assert msh.msh_18.to_er7() == "UNICODE UTF-8"
        (pid,) = _segments(text, "PID")
        assert pid.pid_5.to_er7() == f"{FAMILY}^{GIVEN}"
        assert pid.pid_3.to_er7() == str(ds.PatientID)
        (obr,) = _segments(text, "OBR")
        assert obr.obr_3.to_er7() == str(ds.AccessionNumber)
        assert obr.obr_25.to_er7() == "P"
        obx = _segments(text, "OBX")
        by_text = {o.obx_3.to_er7().split("^")[1]: o for o in obx if not o.obx_4.to_er7()}
        findings = by_text["Findings"].obx_5.children[0].children[0].value.value
        assert unescape(findings) == view.findings
        tid1500 = [
            i["SOPInstanceUID"]
            for i in s.orthanc.find_instances(uid)  # type: ignore[union-attr]
            if i.get("SOPClassUID") == COMPREHENSIVE_SR
        ]
        assert by_text["SR Instance UID"].obx_5.to_er7() == f"^{tid1500[0]}^ISO"
        assert len([o for o in obx if o.obx_2.to_er7() == "CWE"]) == view.lesion_count

        sent = [
            r
            for r in read_audit(Path(s.env["D2R_AUDIT_LOG"]))
            if r["event"] == SENT and r.get("destination_type") == "mllp"
        ]
        delivered = [r for r in sent if r.get("status") == "AA"]
        assert [(r["identifier"], r["object_type"]) for r in delivered] == [
            (expected_id, "ORU^R01")
        ]
        assert len([r for r in sent if r.get("error")]) >= 2  # the failed attempts
        assert _deliveries(worker_http, "sent") == 1
        assert _deliveries(worker_http, "transient") >= 2
        log = "".join(p.log_tail(10**7) for p in [*s.workers, s.node] if p is not None)
        assert FAMILY not in log and GIVEN not in log
    finally:
        ris.stop()
        s.stop()


def test_rejections_fail_the_delivery_and_retry_destination_delivers(
    orthanc_factory: Any, model_dir: Path, tmp_path: Path
) -> None:
    worker_http = free_port()
    s, ris_name = _stack(orthanc_factory, model_dir, tmp_path, D2R_SEND_RETRIES="1")
    ris = Hl7Receiver(tmp_path / "ris", int(ris_name.rsplit(":", 1)[1]))
    ds = _study(seed=1702)
    uid = str(ds.StudyInstanceUID)
    try:
        ris.answer("AR")  # reason left open: transient, retried D2R_SEND_RETRIES times
        ris.start()
        s.start_node()
        s.start_worker(D2R_HTTP_PORT=str(worker_http))
        assert send_datasets(s.node_port, [ds]) == [str(ds.SOPInstanceUID)]
        s.wait_states([uid], {"done", "failed"}, timeout=240)
        delivery = _delivery(s, uid, ris_name)
        assert (delivery.state, delivery.attempts) == ("failed", 2), (delivery, s.logs())
        assert "transient" in delivery.last_error and "answered AR" in delivery.last_error
        assert len(ris.received()) == 2

        # an application error is permanent: one attempt, the receiver's words recorded
        ris.answer("AE")
        res = run_d2r("retry", "--destination", ris_name, uid, env=s.env)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: _attempts(s, uid, ris_name) == 1, 60, "the re-send")
        s.wait_states([uid], {"failed"}, timeout=60)
        delivery = _delivery(s, uid, ris_name)
        assert delivery.state == "failed"
        assert delivery.last_error.startswith("permanent: ")
        assert "answered AE: cannot file the result for patient ***" in delivery.last_error
        assert FAMILY not in delivery.last_error
        errors = [
            r["error"]
            for r in read_audit(Path(s.env["D2R_AUDIT_LOG"]))
            if r["event"] == SENT and r.get("destination_type") == "mllp" and r.get("error")
        ]
        # every failed attempt is audited (the worker writes a line per SR it tried to deliver)
        assert {e.split(":")[0] for e in errors} == {"transient", "permanent"}
        assert all("answered A" in e and FAMILY not in e for e in errors)
        assert _deliveries(worker_http, "permanent") == 1

        # the RIS accepts now; only this destination is sent again
        ris.answer("AA")
        res = run_d2r("retry", "--destination", ris_name, uid, env=s.env)
        assert res.returncode == 0, res.stderr
        s.wait_states([uid], {"done"}, timeout=60)
        assert _delivery(s, uid, ris_name).state == "sent"
        assert len(s.sr_classes(uid)) == 2  # the PACS got its SRs once
        received = ris.received()
        assert len(received) == 4
        assert len({_segments(t, "MSH")[0].msh_10.to_er7() for t in received}) == 1

        again = run_d2r("retry", "--destination", ris_name, uid, env=s.env)
        assert again.returncode == 1 and "nothing to retry" in again.stderr
    finally:
        ris.stop()
        s.stop()
