"""The audit log, the JSON log format, and both fed by a real listener (dcmtk storescu -> SCP)."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from dicom_node.scp import start_server
from dicom_node.settings import NodeSettings
from dicom_node.spool import Spool
from observability import logs
from observability.audit import ASSOCIATION, RECEIVED, SENT, AuditLog, ListenerAudit, read_audit
from studydb.store import StudyStore
from tests.support.dicom_files import make_dx
from tests.support.processes import free_port

STORESCU = "/usr/bin/storescu"
PHI = {"PatientName": "Doe^Jane^Quinn", "PatientID": "PHI-7Q3Z9", "PatientBirthDate": "19610423"}


def test_audit_lines_are_appended_never_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    log = AuditLog(path)
    log.record(ASSOCIATION, calling_ae_title="MOD", result="accepted")
    log.record(RECEIVED, sop_instance_uid="1.2.3", study_instance_uid="1.2", status="0x0000")
    first = path.read_bytes()
    assert fcntl.fcntl(log._descriptor(), fcntl.F_GETFL) & os.O_APPEND
    log.close()
    again = AuditLog(path)  # a restart appends to the same file
    again.record(SENT, sop_instance_uid="1.2.4", destination="PACS@h:104", status="0x0000")
    again.close()
    data = path.read_bytes()
    assert data.startswith(first) and len(data) > len(first)
    lines = list(read_audit(path))
    assert [x["event"] for x in lines] == ["association", "received", "sent"]
    for line in lines:
        assert {"time", "event", "pid"} <= set(line)
    assert lines[1]["sop_instance_uid"] == "1.2.3" and lines[2]["destination"] == "PACS@h:104"
    with pytest.raises(ValueError, match="event"):
        again.record("deleted")


def test_concurrent_writers_keep_lines_whole(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    logs_ = [AuditLog(path) for _ in range(4)]  # separate descriptors, as node and worker

    def write(log: AuditLog, n: int) -> None:
        for i in range(50):
            log.record(RECEIVED, sop_instance_uid=f"1.2.{n}.{i}", reason="x" * 500)

    threads = [threading.Thread(target=write, args=(log, n)) for n, log in enumerate(logs_)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 200
    assert len({json.loads(line)["sop_instance_uid"] for line in lines}) == 200


def test_json_formatter_carries_context_ids() -> None:
    record = logging.LogRecord(
        "d2r.x", logging.INFO, __file__, 1, "study %s queued", ("1.2.3",), None
    )
    with logs.bind(study_instance_uid="1.2.3", task_id="task-9"):
        with logs.bind(sop_instance_uid="1.2.3.4"):
            logs.ContextFilter().filter(record)
            line = json.loads(logs.JsonFormatter().format(record))
        assert logs.current_context() == {"study_instance_uid": "1.2.3", "task_id": "task-9"}
    assert logs.current_context() == {}
    assert line["message"] == "study 1.2.3 queued"
    assert line["level"] == "INFO" and line["logger"] == "d2r.x" and "time" in line
    assert line["study_instance_uid"] == "1.2.3"
    assert line["sop_instance_uid"] == "1.2.3.4"
    assert line["task_id"] == "task-9"


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Root logging as a d2r process configures it (JSON, DEBUG), into a buffer."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("pynetdicom").level)
    logs.configure_logging("DEBUG", "json")
    buffer = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    yield buffer
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])
    logging.getLogger("pynetdicom").setLevel(saved[2])


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.integration
def test_listener_audits_counts_and_logs_without_phi(
    tmp_path: Path, captured_logs: io.StringIO
) -> None:
    image = tmp_path / "phi.dcm"
    ds = make_dx(image, rows=64, cols=48)
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.save_as(image, enforce_file_format=True)

    settings = NodeSettings.from_env(
        {
            "D2R_AE_TITLE": "D2RAUDIT",
            "D2R_HOST": "127.0.0.1",
            "D2R_PORT": str(free_port()),
            "D2R_SPOOL_DIR": str(tmp_path / "spool"),
            "D2R_MIN_FREE_BYTES": "0",
        }
    )
    store = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    audit_path = tmp_path / "audit.jsonl"
    audit = ListenerAudit(AuditLog(audit_path))
    before = {
        "accepted": _sample("d2r_associations_total", {"result": "accepted", "reason": ""}),
        "rejected": _sample(
            "d2r_associations_total", {"result": "rejected", "reason": "called_ae_not_recognised"}
        ),
        "stored": _sample("d2r_instances_received_total", {"outcome": "stored"}),
        "duplicate": _sample("d2r_instances_received_total", {"outcome": "duplicate"}),
    }
    server = start_server(
        settings,
        Spool(settings.spool_dir, min_free_bytes=0),
        audit.recorder(store),
        block=False,
        extra_handlers=audit.handlers(),
    )
    assert server is not None
    try:
        port = str(settings.port)
        for _ in range(2):  # the second time a duplicate
            res = subprocess.run(
                [STORESCU, "-aet", "MODALITY", "-aec", "D2RAUDIT", "127.0.0.1", port, str(image)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert res.returncode == 0, res.stderr
        res = subprocess.run(
            [STORESCU, "-aet", "MODALITY", "-aec", "SOMEONE", "127.0.0.1", port, str(image)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode != 0
    finally:
        server.shutdown()
        store.close()

    lines = list(read_audit(audit_path))
    received = [x for x in lines if x["event"] == "received"]
    assert [x["outcome"] for x in received] == ["stored", "duplicate"]
    for x in received:
        assert x["sop_instance_uid"] == ds.SOPInstanceUID
        assert x["study_instance_uid"] == ds.StudyInstanceUID
        assert x["sop_class_uid"] == ds.SOPClassUID
        assert x["calling_ae_title"] == "MODALITY" and x["status"] == "0x0000"
    associations = [x for x in lines if x["event"] == "association"]
    assert [(a["result"], a["reason"]) for a in associations] == [
        ("accepted", "released"),
        ("accepted", "released"),
        ("rejected", "called_ae_not_recognised"),
    ]
    assert all(
        a["calling_ae_title"] == "MODALITY" and a["peer_address"] == "127.0.0.1"
        for a in associations
    )
    assert [a["instances"] for a in associations] == [1, 1, 0]
    assert associations[2]["called_ae_title"] == "SOMEONE"
    assert associations[0]["start"] <= associations[0]["end"]

    assert (
        _sample("d2r_associations_total", {"result": "accepted", "reason": ""})
        == before["accepted"] + 2
    )
    assert (
        _sample(
            "d2r_associations_total", {"result": "rejected", "reason": "called_ae_not_recognised"}
        )
        == before["rejected"] + 1
    )
    assert _sample("d2r_instances_received_total", {"outcome": "stored"}) == before["stored"] + 1
    assert (
        _sample("d2r_instances_received_total", {"outcome": "duplicate"}) == before["duplicate"] + 1
    )

    output = captured_logs.getvalue()
    assert output.strip(), "the listener logged nothing"
    for line in output.splitlines():
        json.loads(line)  # one JSON object per line
    assert ds.SOPInstanceUID in output  # UIDs are logged ...
    audit_text = audit_path.read_text()
    for value in PHI.values():  # ... patient data never
        assert value not in output
        assert value not in audit_text
    assert "Doe" not in output and "Jane" not in output
