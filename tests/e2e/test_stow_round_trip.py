"""Orthanc sends a study to ``d2r`` over DICOMweb STOW-RS; the SRs come back over C-STORE.

Orthanc's DICOMweb plugin is the STOW-RS client, configured as an archive would be: a
``DicomWeb.Servers`` entry with d2r's ``/dicom-web/`` URL and an ingest bearer token, and its
``/dicom-web/servers/{name}/stow`` call. ``d2r node`` (loopback HTTP with credentials required)
and a real Celery worker over a real Redis do the rest, as in :mod:`tests.e2e.test_round_trip`.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pydicom
import pytest

from observability.audit import read_audit
from tests.e2e.test_round_trip import _check_reports, _sr_instances, _status, _stop_all
from tests.e2e.test_round_trip import model_env as model_env  # noqa: F401 - the fixture
from tests.support.dicom_files import rg1_path
from tests.support.processes import (
    Process,
    d2r_cmd,
    free_port,
    start_redis,
    wait_for,
    wait_port,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_orthanc_stow_rs_into_d2r_and_the_reports_come_back(
    orthanc_factory: Any, model_env: dict[str, str], tmp_path: Path
) -> None:
    node_port, http_port = free_port(), free_port()
    token = secrets.token_urlsafe(24)
    tokens_file = tmp_path / "http-tokens"
    tokens_file.write_text(f"orthanc ingest {token}\n")
    orthanc = orthanc_factory(
        dicomweb=True,
        dicomweb_servers={
            "d2r": {
                "Url": f"http://127.0.0.1:{http_port}/dicom-web/",
                "HttpHeaders": {"Authorization": f"Bearer {token}"},
            }
        },
    )
    redis, redis_url = start_redis(tmp_path)
    audit_log = tmp_path / "data" / "audit.jsonl"
    env = dict(
        model_env,
        D2R_PORT=str(node_port),
        D2R_HTTP_PORT=str(http_port),
        D2R_HTTP_AUTH="required",
        D2R_HTTP_TOKENS_FILE=str(tokens_file),
        D2R_AUDIT_LOG=str(audit_log),
        D2R_BROKER_URL=redis_url,
        D2R_DESTINATIONS=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
    )
    node = worker = None
    try:
        node = Process(d2r_cmd("node"), env=env, log=tmp_path / "node.log")
        worker = Process(d2r_cmd("worker"), env=env, log=tmp_path / "worker.log")
        wait_port(node_port)
        wait_port(http_port)

        uploaded = orthanc.upload(rg1_path())
        source = pydicom.dcmread(rg1_path(), stop_before_pixels=True)
        study_uid = str(source.StudyInstanceUID)
        answer = orthanc.post_json(
            "/dicom-web/servers/d2r/stow", {"Resources": [uploaded["ParentStudy"]]}
        )
        assert answer is not None
        try:
            wait_for(lambda: len(_sr_instances(orthanc, study_uid)) >= 2, 180, "the SRs in Orthanc")
            status = wait_for(
                lambda: (s := _status(env, study_uid))["state"] == "done" and s, 30, "state done"
            )
        except TimeoutError:
            pytest.fail(f"node log:\n{node.log_tail()}\nworker log:\n{worker.log_tail()}")
        assert status["instance_count"] == 1
        assert [d["state"] for d in status["deliveries"]] == ["sent"]
        _check_reports(orthanc, study_uid, status, tmp_path)
        received = [e for e in read_audit(audit_log) if e["event"] == "received"]
        assert [
            (e["sop_instance_uid"], e["outcome"], e["calling_ae_title"], e["user"])
            for e in received
        ] == [(str(source.SOPInstanceUID), "stored", "STOW-RS", "orthanc")]

        # The same study again over STOW-RS: stored once, reported once.
        orthanc.post_json("/dicom-web/servers/d2r/stow", {"Resources": [uploaded["ParentStudy"]]})
        wait_for(
            lambda: [e for e in _status(env, study_uid)["events"] if e["kind"] == "duplicate"],
            20,
            "the duplicate to be recorded",
        )
        assert len(_sr_instances(orthanc, study_uid)) == 2
    finally:
        _stop_all(worker, node, redis)
