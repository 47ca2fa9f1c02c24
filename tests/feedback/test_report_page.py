"""The agreement report as a page and a plot, and the status page's section: figures computed
by hand, nothing fetched from elsewhere, every value escaped; (``integration``) ``d2r feedback
report --format html`` and a real ``d2r node``'s status page."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from feedback.match import receive
from feedback.oru import read_oru
from feedback.plots import agreement_svg
from feedback.report_page import render_report
from feedback.scoring import (
    Scored,
    score_pending,
    summarise_by_day,
    utc_day,
    windowed_report,
)
from observability.pages import StatusPages
from studydb.store import StudyStore
from studydb.tables import signed_reports_table
from tests.support.processes import (
    Process,
    base_env,
    d2r_cmd,
    free_port,
    run_d2r,
    start_redis,
    wait_port,
)
from tests.support.signed_reports import add_study, oru, set_draft

DAY = 86400.0
#: (study, draft, signed report, day received); the stand-in labeler below reads the words
CASES = [
    ("1.8.1", "effusion", "effusion", 0),  # agree: both positive effusion
    ("1.8.2", "effusion", "clear", 0),  # effusion AI only, No Finding radiologist only
    ("1.8.3", "abstain", "effusion", 2),  # abstained
    ("1.8.4", "clear", "effusion", 2),  # effusion radiologist only, No Finding AI only
]
LABELS = {"effusion": {"Pleural Effusion": 1}, "clear": {"No Finding": 1}}
# By hand, 3 assessed studies x 14 observations = 42 pairs, 4 disagreeing: 38/42.
# Pleural Effusion: both+ 1, both- 0, AI only 1, rad. only 1: sensitivity 0.5, PPV 0.5.
# No Finding: both+ 0, both- 1, AI only 1, rad. only 1: sensitivity 0.0, PPV 0.0.
EFFUSION_ROW = (
    "<td>Pleural Effusion</td><td>1</td><td>0</td><td>1</td><td>1</td><td>0.500</td><td>0.500</td>"
)
NO_FINDING_ROW = (
    "<td>No Finding</td><td>0</td><td>1</td><td>1</td><td>1</td><td>0.000</td><td>0.000</td>"
)


def fake_labeler(texts: Sequence[str]) -> list[Mapping[str, int | None]]:
    return [LABELS.get(t.strip(), {}) for t in texts]


class _Fetches(HTMLParser):
    """What a browser would load from a page: its tags' URL attributes (in-page ``#`` anchors
    apart) and ``url(...)``/``@import`` in its style."""

    URL_ATTRIBUTES = frozenset({"src", "href", "xlink:href", "action", "data", "poster", "srcset"})

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.in_style = tag == "style"
        for name, value in attrs:
            if name in self.URL_ATTRIBUTES and value and not value.startswith("#"):
                self.found.append(value)
            if name == "style" and value and re.search(r"url\(|@import", value):
                self.found.append(value)

    def handle_data(self, data: str) -> None:
        if self.in_style and re.search(r"url\(|@import", data):
            self.found.append(data)


def _fetches(page: str) -> list[str]:
    parser = _Fetches()
    parser.feed(page)
    return parser.found


def _fill(store: StudyStore, now: float) -> None:
    for uid, draft, signed, day in CASES:
        add_study(store, uid, accession="A" + uid)
        set_draft(store, uid, draft, abstained="input gate" if draft == "abstain" else "")
        receive(store, read_oru(oru(signed, control_id="M" + uid, accession="A" + uid)))
        with store.transaction() as conn:
            conn.execute(
                signed_reports_table.update()
                .where(signed_reports_table.c.study_instance_uid == uid)
                .values(received_at=now - (2 - day) * DAY - 60)
            )
    assert score_pending(store, fake_labeler, labeler="fake 1") == 4


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StudyStore]:
    s = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    yield s
    s.close()


# ------------------------------------------------------------------------------ the page


def test_the_page_is_self_contained_and_shows_the_hand_computed_figures(
    store: StudyStore,
) -> None:
    _fill(store, now=100 * DAY)
    summary, days = summarise_by_day(store.iter_report_scores())
    page = render_report(
        summary, days, plot_svg=agreement_svg(days), period="of all time", generated="now"
    )
    assert _fetches(page) == []
    assert "default-src 'none'" in page and page.count("<svg") == 1
    assert "<tr><th>studies scored</th><td>4</td></tr>" in page
    assert "<tr><th>abstentions</th><td>1</td></tr>" in page
    assert "<tr><th>abstention rate</th><td>0.250</td></tr>" in page
    assert f"<tr><th>agreement rate</th><td>{38 / 42:.3f}</td></tr>" in page
    assert EFFUSION_ROW in page and NO_FINDING_ROW in page
    # the days: 1.8.1 and 1.8.2 on the first (26 of 28 pairs agree), two days later the
    # abstention and 1.8.4 (12 of 14)
    first, third = utc_day(98 * DAY - 60), utc_day(100 * DAY - 60)
    assert f"<td>{first}</td><td>2</td><td>0</td><td>0.000</td><td>{26 / 28:.3f}</td>" in page
    assert f"<td>{third}</td><td>2</td><td>1</td><td>0.500</td><td>{12 / 14:.3f}</td>" in page


def test_every_value_is_escaped() -> None:
    summary = {
        "studies": "<b>1</b>",
        "abstentions": 0,
        "abstention_rate": None,
        "agreement_rate": None,
        "observations": {
            '<img src="http://x/">': dict.fromkeys(
                ("both_positive", "both_negative", "ai_only", "radiologist_only"), 0
            )
            | {"sensitivity": None, "ppv": None}
        },
    }
    page = render_report(summary, [], plot_svg="", period="<script>", generated="now")
    assert "<img" not in page and "<script>" not in page and "<b>" not in page
    assert "&lt;img src=&quot;http://x/&quot;&gt;" in page and _fetches(page) == []


def test_the_plot_is_inline_svg_with_its_labels_and_the_same_for_the_same_data() -> None:
    _, days = summarise_by_day(
        [
            Scored(False, {"Edema": 1}, {"Edema": 1}, received_at=0.0),
            Scored(True, {}, {}, received_at=2 * DAY),
        ],
        observations=("Edema",),
    )
    svg = agreement_svg(days)
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "<?xml" not in svg and "<metadata>" not in svg and _fetches(svg) == []
    # only the SVG's own namespace names are URLs
    assert set(re.findall(r"https?://[^\"' ]+", svg)) <= {
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xlink",
    }
    for text in ("agreement rate", "abstention rate", "studies"):
        assert f">{text}<" in svg
    assert agreement_svg(days) == svg


# ------------------------------------------------------------------------------ status page


def test_the_status_page_section_shows_window_and_all_time_and_is_made_once_a_minute(
    store: StudyStore,
) -> None:
    now = 100 * DAY
    _fill(store, now=now)
    calls: list[float] = []

    def report() -> dict[str, Any]:
        calls.append(now)
        return windowed_report(store.iter_report_scores, window_days=1, now=now)

    pages = StatusPages(store, agreement=report)
    first = pages.index()
    assert pages.index() == first and len(calls) == 1  # served again, not made again
    section = first[first.index("<section id=agreement>") :]
    assert "<h3>Last 1d, per day</h3>" in section and section.count("<svg") == 1
    window = section[section.index("<table id=agreement-window>") :]
    assert "<tr><th>studies scored</th><td>2</td></tr>" in window  # 1.8.3 and 1.8.4
    all_time = section[section.index("<table id=agreement-all>") :]
    assert "<tr><th>studies scored</th><td>4</td></tr>" in all_time
    assert EFFUSION_ROW in all_time and NO_FINDING_ROW in all_time
    assert _fetches(section) == []

    pages.agreement_seconds = 0.0
    pages.index()
    assert len(calls) == 2


def test_the_status_page_answers_when_the_figures_cannot_be_read(store: StudyStore) -> None:
    def broken() -> dict[str, Any]:
        raise OSError("database gone")

    pages = StatusPages(store, agreement=broken)
    page = pages.index()
    assert "<table id=studies>" in page and "cannot be read now" in page
    assert StatusPages(store).agreement_section() == ""
    empty = StatusPages(
        store, agreement=lambda: windowed_report(store.iter_report_scores, window_days=1, now=0)
    )
    assert "No signed report scored yet" in empty.index()


# ------------------------------------------------------------------------------ processes


@pytest.mark.integration
def test_the_cli_writes_the_html_report(store: StudyStore, tmp_path: Path) -> None:
    _fill(store, now=100 * DAY)
    out = tmp_path / "report.html"
    env = base_env(D2R_DATABASE_URL=str(store.engine.url), D2R_SPOOL_DIR=str(tmp_path / "s"))
    res = run_d2r(
        "feedback", "report", "--no-score", "--since", "1970-04-10", "--format", "html",
        "--out", str(out), env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    page = out.read_text()
    assert _fetches(page) == [] and page.count("<svg") == 1
    assert "Signed reports received since 1970-04-10" in page
    assert "<tr><th>studies scored</th><td>2</td></tr>" in page  # 1.8.3 and 1.8.4
    assert "<tr><th>abstention rate</th><td>0.500</td></tr>" in page


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_nodes_status_page_shows_the_section(store: StudyStore, tmp_path: Path) -> None:
    import time

    _fill(store, now=time.time())
    redis, broker = start_redis(tmp_path)
    http_port = free_port()
    env = base_env(
        D2R_DATABASE_URL=str(store.engine.url),
        D2R_SPOOL_DIR=str(tmp_path / "spool"),
        D2R_HOST="127.0.0.1",
        D2R_PORT=str(free_port()),
        D2R_HTTP_PORT=str(http_port),
        D2R_BROKER_URL=broker,
        D2R_MIN_FREE_BYTES="0",
        D2R_AUDIT_LOG=str(tmp_path / "audit.jsonl"),
        D2R_FEEDBACK_WINDOW_DAYS="7",
    )
    node = Process(d2r_cmd("node"), env=env, log=tmp_path / "node.log")
    try:
        wait_port(http_port, timeout=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=30) as rsp:
            page = rsp.read().decode()
    finally:
        node.stop()
        redis.stop()
    section = page[page.index("<section id=agreement>") :]
    assert "<h3>Last 7d, per day</h3>" in section and section.count("<svg") == 1
    assert "<tr><th>studies scored</th><td>4</td></tr>" in section
    assert EFFUSION_ROW in section
