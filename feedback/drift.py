"""Drift of the studies the node serves against the checkpoint's calibration (pure functions).

Three things are compared, over the window :func:`studydb.drift.drift_window` reads (the
latest ``D2R_DRIFT_WINDOW_STUDIES`` studies of the current model and gate calibration):

* **The input gate's score.** The reference is the distribution of the held-out
  in-distribution scores the gate's threshold was taken from, kept as its quantiles at
  probabilities ``0, 1/k, ..., 1`` (``model.gate``; k = 20). Two figures:

  - the population stability index (:func:`population_stability_index`) over the k
    equal-probability bins the quantiles bound: ``sum((p - r) * ln(p / r))``, ``r = 1/k``
    per bin, ``p`` the window's share of scores in it (an empty bin counts as
    :data:`EPSILON`, so the index stays finite). Customary reading: below 0.1 stable, 0.1 to
    0.25 a moderate shift, above 0.25 a major one. With few scores it is large by chance (about
    ``(k - 1) / n`` for ``n`` scores), so read it beside:
  - the Kolmogorov-Smirnov statistic (:func:`ks_statistic`): the largest distance between the
    window's empirical distribution function and the reference's (linear between the
    quantiles), and its p-value as a two-sample test against the ``m`` held-out images
    (:func:`ks_pvalue`), which accounts for both sample sizes.

* **The abstention rate**: the share of the window's studies the gate declined, against
  ``1 - percentile / 100``, the share of held-out in-distribution images whose score is above
  the threshold (declines by the header and pixel checks come on top of it).
* **Each finding's positive rate**: the share of the window's studies not declined whose draft
  states the finding with a box, against the same share in the model's first
  ``D2R_DRIFT_BASELINE_STUDIES`` studies (the baseline, exported once complete: the
  calibration does not run the report generator, so it has no positive rates to offer).

>>> round(population_stability_index([0.5, 0.5, 1.5, 3.5], (0.0, 1.0, 2.0, 3.0, 4.0)), 4)
2.1285
>>> round(ks_statistic([2.0, 4.0, 9.0], (0.0, 10.0)), 4)
0.2667
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from d2r_core.classes import VINDR_CLASSES
from studydb.drift import Counts, DriftWindow

__all__ = [
    "EPSILON",
    "DriftFigures",
    "bin_shares",
    "drift_figures",
    "ks_pvalue",
    "ks_statistic",
    "population_stability_index",
    "reference_cdf",
    "window_label",
]

#: the share an empty bin counts as in the population stability index
EPSILON: Final = 1e-4


def _check_quantiles(quantiles: Sequence[float]) -> None:
    if len(quantiles) < 2:
        raise ValueError("quantiles: at least two (the smallest and the largest) are needed")
    if any(b < a for a, b in zip(quantiles, quantiles[1:], strict=False)):
        raise ValueError("quantiles: must be non-decreasing")


def bin_shares(scores: Sequence[float], quantiles: Sequence[float]) -> list[float]:
    """The share of ``scores`` in each of the ``len(quantiles) - 1`` bins the quantiles bound:
    bin ``i`` holds the scores in ``(q[i], q[i+1]]``; the first also those below ``q[1]``, the
    last those above ``q[-2]``.

    >>> bin_shares([0.5, 0.5, 1.5, 3.5, 9.0], (0.0, 1.0, 2.0, 3.0, 4.0))
    [0.4, 0.2, 0.0, 0.4]
    """
    _check_quantiles(quantiles)
    if not scores:
        raise ValueError("scores: at least one score is needed")
    cuts = list(quantiles[1:-1])
    counts = [0] * (len(quantiles) - 1)
    for score in scores:
        counts[bisect_left(cuts, score)] += 1
    return [c / len(scores) for c in counts]


def population_stability_index(
    scores: Sequence[float], quantiles: Sequence[float], *, epsilon: float = EPSILON
) -> float:
    """The population stability index of ``scores`` against the reference whose quantiles at
    equal steps of probability are ``quantiles`` (module docstring).

    >>> population_stability_index([0.5, 1.5, 2.5, 3.5], (0.0, 1.0, 2.0, 3.0, 4.0))
    0.0
    """
    expected = 1.0 / (len(quantiles) - 1)
    return sum(
        (p - expected) * math.log(p / expected)
        for p in (max(share, epsilon) for share in bin_shares(scores, quantiles))
    )


def reference_cdf(x: float, quantiles: Sequence[float]) -> float:
    """The reference distribution function at ``x``: linear between the quantiles (quantile
    ``j`` of ``k`` has probability ``j / k``), 0 below the first and 1 from the last.

    >>> [reference_cdf(x, (0.0, 10.0, 30.0)) for x in (-1.0, 5.0, 20.0, 30.0)]
    [0.0, 0.25, 0.75, 1.0]
    """
    _check_quantiles(quantiles)
    k = len(quantiles) - 1
    if x < quantiles[0]:
        return 0.0
    if x >= quantiles[-1]:
        return 1.0
    j = bisect_right(quantiles, x) - 1  # quantiles[j] <= x < quantiles[j + 1]
    low, high = quantiles[j], quantiles[j + 1]
    return (j + (x - low) / (high - low)) / k


def ks_statistic(scores: Sequence[float], quantiles: Sequence[float]) -> float:
    """The Kolmogorov-Smirnov statistic of ``scores`` against the reference: the largest
    distance between their empirical distribution function and :func:`reference_cdf` (taken
    at the scores, on either side of each step).

    >>> ks_statistic([20.0, 21.0], (0.0, 10.0))
    1.0
    """
    if not scores:
        raise ValueError("scores: at least one score is needed")
    ordered = sorted(scores)
    n = len(ordered)
    distance = 0.0
    for i, x in enumerate(ordered):
        f = reference_cdf(x, quantiles)
        below = bisect_left(ordered, x, hi=i)  # scores strictly below x
        at_or_below = bisect_right(ordered, x, lo=i)
        distance = max(distance, at_or_below / n - f, f - below / n)
    return distance


def ks_pvalue(statistic: float, n: int, m: int | None = None) -> float:
    """The asymptotic p-value of a Kolmogorov-Smirnov ``statistic`` of ``n`` scores against a
    reference of ``m`` (a two-sample test; ``None``: a known distribution), with Stephens'
    small-sample correction (Press et al., Numerical Recipes, ``probks``).

    >>> round(ks_pvalue(0.3, 20), 4), round(ks_pvalue(0.5, 20, 20), 4)
    (0.0431, 0.0082)
    >>> ks_pvalue(0.0, 8)
    1.0
    """
    if n < 1 or (m is not None and m < 1):
        raise ValueError("n and m: at least one score each")
    effective = n if m is None else n * m / (n + m)
    root = math.sqrt(effective)
    lam = (root + 0.12 + 0.11 / root) * statistic
    if lam < 0.2:  # the series below converges slowly there; Q(0.2) > 0.99999
        return 1.0
    total, sign = 0.0, 1.0
    for j in range(1, 101):
        term = sign * math.exp(-2.0 * j * j * lam * lam)
        total += term
        if abs(term) < 1e-12:
            break
        sign = -sign
    return min(1.0, max(0.0, 2.0 * total))


def window_label(window_studies: int) -> str:
    """The ``window`` label of the drift figures, e.g. ``500_studies``."""
    return f"{window_studies}_studies"


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _positive_ratios(counts: Counts, findings: Iterable[str]) -> dict[str, float]:
    if counts.assessed <= 0:
        return {}
    return {name: counts.positives.get(name, 0) / counts.assessed for name in findings}


@dataclass(frozen=True)
class DriftFigures:
    """What ``/metrics`` exports of a :class:`~studydb.drift.DriftWindow`; a figure is
    ``None`` (or a mapping empty) while it cannot be computed or is not due yet."""

    window: str
    model_name: str
    model_version: str
    studies: int
    gate_scores: int
    baseline_studies: int
    abstention_ratio: float | None = None
    abstention_reference_ratio: float | None = None
    gate_score_psi: float | None = None
    gate_score_ks: float | None = None
    gate_score_ks_pvalue: float | None = None
    positive_ratios: Mapping[str, float] = field(default_factory=dict)
    positive_reference_ratios: Mapping[str, float] = field(default_factory=dict)


def drift_figures(
    drift: DriftWindow, *, window_studies: int, baseline_studies: int, min_studies: int
) -> DriftFigures:
    """The drift figures of ``drift`` (module docstring). The window's figures come once it
    holds ``min_studies`` studies (the score's: scored studies); the positive rates'
    reference once the baseline holds ``baseline_studies``."""
    window, baseline, gate = drift.window, drift.baseline, drift.gate
    findings = sorted(set(VINDR_CLASSES) | set(window.positives) | set(baseline.positives))
    due = window.studies >= min_studies
    scores = list(drift.gate_scores)
    psi = ks = pvalue = None
    if gate is not None and gate.quantiles and len(scores) >= min_studies:
        psi = population_stability_index(scores, gate.quantiles)
        ks = ks_statistic(scores, gate.quantiles)
        pvalue = ks_pvalue(ks, len(scores), max(1, gate.calibration_images))
    complete = baseline.studies >= baseline_studies
    return DriftFigures(
        window=window_label(window_studies),
        model_name=drift.model_name,
        model_version=drift.model_version,
        studies=window.studies,
        gate_scores=len(scores),
        baseline_studies=baseline.studies,
        abstention_ratio=_ratio(window.abstentions, window.studies) if due else None,
        abstention_reference_ratio=None if gate is None else (100.0 - gate.percentile) / 100.0,
        gate_score_psi=psi,
        gate_score_ks=ks,
        gate_score_ks_pvalue=pvalue,
        positive_ratios=_positive_ratios(window, findings) if due else {},
        positive_reference_ratios=_positive_ratios(baseline, findings) if complete else {},
    )
