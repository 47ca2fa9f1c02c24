"""The draft against the signed report: per-observation agreement, and its aggregates.

Both texts are labelled by the CheXpert-style labeler of ``d2r evaluate`` (14 observations;
``docs/training.md``), which the caller passes in (:func:`score_pending`): the labeler lives
with the offline tools and the entry point wires it. A label counts as positive only when it is
1 (``pos_only``, the headline binarisation of ``d2r evaluate``); uncertain (-1), negative (0)
and unmentioned count as not positive.

Per study and observation, one of: ``both_positive``, ``both_negative``, ``ai_only`` (the draft
states it, the radiologist does not) or ``radiologist_only``. Aggregates (:func:`summarise`):

* ``studies``: studies scored; ``abstentions`` and ``abstention_rate``: those where the model
  abstained (its draft states no findings). Abstentions are left out of everything below.
* per observation: the four counts; ``sensitivity`` = both_positive / (both_positive +
  radiologist_only) and ``ppv`` = both_positive / (both_positive + ai_only), ``None`` when
  the denominator is 0;
* ``agreement_rate``: (both_positive + both_negative) / (studies assessed x observations).

The daily series (:func:`summarise_by_day`) is the same summary per UTC day on which the
signed reports arrived, oldest first, each with its ``date`` (days without a score left out).

>>> s = summarise([
...     Scored(False, {"Cardiomegaly": 1, "Edema": 0}, {"Cardiomegaly": 1, "Edema": 1}),
...     Scored(True, {}, {"Edema": 1}),
... ], observations=("Cardiomegaly", "Edema"))
>>> s["studies"], s["abstentions"], s["agreement_rate"], s["observations"]["Edema"]["sensitivity"]
(2, 1, 0.5, 0.0)
>>> _, days = summarise_by_day([
...     Scored(False, {"Edema": 1}, {"Edema": 1}, received_at=0.0),
...     Scored(True, {}, {}, received_at=86400.0 * 2 + 5),
... ], observations=("Edema",))
>>> [(d["date"], d["studies"], d["abstention_rate"], d["agreement_rate"]) for d in days]
[('1970-01-01', 1, 0.0, 1.0), ('1970-01-03', 1, 1.0, None)]
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from d2r_core.classes import CHEXPERT_OBSERVATIONS
from studydb.feedback import ScoringCase

__all__ = [
    "AGREEMENTS",
    "Scored",
    "ScoreBook",
    "agreement",
    "draft_text",
    "score_pending",
    "summarise",
    "summarise_by_day",
    "utc_day",
    "windowed_report",
    "windowed_summaries",
]

logger = logging.getLogger(__name__)

AGREEMENTS: Final = ("both_positive", "both_negative", "ai_only", "radiologist_only")
Labels = Mapping[str, int | None]
#: labels many texts, one dict per text (``training.evaluation.labeler.label_reports``)
Labeler = Callable[[Sequence[str]], Sequence[Labels]]


class ScoreBook(Protocol):
    """The study-database calls scoring needs (:class:`studydb.feedback.SignedReports`)."""

    def unscored_reports(self, limit: int = 100) -> list[ScoringCase]: ...

    def store_score(
        self, case: ScoringCase, *, draft_labels: Labels, signed_labels: Labels, labeler: str
    ) -> None: ...


@dataclass(frozen=True)
class Scored:
    """One study's labels (the fields :func:`summarise` reads of a stored score)."""

    abstained: bool
    draft_labels: Labels
    signed_labels: Labels
    #: when the signed report arrived (seconds since the epoch), for the daily series
    received_at: float = 0.0


def agreement(draft: Labels, signed: Labels, observation: str) -> str:
    """Which of :data:`AGREEMENTS` one observation of one study is.

    >>> agreement({"Edema": 1}, {"Edema": -1}, "Edema")
    'ai_only'
    """
    ai, radiologist = draft.get(observation) == 1, signed.get(observation) == 1
    if ai and radiologist:
        return "both_positive"
    if ai:
        return "ai_only"
    return "radiologist_only" if radiologist else "both_negative"


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


