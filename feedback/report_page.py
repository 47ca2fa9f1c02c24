"""The agreement report as HTML (pure): one self-contained page, and the tables it is made of.

:func:`render_report` is the page ``d2r feedback report --format html`` writes: the overall
figures, the daily plot (:func:`feedback.plots.agreement_svg`, inline SVG), the per-observation
table and the daily table, with its style inline and nothing fetched from anywhere. The status
page (:mod:`observability.status_page`) shows the same tables. Every value is escaped with
:func:`html.escape`; the figures are counts and ratios of the labels, no report text.

>>> html_text = observation_table({"observations": {"Edema": {
...     "both_positive": 1, "both_negative": 2, "ai_only": 0, "radiologist_only": 1,
...     "sensitivity": 0.5, "ppv": 1.0}}})
>>> "<td>Edema</td><td>1</td><td>2</td><td>0</td><td>1</td><td>0.500</td><td>1.000</td>" in (
...     html_text)
True
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "LABELS_NOTE",
    "NOTE",
    "STYLE",
    "daily_table",
    "figures_table",
    "observation_table",
    "ratio",
    "render_report",
]

#: where the labels come from
LABELS_NOTE = (
    "Labels: the rule-based CheXpert-style labeler of d2r evaluate; positive = 1, uncertain "
    "counts as not positive; abstentions are left out of the agreement figures. This is the "
    "labeler's agreement, not a clinical accuracy: a disagreement may be the labeler's."
)
#: what the figures are, under every table of them
NOTE = (
    "AI only: the draft states it, the signed report does not; radiologist only: the reverse. "
    + LABELS_NOTE
)
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:60em}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:.9em}svg{max-width:100%;height:auto}
"""
#: the page loads nothing: its style and plot are inline
_POLICY = "default-src 'none'; style-src 'unsafe-inline'"
_HEAD = (
    ("Observation", ""),
    ("both +", "both_positive"),
    ("both \u2212", "both_negative"),
    ("AI only", "ai_only"),
    ("radiologist only", "radiologist_only"),
    ("sensitivity", "sensitivity"),
    ("PPV", "ppv"),
)


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def ratio(value: float | None) -> str:
    """A ratio with three decimals; ``-`` when undefined."""
    return "-" if value is None else f"{value:.3f}"


def _row(cells: Sequence[object], tag: str = "td") -> str:
    return "<tr>" + "".join(f"<{tag}>{_e(c)}</{tag}>" for c in cells) + "</tr>"


def figures_table(summary: Mapping[str, Any], *, table_id: str = "figures") -> str:
    """Studies scored, abstentions and their rate, and the agreement rate."""
    rows = (
        ("studies scored", summary["studies"]),
        ("abstentions", summary["abstentions"]),
        ("abstention rate", ratio(summary["abstention_rate"])),
        ("agreement rate", ratio(summary["agreement_rate"])),
    )
    return (
        f"<table id={_e(table_id)}>"
        + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


def observation_table(summary: Mapping[str, Any], *, table_id: str = "observations") -> str:
    """Per observation: the four counts, sensitivity and PPV."""
    rows = [_row([h for h, _ in _HEAD], "th")]
    for observation, figures in summary["observations"].items():
        cells: list[object] = [observation]
        for _, key in _HEAD[1:]:
            value = figures[key]
            cells.append(ratio(value) if key in ("sensitivity", "ppv") else value)
        rows.append(_row(cells))
    return f"<table id={_e(table_id)}>" + "".join(rows) + "</table>"


def daily_table(days: Sequence[Mapping[str, Any]], *, table_id: str = "days") -> str:
    """Per day: studies, abstentions, abstention rate and agreement rate."""
    rows = [
        _row(["Day (UTC)", "studies", "abstentions", "abstention rate", "agreement rate"], "th")
    ]
    for d in days:
        rows.append(
            _row(
                [
                    d["date"],
                    d["studies"],
                    d["abstentions"],
                    ratio(d["abstention_rate"]),
                    ratio(d["agreement_rate"]),
                ]
            )
        )
    return f"<table id={_e(table_id)}>" + "".join(rows) + "</table>"


def render_report(
    summary: Mapping[str, Any],
    days: Sequence[Mapping[str, Any]],
    *,
    plot_svg: str,
    period: str,
    generated: str,
    title: str = "d2r: drafts against signed reports",
) -> str:
    """The whole page; ``plot_svg`` is :func:`feedback.plots.agreement_svg` of ``days`` (or
    empty: no plot), ``period`` says which signed reports are counted, ``generated`` when."""
    plot = (
        f"<h2>Per day</h2><figure id=plot>{plot_svg}<figcaption>Agreement and abstention rate "
        "per day, and the studies scored per day.</figcaption></figure>"
        if plot_svg
        else ""
    )
    body = (
        f"<h1>{_e(title)}</h1>"
        f"<p>Signed reports {_e(period)}; made {_e(generated)}.</p>"
        f"<h2>Overall</h2>{figures_table(summary)}"
        f"{plot}"
        f"<h2>Per observation</h2>{observation_table(summary)}"
        f"<p class=note>{_e(NOTE)}</p>"
        f"<h2>Days</h2>{daily_table(days)}"
    )
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{_POLICY}">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>"
    )
