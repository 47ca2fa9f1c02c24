"""The PACS round trip against real peers.

Orthanc (the PACS) sends a chest radiograph to ``d2r`` over C-STORE; D2R-Net runs in a real
worker; the Structured Reports come back into Orthanc in the same study. Both topologies:
the production split (``d2r node`` + ``d2r worker`` as a real Celery worker process over a real
Redis) and ``d2r serve`` (embedded queue). Nothing in the product path is faked. The production
split runs the bundled demo model on an abnormal phantom study, so its lesion boxes (those the
findings state) travel to the PACS; ``d2r serve`` runs a small randomly initialised checkpoint on
the real chest CR, whose text is meaningless but real model output.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from tests.support.dicom_files import rg1_path
from tests.support.orthanc import OrthancServer
from tests.support.phantom import DEMO_MODEL, phantom_study_file
from tests.support.processes import (
    Process,
    base_env,
    d2r_cmd,
    free_port,
    run_d2r,
    start_redis,
    wait_for,
    wait_port,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def _status(env: dict[str, str], study_uid: str) -> dict[str, Any]:
    res = run_d2r("status", "--json", study_uid, env=env)
    assert res.returncode == 0, res.stderr
    status: dict[str, Any] = json.loads(res.stdout)
    return status


def _sr_instances(orthanc: OrthancServer, study_uid: str) -> list[dict[str, Any]]:
    return [i for i in orthanc.find_instances(study_uid) if i.get("Modality") == "SR"]


def _dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True)
    return [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]


def _check_reports(
    orthanc: OrthancServer,
    study_uid: str,
    status: dict[str, Any],
    tmp: Path,
    source_path: Path | None = None,
) -> None:
    """The SRs in the PACS: same study, valid, and carrying exactly what the worker recorded."""
    srs = _sr_instances(orthanc, study_uid)
    classes = sorted(i["SOPClassUID"] for i in srs)
    assert classes == sorted([COMPREHENSIVE_SR, BASIC_TEXT_SR]), srs
    source = pydicom.dcmread(source_path or rg1_path(), stop_before_pixels=True)
    for inst in srs:
        path = tmp / f"{inst['SOPInstanceUID']}.dcm"
        path.write_bytes(orthanc.instance_file(inst["ID"]))
        assert _dciodvfy_errors(path) == []
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == study_uid
        assert ds.PatientID == source.PatientID
        assert ds.VerificationFlag == "UNVERIFIED"
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        if inst["SOPClassUID"] != COMPREHENSIVE_SR:
            continue
        sr = hd.sr.ComprehensiveSR.from_dataset(ds)
        groups = sr.content.get_planar_roi_measurement_groups()  # type: ignore[attr-defined]
        assert len(groups) == status["lesion_count"]
        for group in groups:
            region = group.roi
            assert region is not None
            points = region.value
            assert (points[0] == points[-1]).all() and len(points) == 5
            assert (points[:, 0] >= 0).all() and (points[:, 0] <= source.Columns).all()
            assert (points[:, 1] >= 0).all() and (points[:, 1] <= source.Rows).all()
            refs = region.ContentSequence[0].ReferencedSOPSequence[0]
            assert refs.ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert refs.ReferencedSOPClassUID == source.SOPClassUID
        texts = {
            item.ConceptNameCodeSequence[0].CodeValue: item.TextValue
            for item in _walk(ds)
            if item.ValueType == "TEXT"
        }
        assert texts["121070"] == (status["findings"] or "No findings generated.")
        assert texts["121073"] == (status["impression"] or "No impression generated.")


def _walk(ds: pydicom.Dataset):  # type: ignore[no-untyped-def]
    for item in getattr(ds, "ContentSequence", []):
        yield item
        yield from _walk(item)


@pytest.fixture
def model_env(model_dir: Path, tmp_path: Path) -> dict[str, str]:
    return base_env(
        D2R_MODEL=str(model_dir),
        D2R_SPOOL_DIR=str(tmp_path / "data" / "spool"),
        D2R_DATABASE_URL=f"sqlite:///{tmp_path / 'data' / 'd2r.db'}",
        D2R_AE_TITLE="D2R",
        D2R_STUDY_QUIET_SECONDS="1",
        D2R_RECONCILE_SECONDS="2",
        D2R_SEND_RETRY_DELAY="0.5",
        D2R_MIN_FREE_BYTES="0",
        D2R_LOG_LEVEL="INFO",
        D2R_HTTP_PORT="0",
        # a randomly initialised model scores about 0.07: report its top boxes anyway,
        # so the lesion path (boxes -> SR -> PACS) is exercised end to end
        D2R_LESION_MIN_SCORE="0",
    )


def _stop_all(*procs: Process | None) -> None:
    for p in procs:
        if p is not None:
            p.stop()


def test_production_split_round_trip_through_orthanc(
    orthanc_factory: Any, model_env: dict[str, str], tmp_path: Path
) -> None:
    node_port = free_port()
    orthanc = orthanc_factory(modalities={"d2r": ("D2R", "127.0.0.1", node_port)})
    redis, redis_url = start_redis(tmp_path)
    # the demo model on an abnormal phantom study: boxes that its findings state reach the SR
    # (a random model's boxes are stated by no sentence, so grounding leaves them out)
    image_path = phantom_study_file(tmp_path / "phantom")
    env = dict(
        {k: v for k, v in model_env.items() if k != "D2R_LESION_MIN_SCORE"},
        D2R_MODEL=str(DEMO_MODEL),
        D2R_PORT=str(node_port),
        D2R_BROKER_URL=redis_url,
        D2R_DESTINATIONS=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
    )
    node = worker = None
    try:
        node = Process(d2r_cmd("node"), env=env, log=tmp_path / "node.log")
        worker = Process(d2r_cmd("worker"), env=env, log=tmp_path / "worker.log")
        wait_port(node_port)
        assert "celery" in worker.log_tail().lower() or worker.alive()

        uploaded = orthanc.upload(image_path)
        study_uid = pydicom.dcmread(image_path, stop_before_pixels=True).StudyInstanceUID
        result = orthanc.store_to_modality("d2r", [uploaded["ParentStudy"]])
        assert result["FailedInstancesCount"] == 0

        try:
            wait_for(lambda: len(_sr_instances(orthanc, study_uid)) >= 2, 180, "the SRs in Orthanc")
            status = wait_for(
                lambda: (s := _status(env, study_uid))["state"] == "done" and s, 30, "state done"
            )
        except TimeoutError:
            pytest.fail(f"node log:\n{node.log_tail()}\nworker log:\n{worker.log_tail()}")
        assert status["instance_count"] == 1
        assert [d["state"] for d in status["deliveries"]] == ["sent"]
        assert status["model_name"]
        assert status["lesion_count"] > 0
        _check_reports(orthanc, study_uid, status, tmp_path, image_path)

        # The same study again changes nothing: same bytes, no second copy, no second report.
        orthanc.store_to_modality("d2r", [uploaded["ParentStudy"]])
        events = wait_for(
            lambda: [e for e in _status(env, study_uid)["events"] if e["kind"] == "duplicate"],
            20,
            "the duplicate to be recorded",
        )
        assert len(events) == 1
        assert len(_sr_instances(orthanc, study_uid)) == 2
    finally:
        _stop_all(worker, node, redis)


def test_serve_round_trip_with_failed_delivery_and_retry(
    orthanc_factory: Any, model_env: dict[str, str], tmp_path: Path
) -> None:
    """``d2r serve``: storescu sends; the PACS is down, the study fails, ``d2r retry`` delivers."""
    node_port = free_port()
    pacs_port = free_port()  # nothing listens there yet: the PACS is down
    env = dict(
        model_env,
        D2R_PORT=str(node_port),
        D2R_DESTINATIONS=f"ORTHANC@127.0.0.1:{pacs_port}",
        D2R_SEND_RETRIES="2",
    )
    serve = None
    try:
        serve = Process(d2r_cmd("serve"), env=env, log=tmp_path / "serve.log")
        wait_port(node_port, timeout=60)
        res = subprocess.run(
            ["/usr/bin/storescu", "-aec", "D2R", "127.0.0.1", str(node_port), str(rg1_path())],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        study_uid = pydicom.dcmread(rg1_path(), stop_before_pixels=True).StudyInstanceUID
        try:
            status = wait_for(
                lambda: (s := _status(env, study_uid))["state"] == "failed" and s,
                240,
                "the study to fail delivery",
                interval=0.5,
            )
        except TimeoutError:
            pytest.fail(f"serve log:\n{serve.log_tail()}")
        (delivery,) = status["deliveries"]
        assert delivery["state"] == "failed" and delivery["attempts"] == 3
        kinds = [e["kind"] for e in status["events"]]
        assert kinds.count("send-retry") == 2 and "send-failed" in kinds
        listing = run_d2r("status", env=env)
        assert "failed" in listing.stdout and study_uid in listing.stdout

        # The PACS comes back on that port; an operator retries.
        orthanc = orthanc_factory(dicom_port=pacs_port)
        retry = run_d2r("retry", study_uid, env=env)
        assert retry.returncode == 0, retry.stderr
        try:
            wait_for(lambda: _status(env, study_uid)["state"] == "done", 60, "the re-send")
        except TimeoutError:
            pytest.fail(f"serve log:\n{serve.log_tail()}")
        status = _status(env, study_uid)
        _check_reports(orthanc, study_uid, status, tmp_path)
    finally:
        _stop_all(serve)


def test_serve_with_a_missing_model_names_the_setting(tmp_path: Path) -> None:
    env = base_env(D2R_SPOOL_DIR=str(tmp_path / "spool"), D2R_MODEL=str(tmp_path / "absent"))
    res = run_d2r("serve", env=env, timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "D2R_MODEL" in lines[0]


def test_invalid_setting_stops_start_with_one_line(tmp_path: Path, model_dir: Path) -> None:
    env = base_env(D2R_MODEL=str(model_dir), D2R_PORT="99999", D2R_SPOOL_DIR=str(tmp_path))
    res = run_d2r("node", env=env, timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "D2R_PORT" in lines[0]
