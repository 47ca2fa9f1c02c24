"""``d2r status``: recent studies and their states, or one study's timeline."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study_uid", nargs="?", help="show one study with its events")
    parser.add_argument("--limit", type=int, default=20, help="number of studies (default 20)")
    parser.add_argument("--state", help="only studies in this state (e.g. failed)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--nodes", action="store_true", help="the nodes on this database and their heartbeats"
    )
    parser.add_argument(
        "--stuck",
        nargs="?",
        const=900.0,
        type=float,
        metavar="SECONDS",
        help="only unfinished studies that stayed in their state longer than SECONDS (default 900)",
    )


def _ts(value: float | None) -> str:
    from datetime import UTC, datetime

    if not value:
        return "-"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _received_by(nodes: tuple[tuple[str, int], ...]) -> str:
    """`` (received by node-a: 1, node-b: 1)``, or nothing for instances of no named node."""
    named = [(name, count) for name, count in nodes if name]
    if not named:
        return ""
    return " (received by " + ", ".join(f"{name}: {count}" for name, count in named) + ")"


# Longer than a screen: the command's four views (one study, the nodes, the stuck studies, the
# list), each in text and in JSON
def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import sys
    import time

    from cli.runtime import environment
    from dicom_node.settings import NodeSettings
    from studydb.store import StudyStore

    settings = NodeSettings.from_env(environment(args))
    store = StudyStore(settings.database_url)
    try:
        if args.study_uid:
            view = store.get(args.study_uid)
            if view is None:
                print(f"d2r status: no study {args.study_uid}", file=sys.stderr)
                return 1
            events = store.events(args.study_uid)
            records = store.instances(args.study_uid)
            if args.json:
                out = dataclasses.asdict(view)
                out["instances"] = [
                    {
                        "sop_instance_uid": i.sop_instance_uid,
                        "view_position": i.view_position,
                        "received_at": i.received_at.timestamp(),
                        "received_by": i.received_by,
                    }
                    for i in records
                ]
                out["events"] = [dataclasses.asdict(e) for e in events]
                print(json.dumps(out, indent=2))
                return 0
            print(f"Study     {view.study_instance_uid}")
            print(f"State     {view.state}" + (f" ({view.reason})" if view.reason else ""))
            print(f"Priority  {view.priority}")
            print(f"Instances {view.instance_count}" + _received_by(view.received_by))
            print(
                f"Attempts  {view.attempts}" + (f" (last stage {view.stage})" if view.stage else "")
            )
            if view.model_name:
                print(f"Model     {view.model_name} {view.model_version}")
                print(f"Lesions   {view.lesion_count}")
                print(f"Findings  {view.findings}")
                print(f"Impression {view.impression}")
            for d in view.deliveries:
                print(
                    f"Delivery  {d.destination}: {d.state}, {d.attempts} attempt(s)"
                    + (f", last error: {d.last_error}" if d.last_error else "")
                )
            print("Received:")
            for i in records:
                print(
                    f"  {_ts(i.received_at.timestamp())}  {i.received_by or '-':<16} "
                    f"{i.view_position or '-':<4} {i.sop_instance_uid}"
                )
            print("Events:")
            for e in events:
                print(f"  {_ts(e.at)}  {e.kind:<14} {e.detail}")
            return 0
        if args.nodes:
            nodes = store.nodes()
            if args.json:
                print(json.dumps([dataclasses.asdict(n) for n in nodes], indent=2))
                return 0
            expire = settings.node_expire_seconds
            print(f"{'NODE':<24} {'HEARTBEAT':<20} {'AGE (s)':>8} {'OPEN':>4}  STATE / HOST")
            now = time.time()
            for n in nodes:
                age = now - n.heartbeat_at
                state = "alive" if age < expire else "silent"
                print(
                    f"{n.name:<24} {_ts(n.heartbeat_at):<20} {age:>8.0f} "
                    f"{n.open_associations:>4}  {state} / {n.host} pid {n.pid}"
                )
            return 0
        if args.stuck is not None:
            stuck = store.stuck(older_than=args.stuck, limit=args.limit)
            if args.json:
                print(json.dumps([dataclasses.asdict(v) for v in stuck], indent=2))
                return 0
            print(f"{len(stuck)} study(ies) in one state for more than {args.stuck:g} s")
            print(f"{'SINCE':<20} {'STATE':<10} {'FOR (s)':>8} {'ATT':>3}  STUDY / STAGE")
            now = time.time()
            for v in stuck:
                since = v.state_since or 0.0
                print(
                    f"{_ts(since):<20} {v.state:<10} {now - since:>8.0f} {v.attempts:>3}  "
                    f"{v.study_instance_uid}" + (f"  ({v.stage})" if v.stage else "")
                )
            return 0
        views = store.recent(args.limit, state=args.state)
        if args.json:
            print(json.dumps([dataclasses.asdict(v) for v in views], indent=2))
            return 0
        counts = store.count_by_state()
        print("  ".join(f"{k}={v}" for k, v in counts.items()))
        queued = store.count_by_priority()
        print("queued by priority: " + "  ".join(f"{k}={v}" for k, v in queued.items()))
        print(
            f"{'LAST RECEIVED':<20} {'STATE':<10} {'PRIO':<7} {'INST':>4} {'LES':>3} "
            f"{'NODE':<16}  STUDY / REASON"
        )
        for v in views:
            lesions = "-" if v.lesion_count is None else str(v.lesion_count)
            node = ",".join(name or "-" for name, _ in v.received_by) or "-"
            print(
                f"{_ts(v.last_received_at):<20} {v.state:<10} {v.priority:<7} "
                f"{v.instance_count:>4} {lesions:>3} "
                f"{node:<16}  {v.study_instance_uid}" + (f"  ({v.reason})" if v.reason else "")
            )
        return 0
    finally:
        store.close()
