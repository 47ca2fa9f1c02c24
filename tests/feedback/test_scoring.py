"""Scoring drafts against signed reports: the labels stored once per version, the aggregates
computed by hand."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from feedback.match import receive
from feedback.oru import read_oru
from feedback.scoring import (
    score_pending,
    summarise,
    summarise_by_day,
    windowed_report,
    windowed_summaries,
)
from studydb.store import StudyStore
from studydb.tables import signed_reports_table
from tests.support.signed_reports import add_study, oru, set_draft

#: a stand-in labeler: each text names its positive observations, comma-separated
LABELS = {
    "effusion": {"Pleural Effusion": 1},
    "cardiomegaly": {"Cardiomegaly": 1},
    "effusion,cardiomegaly": {"Pleural Effusion": 1, "Cardiomegaly": -1},
    "clear": {"No Finding": 1},
}


def fake_labeler(texts: Sequence[str]) -> list[Mapping[str, int | None]]:
    return [LABELS.get(t.strip(), {}) for t in texts]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StudyStore]:
    s = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    yield s
    s.close()


def _signed(store: StudyStore, uid: str, text: str, control: str, status: str = "F") -> None:
    add_study(store, uid, accession=uid)
    receive(store, read_oru(oru(text, control_id=control, status=status, accession=uid)))


def test_each_current_version_is_scored_once_and_abstentions_are_apart(
    store: StudyStore,
) -> None:
    _signed(store, "1.5.1", "effusion", "A")
    set_draft(store, "1.5.1", "effusion")  # agree
    _signed(store, "1.5.2", "effusion,cardiomegaly", "B")
    set_draft(store, "1.5.2", "", "cardiomegaly")  # impression only: AI cardiomegaly
    _signed(store, "1.5.3", "clear", "C")
    set_draft(store, "1.5.3", "Not assessed.", abstained="input gate")
    add_study(store, "1.5.4", accession="1.5.4")  # signed, no draft yet: not scored
    receive(store, read_oru(oru("clear", control_id="D", accession="1.5.4")))
    assert score_pending(store, fake_labeler, labeler="fake 1") == 3
    assert score_pending(store, fake_labeler, labeler="fake 1") == 0
    _signed(store, "1.5.1", "clear", "A2", status="C")  # a correction is scored again
    assert score_pending(store, fake_labeler, labeler="fake 1") == 1

    scores = store.report_scores()
    assert [(s.study_instance_uid, s.version, s.abstained) for s in scores] == [
        ("1.5.2", 1, False),
        ("1.5.3", 1, True),
        ("1.5.1", 2, False),
    ]
    summary = summarise(scores)
    # 1.5.1 (v2): AI effusion, radiologist no finding; 1.5.2: AI cardiomegaly, radiologist
    # effusion (cardiomegaly uncertain: not positive); 1.5.3 abstained
    assert (summary["studies"], summary["abstentions"], summary["abstention_rate"]) == (
        3,
        1,
        1 / 3,
    )
    effusion = summary["observations"]["Pleural Effusion"]
    assert (effusion["ai_only"], effusion["radiologist_only"], effusion["both_positive"]) == (
        1,
        1,
        0,
    )
    assert (effusion["sensitivity"], effusion["ppv"]) == (0.0, 0.0)
    cardiomegaly = summary["observations"]["Cardiomegaly"]
    assert (cardiomegaly["ai_only"], cardiomegaly["sensitivity"], cardiomegaly["ppv"]) == (
        1,
        None,
        0.0,
    )
    assert summary["agreement_rate"] == (2 * 14 - 4) / (2 * 14)
    windows = windowed_summaries(store.report_scores, window_days=1, now=10.0**12)
    assert windows["all"] == summary and windows["1d"]["studies"] == 0


def _scored_on(store: StudyStore, uid: str, draft: str, signed: str, at: float) -> None:
    """Study ``uid`` signed (``signed``) at ``at`` with the draft ``draft``, then scored."""
    _signed(store, uid, signed, "M" + uid)
    set_draft(store, uid, draft, abstained="input gate" if draft == "abstain" else "")
    with store.transaction() as conn:
        conn.execute(
            signed_reports_table.update()
            .where(signed_reports_table.c.study_instance_uid == uid)
            .values(received_at=at)
        )
    assert score_pending(store, fake_labeler, labeler="fake 1") == 1


DAY = 86400.0


def test_the_daily_series_counts_each_utc_day_apart(store: StudyStore) -> None:
    day1, day3 = 20 * DAY, 22 * DAY  # 1970-01-21 and 1970-01-23
    _scored_on(store, "1.7.1", "effusion", "effusion", day1 + 10)  # agree
    _scored_on(store, "1.7.2", "cardiomegaly", "clear", day1 + DAY - 1)  # 23:59:59 UTC
    _scored_on(store, "1.7.3", "abstain", "clear", day3 + 5)
    _scored_on(store, "1.7.4", "clear", "effusion", day3 + 6)
    summary, days = summarise_by_day(store.iter_report_scores(page=2))
    assert summary == summarise(store.report_scores())
    assert [d["date"] for d in days] == ["1970-01-21", "1970-01-23"]
    first, third = days
    # day 1: 28 pairs; 1.7.2 disagrees on Cardiomegaly (AI only) and No Finding (rad. only)
    assert (first["studies"], first["abstentions"], first["agreement_rate"]) == (2, 0, 26 / 28)
    assert first["observations"]["Pleural Effusion"]["both_positive"] == 1
    assert first["observations"]["Cardiomegaly"]["ppv"] == 0.0
    # day 3: one abstention, 1.7.4 AI No Finding, radiologist effusion: 12 of 14 agree
    assert (third["studies"], third["abstentions"], third["abstention_rate"]) == (2, 1, 0.5)
    assert third["agreement_rate"] == 12 / 14
    assert third["observations"]["Pleural Effusion"]["sensitivity"] == 0.0
    # the paged reads give the same scores in the same order, since included
    assert list(store.iter_report_scores(page=1)) == store.report_scores()
    assert [s.study_instance_uid for s in store.iter_report_scores(since=day3, page=1)] == [
        "1.7.3",
        "1.7.4",
    ]
    report = windowed_report(store.iter_report_scores, window_days=1.5, now=day3 + DAY)
    assert report["window"] == "1.5d" and report["summaries"]["all"] == summary
    assert report["summaries"]["1.5d"]["studies"] == 2
    assert [d["date"] for d in report["days"]] == ["1970-01-23"]
