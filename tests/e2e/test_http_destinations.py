"""DICOMweb and FHIR destinations in the production topology: ``d2r node`` + ``d2r worker`` over
a real Redis, a real model, and the destinations as real servers (Orthanc with its DICOMweb
plugin; the FHIR R4 test server) that are down, then back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.stack import (
    BASIC_TEXT_SR,
    COMPREHENSIVE_SR,
    Stack,
    make_stack,
    send_datasets,
)
from tests.support import fhir_server
from tests.support.dicom_files import make_dx
from tests.support.processes import free_port, run_d2r, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _attempts(s: Stack, study_uid: str) -> int:
    view = s.view(study_uid)
    return 0 if view is None or not view.deliveries else view.deliveries[0].attempts


def test_dicomweb_archive_down_then_back_failed_then_retried(
    orthanc_factory: Any, model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there yet: the archive is down
    s = make_stack(
        None,
        model_dir,
        tmp_path,
        D2R_DESTINATIONS=f"dicomweb+http://127.0.0.1:{port}/dicom-web",
        D2R_SEND_RETRIES="4",
        D2R_SEND_RETRY_DELAY="1",
    )
    try:
        s.start_node()
        s.start_worker()
        failing = make_dx(None, rows=96, cols=80, seed=901)
        failing_uid = str(failing.StudyInstanceUID)
        assert send_datasets(s.node_port, [failing]) == [str(failing.SOPInstanceUID)]
        s.wait_states([failing_uid], {"failed"}, 240)
        view = s.view(failing_uid)
        assert view is not None and view.deliveries[0].attempts == 5
        assert "transient" in (view.deliveries[0].last_error or "")

        # A second study while the archive is still down: visible retries, then it comes back.
        late = make_dx(None, rows=96, cols=80, seed=902)
        late_uid = str(late.StudyInstanceUID)
        assert send_datasets(s.node_port, [late]) == [str(late.SOPInstanceUID)]
        wait_for(lambda: _attempts(s, late_uid) >= 2, 120, "two failed attempts")
        assert s.state(late_uid) == "sending"
        orthanc = s.orthanc = orthanc_factory(dicomweb=True, http_port=port)
        s.wait_states([late_uid], {"done"}, 60)
        assert s.sr_classes(late_uid) == sorted([COMPREHENSIVE_SR, BASIC_TEXT_SR])
        srs = [i for i in orthanc.find_instances(late_uid) if i.get("Modality") == "SR"]
        assert {i["StudyInstanceUID"] for i in srs} == {late_uid}
        # the presentation state (D2R_OUTPUTS default) is stored over STOW-RS too
        states = [i for i in orthanc.find_instances(late_uid) if i.get("Modality") == "PR"]
        assert [i["SOPClassUID"] for i in states] == ["1.2.840.10008.5.1.4.1.1.11.1"]

        # The failed study is retried by the operator and delivered.
        retry = run_d2r("retry", failing_uid, env=s.env)
        assert retry.returncode == 0, retry.stderr
        s.wait_states([failing_uid], {"done"}, 60)
        assert s.sr_classes(failing_uid) == sorted([COMPREHENSIVE_SR, BASIC_TEXT_SR])
        audit = [json.loads(line) for line in Path(s.env["D2R_AUDIT_LOG"]).read_text().splitlines()]
        sent = [
            a for a in audit if a.get("event") == "sent" and a.get("destination_type") == "dicomweb"
        ]
        assert any(a.get("status") == "0x0000" for a in sent)
    finally:
        s.stop()


def test_fhir_server_down_then_back(model_dir: Path, tmp_path: Path) -> None:
    if not fhir_server.installed():
        pytest.skip("FHIR test server not installed (tests/support/install-fhir-server.sh)")
    port = free_port()
    s = make_stack(
        None,
        model_dir,
        tmp_path,
        D2R_DESTINATIONS=f"fhir+http://127.0.0.1:{port}",
        D2R_SEND_RETRIES="6",
        D2R_SEND_RETRY_DELAY="1",
    )
    server = None
    try:
        s.start_node()
        s.start_worker()
        study = make_dx(None, rows=96, cols=80, seed=903)
        uid = str(study.StudyInstanceUID)
        assert send_datasets(s.node_port, [study]) == [str(study.SOPInstanceUID)]
        wait_for(lambda: _attempts(s, uid) >= 2, 240, "two failed attempts")
        assert s.state(uid) == "sending"
        server = fhir_server.FhirServer(tmp_path / "fhir.log", port=port)
        s.wait_states([uid], {"done"}, 120)
        reports = server.search("DiagnosticReport?status=preliminary")
        assert len(reports) == 1
        assert reports[0]["identifier"][1]["value"].startswith("urn:oid:")
        studies = server.search("ImagingStudy?identifier=urn:dicom:uid|urn:oid:" + uid)
        assert len(studies) == 1
    finally:
        if server is not None:
            server.stop()
        s.stop()
