"""Metrics hooks, the studies-by-state collector and the queue depth collector."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from d2r_core import statuses
from observability import metrics
from studydb.records import DONE, STUDY_STATES, Delivery, StudyView
from studydb.store import StudyStore
from tests.observability.conftest import record_for
from tests.support.dicom_files import make_dx


def _value(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_hooks_move_counters() -> None:
    before = {
        "acc": _value("d2r_associations_total", {"result": "accepted", "reason": ""}),
        "rej": _value(
            "d2r_associations_total", {"result": "rejected", "reason": "called_ae_not_recognised"}
        ),
        "stored": _value("d2r_instances_received_total", {"outcome": "stored"}),
        "dup": _value("d2r_instances_received_total", {"outcome": "duplicate"}),
        "full": _value("d2r_instances_rejected_total", {"reason": "out_of_resources"}),
        "send": _value("d2r_send_attempts_total", {"destination": "P@h:1"}),
        "fail": _value("d2r_send_failures_total", {"destination": "P@h:1", "kind": "transient"}),
        "retry": _value("d2r_send_retries_total", {"destination": "P@h:1"}),
        "inf": _value("d2r_inference_seconds_count"),
    }
    metrics.observe_association(True)
    metrics.observe_association(False, "called_ae_not_recognised")
    metrics.observe_store_response(statuses.SUCCESS, "stored")
    metrics.observe_store_response(statuses.SUCCESS, "duplicate")
    metrics.observe_store_response(statuses.OUT_OF_RESOURCES, None)
    sent = _value("d2r_deliveries_total", {"type": "mllp", "outcome": "sent"})
    metrics.observe_send_attempt("P@h:1", kind="dicom", ok=True, failure=None, retry=False)
    metrics.observe_send_attempt("P@h:1", kind="dicom", ok=False, failure="transient", retry=True)
    metrics.observe_send_attempt("mllp://ris:2575", kind="mllp", ok=True, failure=None, retry=False)
    assert _value("d2r_deliveries_total", {"type": "mllp", "outcome": "sent"}) == sent + 1
    metrics.observe_inference(0.3)
    assert (
        _value("d2r_associations_total", {"result": "accepted", "reason": ""}) == before["acc"] + 1
    )
    assert (
        _value(
            "d2r_associations_total", {"result": "rejected", "reason": "called_ae_not_recognised"}
        )
        == before["rej"] + 1
    )
    assert _value("d2r_instances_received_total", {"outcome": "stored"}) == before["stored"] + 1
    assert _value("d2r_instances_received_total", {"outcome": "duplicate"}) == before["dup"] + 1
    assert (
        _value("d2r_instances_rejected_total", {"reason": "out_of_resources"}) == before["full"] + 1
    )
    assert _value("d2r_send_attempts_total", {"destination": "P@h:1"}) == before["send"] + 2
    assert (
        _value("d2r_send_failures_total", {"destination": "P@h:1", "kind": "transient"})
        == before["fail"] + 1
    )
    assert _value("d2r_send_retries_total", {"destination": "P@h:1"}) == before["retry"] + 1
    assert _value("d2r_inference_seconds_count") == before["inf"] + 1


def test_rejection_reason_uses_the_status_range() -> None:
    assert metrics.rejection_reason(0xA701) == "out_of_resources"
    assert metrics.rejection_reason(0xC123) == "cannot_understand"
    assert metrics.rejection_reason(statuses.SOP_CLASS_NOT_SUPPORTED) == "sop_class_not_supported"
    assert metrics.rejection_reason(0x0999) == "status_0x0999"


def test_studies_by_state_collector_matches_the_database(store: StudyStore, tmp_path: Path) -> None:
    for i in range(3):
        path = tmp_path / f"i{i}.dcm"
        ds = make_dx(path, rows=32, cols=32, seed=i)
        store.record_instance(record_for(ds, path), outcome="stored")
    uids = [v.study_instance_uid for v in store.recent()]
    assert store.mark_queued(uids[0]) == 1
    store.mark_skipped(uids[1], "lateral only")
    registry = CollectorRegistry()
    registry.register(metrics.StudiesByStateCollector(store.count_by_state))
    counts = store.count_by_state()
    for state in STUDY_STATES:
        assert registry.get_sample_value("d2r_studies", {"state": state}) == counts[state]
    assert registry.get_sample_value("d2r_studies", {"state": "queued"}) == 1
    assert registry.get_sample_value("d2r_studies", {"state": "skipped"}) == 1
    assert registry.get_sample_value("d2r_studies", {"state": "receiving"}) == 1


def test_collector_survives_a_database_error() -> None:
    def broken() -> dict[str, int]:
        raise OSError("database is down")

    registry = CollectorRegistry()
    registry.register(metrics.StudiesByStateCollector(broken))
    assert b"d2r_studies" not in generate_latest(registry)


def test_queue_depth_of_the_filesystem_broker(tmp_path: Path) -> None:
    messages = tmp_path / "queue" / "messages"
    messages.mkdir(parents=True)
    for i in range(3):
        (messages / f"{i}_abc{i}.d2r.report.msg").write_bytes(b"{}")
    (messages / "9_x.d2r.send.msg").write_bytes(b"{}")
    (messages / "unrelated.txt").write_bytes(b"")
    collector = metrics.QueueDepthCollector(
        "filesystem://", tmp_path / "queue", ("d2r.report", "d2r.send")
    )
    registry = CollectorRegistry()
    registry.register(collector)
    assert registry.get_sample_value("d2r_queue_depth", {"queue": "d2r.report"}) == 3
    assert registry.get_sample_value("d2r_queue_depth", {"queue": "d2r.send"}) == 1
    collector.ping()


def _done(deliveries: tuple[Delivery, ...]) -> StudyView:

    now = time.time()
    return replace(
        StudyView(
            study_instance_uid="1.2",
            state=DONE,
            reason=None,
            generation=1,
            first_received_at=now - 30,
            last_received_at=now - 29,
            queued_at=now - 20,
            processed_at=now - 5,
            finished_at=now,
            model_name="m",
            model_version="1",
            findings="",
            impression="",
            lesion_count=0,
            result_paths=(),
            instance_count=1,
            deliveries=(),
        ),
        deliveries=deliveries,
    )


def test_end_to_end_latency_is_observed_once_per_study() -> None:
    a = Delivery("A@h:1", "sent", 1, None, None, sent_at=100.0)
    b = Delivery("B@h:1", "sent", 1, None, None, sent_at=101.0)
    view = _done((a, b))
    assert metrics.study_done_latency(view, "A@h:1") is None  # not the last one sent
    seconds = metrics.study_done_latency(view, "B@h:1")
    assert seconds is not None and 29.0 < seconds < 31.0
    before = _value("d2r_study_end_to_end_seconds_count")
    metrics.observe_study_done(view, "B@h:1")
    metrics.observe_study_done(view, "A@h:1")
    assert _value("d2r_study_end_to_end_seconds_count") == before + 1


def test_model_loaded_reads_the_info_gauge() -> None:
    metrics.set_model_info("d2r-net", "9.9")
    assert metrics.model_loaded(REGISTRY)
    assert not metrics.model_loaded(CollectorRegistry())


def test_every_series_of_a_named_node_carries_its_node_label(tmp_path: Path) -> None:
    """Several active nodes behind one DICOM address: one scrape per node, told apart."""
    store = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    try:
        ds = make_dx(tmp_path / "a.dcm", rows=8, cols=8)
        store.record_instance(record_for(ds, tmp_path / "a.dcm"), outcome="stored")
        registry = CollectorRegistry()
        registry.register(metrics.StudiesByStateCollector(store.count_by_state))
        outer = CollectorRegistry(auto_describe=False)
        outer.register(metrics.NodeLabelled(registry, "node-b"))
        text = generate_latest(outer).decode()
        samples = [line for line in text.splitlines() if line and not line.startswith("#")]
        assert len(samples) == len(STUDY_STATES)
        assert all('node="node-b"' in line for line in samples)
        assert 'd2r_studies{node="node-b",state="receiving"} 1.0' in samples
        served = generate_latest(metrics.build_registry(None, node="node-a")).decode()
        served_samples = [ln for ln in served.splitlines() if ln and not ln.startswith("#")]
        assert served_samples and all('node="node-a"' in ln for ln in served_samples)
    finally:
        store.close()
