"""``d2r_queued_studies{priority}`` and the status page's priorities."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from observability import metrics
from observability.status_page import render_index
from studydb.records import StudyView
from tests.support.prometheus import sample_value


def test_queued_studies_by_priority_every_priority_present() -> None:
    registry = CollectorRegistry()
    registry.register(metrics.QueuedByPriorityCollector(lambda: {"stat": 2, "routine": 30}))
    text = generate_latest(registry).decode()
    values = {
        p: sample_value(text, "d2r_queued_studies", priority=p)
        for p in ("stat", "urgent", "routine", "low")
    }
    assert values == {"stat": 2.0, "urgent": 0.0, "routine": 30.0, "low": 0.0}


def test_a_database_outage_leaves_the_gauge_out_of_the_scrape() -> None:
    def down() -> dict[str, int]:
        raise ConnectionError("database down")

    registry = CollectorRegistry()
    registry.register(metrics.QueuedByPriorityCollector(down))
    assert "d2r_queued_studies" not in generate_latest(registry).decode()


def test_the_status_page_shows_each_priority_and_the_queued_counts() -> None:
    view = StudyView(
        study_instance_uid="1.2.3",
        state="queued",
        reason=None,
        generation=1,
        first_received_at=1000.0,
        last_received_at=1000.0,
        queued_at=1001.0,
        processed_at=None,
        finished_at=None,
        model_name=None,
        model_version=None,
        findings=None,
        impression=None,
        lesion_count=None,
        result_paths=(),
        instance_count=1,
        deliveries=(),
        priority="stat",
    )
    page = render_index([view], queued={"stat": 1, "urgent": 0, "routine": 0, "low": 0})
    assert "<span class=priority-stat>stat</span>" in page
    assert "queued by priority: stat: 1, urgent: 0, routine: 0, low: 0" in page
