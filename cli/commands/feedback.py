"""``d2r feedback``: the drafts against the radiologists' signed reports.

``d2r feedback score`` scores the signed reports not scored yet (with the labeler of ``d2r
evaluate``); ``d2r feedback report [--since DATE] [--json]`` does the same, then prints the
agreement of the studies whose current signed report arrived since DATE (all of them without
it): per-observation sensitivity and PPV of the draft, the agreement rate and the abstention
rate (:mod:`feedback.scoring`). ``d2r feedback export --out DIR [--since DATE]`` writes
``DIR/signed_reports.jsonl``: per study its current signed report as ``reference`` and its draft
as ``generated`` (the input of ``d2r evaluate``), with the version, the abstention and the time
received. The texts are the reports' own: treat the file as patient data.
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
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--out", metavar="DIR", help="export: the folder to write")
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


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render(summary: dict[str, Any]) -> str:
    """The summary as a text table."""
    lines = [
        f"studies scored: {summary['studies']}",
        f"abstentions: {summary['abstentions']} (rate {_ratio(summary['abstention_rate'])})",
        f"agreement rate: {_ratio(summary['agreement_rate'])}",
        "",
        f"{'observation':<28} {'both+':>6} {'both-':>6} {'AI':>6} {'rad.':>6} "
        f"{'sens.':>6} {'PPV':>6}",
    ]
    for observation, f in summary["observations"].items():
        lines.append(
            f"{observation:<28} {f['both_positive']:>6} {f['both_negative']:>6} "
            f"{f['ai_only']:>6} {f['radiologist_only']:>6} {_ratio(f['sensitivity']):>6} "
            f"{_ratio(f['ppv']):>6}"
        )
    lines.append("")
    lines.append(
        "AI: the draft only; rad.: the signed report only. Labels: the rule-based CheXpert-style "
        "labeler of d2r evaluate; positive = 1, uncertain counts as not positive; abstentions "
        "are left out of the agreement figures."
    )
    return "\n".join(lines)


def export(store: Any, out: str, since: float | None) -> int:
    """Write ``out/signed_reports.jsonl`` (module docstring); how many lines."""
    import json
    from pathlib import Path

    from feedback.scoring import draft_text

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    cases = store.reports_with_drafts(since=since)
    with (folder / "signed_reports.jsonl").open("w", encoding="utf-8") as f:
        for case in cases:
            record = {
                "id": case.study_instance_uid,
                "reference": case.signed_text,
                "generated": "" if case.abstained else draft_text(case),
                "version": case.version,
                "abstained": case.abstained,
                "received_at": case.received_at,
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(cases)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from cli.runtime import environment
    from cli.scoring import score_now
    from dicom_node.settings import NodeSettings
    from feedback.scoring import summarise
    from studydb.store import StudyStore

    since = parse_since(args.since)
    if args.action == "export" and not args.out:
        print("d2r feedback export: --out DIR is required", file=sys.stderr)
        return 2
    settings = NodeSettings.from_env(environment(args))
    store = StudyStore(settings.database_url)
    try:
        if args.action == "export":
            written = export(store, args.out, since)
            print(f"wrote {written} signed report{'' if written == 1 else 's'} to {args.out}")
            return 0
        if args.action == "score" or not args.no_score:
            try:
                scored = score_now(store)
            except ImportError as exc:
                print(f"d2r feedback: the labeler is not installed: {exc}", file=sys.stderr)
                return 2
            if args.action == "score":
                print(f"scored {scored} signed report{'' if scored == 1 else 's'}")
                return 0
        summary = summarise(store.report_scores(since=since))
    finally:
        store.close()
    if args.json:
        print(json.dumps({"since": args.since, **summary}, indent=2))
    else:
        print(render(summary))
    return 0
