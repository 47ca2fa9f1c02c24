"""Scoring drafts against signed reports: the labels stored once per version, the aggregates
computed by hand."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from feedback.match import receive
from feedback.oru import read_oru
from feedback.scoring import score_pending, summarise, windowed_summaries
from studydb.store import StudyStore
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
