"""``d2r serve`` end to end, watched the way an operator does: /metrics, probes, audit, status page.

Real peers: dcmtk ``storescu`` sends an abnormal phantom study, dcmtk ``storescp`` is the PACS, the
worker runs the bundled demo model (whose boxes the findings state, so the SR has lesion groups),
headless Chromium renders the status page.
"""

from __future__ import annotations

import io
import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from observability.status_page import BOX_COLOUR, read_sr_boxes
from tests.support.phantom import DEMO_MODEL, phantom_study_file
from tests.support.processes import (
    Process,
    base_env,
    d2r_cmd,
    free_port,
    run_d2r,
    wait_for,
    wait_port,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"


NODE_NAME = "node-x"


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as rsp:
            return rsp.status, rsp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _samples(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = _get(base + "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = dict(s.labels)
            # the node serves every series with its name (D2R_NODE_NAME)
            assert labels.pop("node", None) == NODE_NAME, s
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            *args,
        ],
        capture_output=True,
        timeout=timeout,
    )


def test_serve_metrics_probes_audit_and_status_page(tmp_path: Path) -> None:
    # the demo model on an abnormal phantom study: boxes its findings state (grounded)
    image_path = phantom_study_file(tmp_path / "phantom")
    phantom = pydicom.dcmread(image_path)
    phantom.PatientBirthDate = "19700101"  # every identifying value is set, so logs can be checked
    phantom.save_as(image_path, enforce_file_format=True)
    node_port, http_port, pacs_port = free_port(), free_port(), free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    data = tmp_path / "data"
    env = base_env(
        D2R_MODEL=str(DEMO_MODEL),
        D2R_SPOOL_DIR=str(data / "spool"),
        D2R_AE_TITLE="D2R",
        D2R_PORT=str(node_port),
        D2R_HTTP_PORT=str(http_port),
        D2R_HTTP_HOST="127.0.0.1",
        D2R_DESTINATIONS=f"PACS@127.0.0.1:{pacs_port}",
        D2R_STUDY_QUIET_SECONDS="1",
        D2R_RECONCILE_SECONDS="2",
        D2R_MIN_FREE_BYTES="0",
        D2R_LOG_FORMAT="json",
        D2R_NODE_NAME=NODE_NAME,
    )
    base = f"http://127.0.0.1:{http_port}"
    source = pydicom.dcmread(image_path, stop_before_pixels=True)
    study_uid = source.StudyInstanceUID
    pacs = serve = None
    try:
        pacs = Process(
            ["/usr/bin/storescp", "-aet", "PACS", "-od", str(received), str(pacs_port)],
            env=env,
            log=tmp_path / "storescp.log",
        )
        serve = Process(d2r_cmd("serve"), env=env, log=tmp_path / "serve.log")
        wait_port(pacs_port)
        wait_port(node_port, timeout=90)
        wait_port(http_port, timeout=30)
        assert _get(base + "/healthz")[0] == 200

        res = subprocess.run(
            [
                "/usr/bin/storescu",
                "-aet",
                "MODALITY",
                "-aec",
                "D2R",
                "127.0.0.1",
                str(node_port),
                str(image_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        try:
            wait_for(
                lambda: _value(_samples(base), "d2r_studies", state="done") == 1,
                240,
                "the study to be done",
                interval=0.5,
            )
            wait_for(lambda: _get(base + "/readyz")[0] == 200, 30, "/readyz 200")
        except TimeoutError:
            pytest.fail(f"serve log:\n{serve.log_tail()}\nreadyz: {_get(base + '/readyz')}")

        # ---- the listener process never loads torch; its worker child, which ran the model, does
        children = [  # the worker is started by a thread of the listener process
            pid
            for task in Path(f"/proc/{serve.pid}/task").iterdir()
            for pid in (task / "children").read_text().split()
        ]
        assert len(children) == 1
        assert "libtorch" not in Path(f"/proc/{serve.pid}/maps").read_text()
        assert "libtorch" in Path(f"/proc/{children[0]}/maps").read_text()

        # ---- metrics: what was sent, and nothing else
        m = _samples(base)
        dest = f"PACS@127.0.0.1:{pacs_port}"
        assert _value(m, "d2r_associations_total", result="accepted", reason="") == 1
        assert _value(m, "d2r_instances_received_total", outcome="stored") == 1
        assert _value(m, "d2r_studies", state="done") == 1
        assert sum(v for (n, _), v in m.items() if n == "d2r_studies") == 1
        assert _value(m, "d2r_send_attempts_total", destination=dest) == 1
        assert _value(m, "d2r_send_failures_total", destination=dest, kind="transient") == 0
        assert _value(m, "d2r_study_end_to_end_seconds_count") == 1
        assert _value(m, "d2r_inference_seconds_count") == 1
        assert _value(m, "d2r_reports_total", result="reported") == 1
        assert _value(m, "d2r_queue_depth", queue="d2r.report") == 0
        assert any(n == "d2r_model_info" and v == 1 for (n, _), v in m.items())
        for probe in ("/healthz", "/readyz"):
            status, body = _get(base + probe)
            assert status == 200 and json.loads(body)["status"] == "ok", body

        # ---- the default backend (D2R_BACKEND=auto): the checked ONNX export, named everywhere
        backends = [dict(labels) for (n, labels), v in m.items() if n == "d2r_backend_info" and v]
        assert backends == [
            {"backend": "onnxruntime", "device": "cpu", "policy": "auto", "fallback": "none"}
        ]
        assert _value(m, "d2r_backend_fallbacks_total", reason="parity_failed") == 0
        details = json.loads(_get(base + "/readyz")[1])["details"]  # loopback: a local caller
        assert details == {"backend": "onnxruntime on cpu (auto)"}
        assert "inference backend: onnxruntime on cpu (D2R_BACKEND=auto: ONNX export of" in (
            serve.log_tail(10_000_000)
        )

        # ---- audit: the association, the received object, the SR objects sent
        status_json = json.loads(run_d2r("status", "--json", study_uid, env=env).stdout)
        sr_files = sorted(received.iterdir())
        sent_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in sr_files}
        assert len(sent_uids) == len(status_json["result_paths"]) == 3  # 2 SRs and the GSPS
        # the TID 4019 algorithm parameters of the grounded SR name the backend that ran
        assert any(
            b"backend: onnxruntime on cpu (D2R_BACKEND=auto" in p.read_bytes() for p in sr_files
        )
        audit = run_d2r("audit", "--json", env=env)
        assert audit.returncode == 0, audit.stderr
        lines = [json.loads(x) for x in audit.stdout.splitlines()]
        (assoc,) = [x for x in lines if x["event"] == "association"]
        assert (assoc["calling_ae_title"], assoc["called_ae_title"], assoc["result"]) == (
            "MODALITY",
            "D2R",
            "accepted",
        )
        assert assoc["peer_address"] == "127.0.0.1" and assoc["instances"] == 1
        (got,) = [x for x in lines if x["event"] == "received"]
        assert got["sop_instance_uid"] == source.SOPInstanceUID
        assert got["study_instance_uid"] == study_uid and got["outcome"] == "stored"
        assert got["status"] == "0x0000" and got["sop_class_uid"] == source.SOPClassUID
        sent = [x for x in lines if x["event"] == "sent"]
        assert {x["sop_instance_uid"] for x in sent} == sent_uids
        assert all(x["destination"] == dest and x["status"] == "0x0000" for x in sent)
        by_study = run_d2r("audit", "--study", study_uid, env=env)
        assert by_study.returncode == 0 and by_study.stdout.count(study_uid) == 4  # 1 in, 3 out

        # ---- the status page in a real browser
        dom = _chromium("--dump-dom", base + "/")
        assert study_uid in dom.stdout.decode(), dom.stderr.decode()[-2000:]
        assert "CompressedSamples" not in dom.stdout.decode()  # no PHI by default
        study_url = f"{base}/studies/{study_uid}"
        study_dom = _chromium("--dump-dom", study_url).stdout.decode()
        assert 'id="preview"' in study_dom and "done" in study_dom

        status, png = _get(study_url + "/preview.png")
        assert status == 200
        preview = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        scale = 512 / max(source.Rows, source.Columns)
        assert preview.shape[:2] == (round(source.Rows * scale), round(source.Columns * scale))
        boxes = read_sr_boxes(status_json["result_paths"])
        assert len(boxes) == status_json["lesion_count"]
        colour = np.array(BOX_COLOUR)
        is_box = (preview == colour).all(axis=-1)
        assert boxes, "the model reported no lesion: the preview check would be empty"
        for box in boxes:
            x0, y0, x1, y1 = (
                min(round(v * scale), lim - 1)
                for v, lim in zip(box.bounds, (preview.shape[1], preview.shape[0]) * 2, strict=True)
            )
            assert is_box[(y0 + y1) // 2, x0] and is_box[y0, (x0 + x1) // 2], box

        shot = tmp_path / "study.png"
        shot_run = _chromium(f"--screenshot={shot}", "--window-size=900,1800", study_url)
        assert shot.exists(), shot_run.stderr.decode()[-2000:]
        screen = np.asarray(Image.open(shot).convert("RGB")).astype(int)
        near = (np.abs(screen - colour) <= 8).all(axis=-1)
        assert near.any() == bool(boxes)

        # ---- logs: JSON lines, UIDs, never the patient's name, ID or birth date
        log_text = serve.log_tail(10_000_000)
        assert study_uid in log_text
        phi = [str(source.PatientName), str(source.PatientID), str(source.PatientBirthDate)]
        for value in phi:
            assert value and value not in log_text
    finally:
        for p in (serve, pacs):
            if p is not None:
                p.stop()
