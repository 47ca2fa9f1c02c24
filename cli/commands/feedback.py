"""``d2r feedback``: the drafts against the radiologists' signed reports.

``d2r feedback score`` scores the signed reports not scored yet (with the labeler of ``d2r
evaluate``). ``d2r feedback report [--since DATE] [--format text|json|html] [--out FILE]`` does
the same, then reports the agreement of the studies whose current signed report arrived since
DATE (all of them without it): per-observation sensitivity and PPV of the draft, the agreement
rate and the abstention rate, overall and per UTC day (:mod:`feedback.scoring`); ``html`` is one
self-contained page with a plot of the days (:mod:`feedback.report_page`), written to FILE or
printed. ``--json`` is ``--format json``.

``d2r feedback export --out DIR [--since DATE]`` writes the studies with a signed report as a
training set that ``d2r train`` and ``d2r train-detector`` read, and the inputs of ``d2r
evaluate`` (:mod:`feedback.export`). Its images and texts are patient data: the folder is made
``0o700``, its files ``0o600``.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("report", "score", "export"), help="what to do")
    parser.add_argument(
        "--since",
        metavar="DATE",
        help="only signed reports received since DATE (ISO 8601, e.g. 2026-12-01; UTC unless "
        "it names a zone)",
    )
    parser.add_argument(
        "--format",
        choices=("text", "json", "html"),
        default="text",
        help="report: a text table (default), JSON, or one self-contained HTML page",
    )
    parser.add_argument(
        "--json", dest="format", action="store_const", const="json", help="--format json"
    )
    parser.add_argument(
        "--out",
        metavar="PATH",
        help="export: the folder to write (required); report: the file to write (default: "
        "standard output)",
    )
    parser.add_argument(
        "--no-score", action="store_true", help="report without scoring new signed reports first"
    )


def parse_since(text: str | None) -> float | None:
    from datetime import UTC, datetime

    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"d2r feedback: --since: not an ISO 8601 date: {text!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def render(summary: dict[str, Any], days: list[dict[str, Any]] | None = None) -> str:
    """The summary (and the daily series) as text tables."""
    from feedback.report_page import LABELS_NOTE, ratio

    lines = [
        f"studies scored: {summary['studies']}",
        f"abstentions: {summary['abstentions']} (rate {ratio(summary['abstention_rate'])})",
        f"agreement rate: {ratio(summary['agreement_rate'])}",
        "",
        f"{'observation':<28} {'both+':>6} {'both-':>6} {'AI':>6} {'rad.':>6} "
        f"{'sens.':>6} {'PPV':>6}",
    ]
    for observation, f in summary["observations"].items():
        lines.append(
            f"{observation:<28} {f['both_positive']:>6} {f['both_negative']:>6} "
            f"{f['ai_only']:>6} {f['radiologist_only']:>6} {ratio(f['sensitivity']):>6} "
            f"{ratio(f['ppv']):>6}"
        )
    if days:
        lines += ["", f"{'day (UTC)':<12} {'studies':>8} {'abst.':>6} {'abst.r':>7} {'agree':>6}"]
        for d in days:
            lines.append(
                f"{d['date']:<12} {d['studies']:>8} {d['abstentions']:>6} "
                f"{ratio(d['abstention_rate']):>7} {ratio(d['agreement_rate']):>6}"
            )
    lines += ["", "AI: the draft only; rad.: the signed report only. " + LABELS_NOTE]
    return "\n".join(lines)


def html_report(summary: dict[str, Any], days: list[dict[str, Any]], since: str | None) -> str:
    """The self-contained page of ``d2r feedback report --format html``."""
    from datetime import UTC, datetime

    from feedback.plots import agreement_svg
    from feedback.report_page import render_report

    return render_report(
        summary,
        days,
        plot_svg=agreement_svg(days) if days else "",
        period=f"received since {since}" if since else "of all time",
        generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )


def _finding_classes() -> dict[tuple[str, str], str] | None:
    """Finding code (scheme, value) -> VinDr-CXR class, as d2r's SRs code them (None where
    the SR tools, highdicom, are not installed)."""
    try:
        from report.codes import FINDING_CODES
    except ImportError:
        return None
    return {
        (c.finding.scheme_designator, c.finding.value): name for name, c in FINDING_CODES.items()
    }


def _export(store: Any, out: str, since: float | None) -> int:
    import sys
    from pathlib import Path

    from feedback.export import export_training_set

    try:
        manifest = export_training_set(
            store, Path(out), since=since, finding_classes=_finding_classes()
        )
    except OSError as exc:  # the target: not writable, full
        print(f"d2r feedback export: cannot write {out}: {exc}", file=sys.stderr)
        return 1
    counts = manifest["counts"]
    print(
        f"exported {counts['exported']} of {counts['studies']} studies with a signed report to "
        f"{out} (train {counts['train']}, val {counts['val']}, test {counts['test']}; "
        f"{counts['boxes']} weak boxes); {counts['skipped']} skipped: see manifest.json. "
        "Patient data: keep the folder on storage meant for it."
    )
    return 0


def _write(text: str, out: str | None) -> None:
    import sys
    from pathlib import Path

    if out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        Path(out).write_text(text, encoding="utf-8")
        print(f"wrote {out}")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from cli.runtime import environment
    from cli.scoring import score_now
    from dicom_node.settings import NodeSettings
    from feedback.scoring import summarise_by_day
    from studydb.store import StudyStore

    since = parse_since(args.since)
    if args.action == "export" and not args.out:
        print("d2r feedback export: --out DIR is required", file=sys.stderr)
        return 2
    settings = NodeSettings.from_env(environment(args))
    store = StudyStore(settings.database_url)
    try:
        if args.action == "export":
            return _export(store, args.out, since)
        if args.action == "score" or not args.no_score:
            try:
                scored = score_now(store)
            except ImportError as exc:
                print(f"d2r feedback: the labeler is not installed: {exc}", file=sys.stderr)
                return 2
            if args.action == "score":
                print(f"scored {scored} signed report{'' if scored == 1 else 's'}")
                return 0
        summary, days = summarise_by_day(store.iter_report_scores(since=since))
    finally:
        store.close()
    if args.format == "json":
        text = json.dumps({"since": args.since, **summary, "days": days}, indent=2)
    elif args.format == "html":
        text = html_report(summary, days, args.since)
    else:
        text = render(summary, days)
    _write(text, args.out)
    return 0
