"""The HTTP endpoint (probes, metrics, pages), its settings, and ``d2r audit``'s filters."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from prometheus_client import CollectorRegistry

from cli.commands.audit import matches, parse_since
from d2r_core.errors import ConfigError
from observability import metrics
from observability.http import ObservabilityServer
from observability.pages import StatusPages
from observability.settings import ObservabilitySettings
from studydb.store import StudyStore
from tests.observability.conftest import record_for


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return rsp.status, rsp.headers["Content-Type"], rsp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_endpoints(store: StudyStore, dx: tuple[pydicom.Dataset, Path]) -> None:
    image, path = dx
    store.record_instance(record_for(image, path), outcome="stored")
    registry = CollectorRegistry()
    registry.register(metrics.StudiesByStateCollector(store.count_by_state))
    broker_up = {"value": False}

    def broker() -> None:
        if not broker_up["value"]:
            raise ConnectionError("broker down")

    server = ObservabilityServer(
        "127.0.0.1",
        0,
        registry=registry,
        health={"database": lambda: None},
        ready={"broker": broker},
        pages=StatusPages(store),
    ).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        status, kind, body = _get(base + "/readyz")
        assert status == 503 and kind == "application/json"
        assert json.loads(body) == {
            "status": "fail",
            "checks": {"broker": "fail"},
            # loopback without D2R_HTTP_AUTH=required: every caller is a known one
            "errors": {"broker": "ConnectionError: broker down"},
        }
        broker_up["value"] = True
        assert _get(base + "/readyz")[0] == 200
        assert json.loads(_get(base + "/healthz")[2])["status"] == "ok"
        status, kind, body = _get(base + "/metrics")
        assert status == 200 and kind.startswith("text/plain")
        assert 'd2r_studies{state="receiving"} 1.0' in body.decode()
        status, kind, body = _get(base + "/")
        assert status == 200 and image.StudyInstanceUID in body.decode()
        assert "SYNTHETIC" not in body.decode()  # no patient name by default
        status, _, body = _get(f"{base}/studies/{image.StudyInstanceUID}")
        assert status == 200 and "preview.png" in body.decode()
        status, kind, body = _get(f"{base}/studies/{image.StudyInstanceUID}/preview.png")
        assert status == 200 and kind == "image/png" and body.startswith(b"\x89PNG")
        assert _get(f"{base}/studies/9.9.9")[0] == 404
        assert _get(f"{base}/nothing")[0] == 404
    finally:
        server.stop()


def test_status_page_phi_on_request(store: StudyStore, dx: tuple[pydicom.Dataset, Path]) -> None:
    image, path = dx
    store.record_instance(record_for(image, path), outcome="stored")
    assert str(image.PatientID) in StatusPages(store, show_phi=True).index()
    assert str(image.PatientID) not in StatusPages(store).index()


def test_settings_defaults_and_errors(tmp_path: Path) -> None:
    s = ObservabilitySettings.from_env({"D2R_SPOOL_DIR": str(tmp_path / "spool")})
    assert (s.http_host, s.http_port, s.log_format, s.status_page_phi) == (
        "127.0.0.1",
        8080,
        "text",
        False,
    )
    assert s.audit_log == tmp_path / "audit.jsonl"
    assert ObservabilitySettings.from_env({"D2R_HTTP_PORT": "0"}).http_port == 0
    for name, value in [
        ("D2R_HTTP_PORT", "70000"),
        ("D2R_HTTP_PORT", "http"),
        ("D2R_LOG_FORMAT", "xml"),
        ("D2R_STATUS_PAGE_PHI", "maybe"),
        ("D2R_AUDIT_FSYNC", "2"),
        ("D2R_AUDIT_LOG", str(tmp_path)),
    ]:
        with pytest.raises(ConfigError) as info:
            ObservabilitySettings.from_env({name: value})
        assert info.value.setting == name


def test_audit_filters() -> None:
    now = datetime(2026, 1, 2, 12, tzinfo=UTC)
    line = {"time": "2026-01-02T11:30:00.000+00:00", "event": "sent", "study_instance_uid": "1.2"}
    assert matches(line, study="1.2", since=parse_since("1h", now), event="sent")
    assert not matches(line, study="1.3", since=None, event=None)
    assert not matches(line, study=None, since=parse_since("10m", now), event=None)
    assert not matches(line, study=None, since=None, event="received")
    assert parse_since("2026-01-02T11:00:00") == datetime(2026, 1, 2, 11, tzinfo=UTC)