class _Tally:
    """The counts behind one summary, added to one score at a time."""

    def __init__(self, observations: Sequence[str]) -> None:
        self.observations = tuple(observations)
        self.counts = {o: dict.fromkeys(AGREEMENTS, 0) for o in self.observations}
        self.studies = 0
        self.abstentions = 0

    def add(self, score: Any) -> None:
        self.studies += 1
        if score.abstained:
            self.abstentions += 1
            return
        for observation in self.observations:
            self.counts[observation][
                agreement(score.draft_labels, score.signed_labels, observation)
            ] += 1

    def summary(self) -> dict[str, Any]:
        assessed = self.studies - self.abstentions
        per_observation: dict[str, dict[str, Any]] = {}
        agreeing = 0
        for observation, c in self.counts.items():
            agreeing += c["both_positive"] + c["both_negative"]
            per_observation[observation] = {
                **c,
                "sensitivity": _ratio(
                    c["both_positive"], c["both_positive"] + c["radiologist_only"]
                ),
                "ppv": _ratio(c["both_positive"], c["both_positive"] + c["ai_only"]),
            }
        return {
            "studies": self.studies,
            "abstentions": self.abstentions,
            "abstention_rate": _ratio(self.abstentions, self.studies),
            "agreement_rate": _ratio(agreeing, assessed * len(self.observations)),
            "observations": per_observation,
        }


def summarise(
    scores: Iterable[Any], *, observations: Sequence[str] = CHEXPERT_OBSERVATIONS
) -> dict[str, Any]:
    """The aggregates of ``scores`` (objects with ``abstained``, ``draft_labels`` and
    ``signed_labels``), as ``d2r feedback report --json`` prints them (module docstring)."""
    tally = _Tally(observations)
    for score in scores:
        tally.add(score)
    return tally.summary()


def utc_day(at: float) -> str:
    """The UTC date of ``at`` (seconds since the epoch), ISO 8601.

    >>> utc_day(86399.5)
    '1970-01-01'
    """
    return datetime.fromtimestamp(at, UTC).date().isoformat()


def summarise_by_day(
    scores: Iterable[Any], *, observations: Sequence[str] = CHEXPERT_OBSERVATIONS
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """In one pass over ``scores`` (with ``received_at`` as well): :func:`summarise` of them
    all, and the daily series: ``{"date": "YYYY-MM-DD", **summary}`` per UTC day, oldest
    first. Memory grows with the days, not with the scores."""
    total = _Tally(observations)
    days: dict[str, _Tally] = {}
    for score in scores:
        total.add(score)
        day = utc_day(float(score.received_at))
        if day not in days:
            days[day] = _Tally(observations)
        days[day].add(score)
    series = [{"date": day, **days[day].summary()} for day in sorted(days)]
    return total.summary(), series


def draft_text(case: ScoringCase) -> str:
    """The draft as the labeler reads it: findings, then impression."""
    return "\n".join(t for t in (case.draft_findings, case.draft_impression) if t)


def score_pending(book: ScoreBook, label: Labeler, *, labeler: str, limit: int = 100) -> int:
    """Score the signed reports not scored yet (up to ``limit``); how many were scored."""
    cases = book.unscored_reports(limit)
    if not cases:
        return 0
    labels = label([t for case in cases for t in (draft_text(case), case.signed_text)])
    for index, case in enumerate(cases):
        draft = {} if case.abstained else dict(labels[2 * index])
        book.store_score(
            case, draft_labels=draft, signed_labels=labels[2 * index + 1], labeler=labeler
        )
    logger.info("scored %d signed report%s", len(cases), "" if len(cases) == 1 else "s")
    return len(cases)


def windowed_summaries(
    report_scores: Callable[..., Iterable[Any]], *, window_days: float, now: float
) -> dict[str, dict[str, Any]]:
    """``{"all": ..., "<N>d": ...}``: :func:`summarise` of all scores and of those whose
    signed report arrived in the last ``window_days`` (``report_scores(since=...)``)."""
    label = f"{window_days:g}d"
    return {
        "all": summarise(report_scores()),
        label: summarise(report_scores(since=now - window_days * 86400.0)),
    }


def windowed_report(
    report_scores: Callable[..., Iterable[Any]], *, window_days: float, now: float
) -> dict[str, Any]:
    """What the status page shows: ``{"window": "<N>d", "summaries": {"all": ..., "<N>d":
    ...}, "days": ...}``, the summaries as :func:`windowed_summaries` gives them and the daily
    series of the window (:func:`summarise_by_day`). ``report_scores(since=...)`` is called
    twice: all time, and the window."""
    label = f"{window_days:g}d"
    window, days = summarise_by_day(report_scores(since=now - window_days * 86400.0))
    return {
        "window": label,
        "summaries": {"all": summarise(report_scores(since=None)), label: window},
        "days": days,
    }
