"""``d2r audit``: query the audit log (associations, received and sent objects).

Reads ``D2R_AUDIT_LOG`` (default ``<spool>/../audit.jsonl``) and prints the matching lines, oldest
first: one line of text each, or the JSON lines themselves with ``--json``.
"""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta
from typing import Any

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``30m``, ``2h``, ``7d``, ``90s`` ago, or an ISO 8601 date/time (UTC unless it says).

    >>> parse_since("2h", datetime(2026, 1, 1, 12, tzinfo=UTC)).isoformat()
    '2026-01-01T10:00:00+00:00'
    >>> parse_since("2026-01-01").isoformat()
    '2026-01-01T00:00:00+00:00'
    """
    now = now or datetime.now(UTC)
    match = _RELATIVE.match(text.strip())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected e.g. 30m, 2h, 7d or an ISO date/time, got {text!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", metavar="UID", help="only lines of this Study Instance UID")
    parser.add_argument(
        "--since", type=parse_since, help="only lines from this time: 30m, 2h, 7d or ISO 8601"
    )
    parser.add_argument(
        "--event",
        choices=("association", "received", "sent", "study-failed"),
        help="only this kind of line",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON lines")
    parser.epilog = "Configuration: D2R_AUDIT_LOG, D2R_SPOOL_DIR (see README)."


def matches(
    line: dict[str, Any], *, study: str | None, since: datetime | None, event: str | None
) -> bool:
    """Whether an audit ``line`` passes the filters."""
    if event and line.get("event") != event:
        return False
    if study and line.get("study_instance_uid") != study:
        return False
    if since is not None:
        try:
            at = datetime.fromisoformat(str(line.get("time")))
        except ValueError:
            return False
        if at < since:
            return False
    return True


def format_line(line: dict[str, Any]) -> str:
    """One human-readable line."""
    kind = line.get("event")
    head = f"{line.get('time', '')} {kind:<11}"
    if kind == "association":
        return (
            f"{head} {line.get('calling_ae_title')}@{line.get('peer_address')} -> "
            f"{line.get('called_ae_title')}: {line.get('result')} ({line.get('reason')}), "
            f"{line.get('instances', 0)} instance(s), {line.get('start')} .. {line.get('end')}"
        )
    if kind == "received":
        return (
            f"{head} {line.get('sop_instance_uid')} study {line.get('study_instance_uid')} "
            f"from {line.get('calling_ae_title')}: {line.get('outcome')} {line.get('status')}"
            + (f" ({line['reason']})" if line.get("reason") else "")
        )
    if kind == "study-failed":
        return f"{head} study {line.get('study_instance_uid')}: {line.get('reason')}"
    return (
        f"{head} {line.get('sop_instance_uid')} study {line.get('study_instance_uid')} "
        f"to {line.get('destination')}: {line.get('status') or 'not acknowledged'}"
        + (f" ({line['error']})" if line.get("error") else "")
    )


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from cli.runtime import environment
    from observability.audit import read_audit
    from observability.settings import ObservabilitySettings

    settings = ObservabilitySettings.from_env(environment(args))
    if not settings.audit_log.exists():
        print(f"d2r audit: no audit log at {settings.audit_log}", file=sys.stderr)
        return 1
    found = 0
    for line in read_audit(settings.audit_log):
        if not matches(line, study=args.study, since=args.since, event=args.event):
            continue
        found += 1
        print(json.dumps(line, ensure_ascii=False) if args.json else format_line(line))
    return 0 if found or not args.study else 1
