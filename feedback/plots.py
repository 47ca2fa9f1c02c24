"""Plots of the drafts' agreement with the signed reports: data in, SVG text out (pure).

:func:`agreement_svg` draws the daily series of :func:`feedback.scoring.summarise_by_day`: the
agreement rate and the abstention rate per day (upper panel, 0-1) and the studies scored per
day (lower panel), dates in UTC. It uses matplotlib's object API (a
:class:`~matplotlib.figure.Figure` saved as SVG, no ``pyplot`` and no GUI backend), imported
when first called, so that a process that never plots does not load matplotlib. Text is kept
as SVG text (not glyph outlines), the SVG's own XML prolog and metadata are left out, and ids
are salted with a fixed value: the same data give the same SVG, which a page embeds inline.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any

__all__ = ["AGREEMENT_COLOUR", "ABSTENTION_COLOUR", "STUDIES_COLOUR", "agreement_svg"]

AGREEMENT_COLOUR = "#1f6fb4"
ABSTENTION_COLOUR = "#c0392b"
STUDIES_COLOUR = "#7f8c8d"
#: the RDF block matplotlib writes (its namespaces and a Dublin Core type, not needed inline)
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.DOTALL)
#: matplotlib's font manager and text layout are shared state: one figure at a time
_LOCK = threading.Lock()


def _rates(days: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """The daily ``key`` ratio, NaN where undefined (a gap in the line)."""
    return [float("nan") if d.get(key) is None else float(d[key]) for d in days]


# Longer than a screen: one figure, two panels, each labelled; read top to bottom
def agreement_svg(days: Sequence[Mapping[str, Any]], *, width: float = 8.0) -> str:
    """The SVG (an ``<svg>`` element, no XML prolog) of the daily series ``days``.

    Parameters
    ----------
    days : sequence of mapping
        ``{"date": "YYYY-MM-DD", "studies": int, "agreement_rate": float | None,
        "abstention_rate": float | None, ...}``, oldest first.
    width : float
        Width in inches (the height follows).
    """
    from matplotlib import rc_context
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure

    dates = [date.fromisoformat(str(d["date"])) for d in days]
    studies = [int(d["studies"]) for d in days]
    style = rc_context({"svg.fonttype": "none", "svg.hashsalt": "d2r-feedback", "font.size": 9})
    with _LOCK, style:
        figure = Figure(figsize=(width, width * 0.55), layout="constrained")
        rates, counts = figure.subplots(
            2, 1, sharex=True, gridspec_kw={"height_ratios": (2.2, 1.0)}
        )
        rates.plot(
            dates,
            _rates(days, "agreement_rate"),
            marker="o",
            markersize=3,
            color=AGREEMENT_COLOUR,
            label="agreement rate",
        )
        rates.plot(
            dates,
            _rates(days, "abstention_rate"),
            marker="s",
            markersize=3,
            color=ABSTENTION_COLOUR,
            label="abstention rate",
        )
        rates.set_ylim(-0.02, 1.02)
        rates.set_ylabel("rate")
        rates.grid(True, alpha=0.3)
        # above the panel, where no line runs
        rates.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False, ncols=2)
        counts.bar(dates, studies, width=0.8, color=STUDIES_COLOUR)
        counts.set_ylabel("studies")
        counts.set_ylim(0, max([1, *studies]) * 1.15)
        counts.grid(True, axis="y", alpha=0.3)
        locator = AutoDateLocator(minticks=3, maxticks=8)  # type: ignore[no-untyped-call]
        counts.xaxis.set_major_locator(locator)
        formatter = ConciseDateFormatter(locator)  # type: ignore[no-untyped-call]
        counts.xaxis.set_major_formatter(formatter)
        counts.set_xlabel("day the signed report arrived (UTC)")
        if not dates:
            rates.text(0.5, 0.5, "no scored signed reports", ha="center", transform=rates.transAxes)
        out = io.StringIO()
        figure.savefig(out, format="svg", metadata={"Date": None, "Creator": None})
    text = out.getvalue()
    text = _METADATA.sub("", text[text.index("<svg") :], count=1)
    return text
