"""Two active nodes behind HAProxy: throughput against one node, and the take-over after a kill.

Starts the real processes as ``tests/reliability/test_ha.py`` does: PostgreSQL (a private
cluster), Redis, Orthanc as the PACS, ``d2r node`` (``node-a``, later also ``node-b``, same study
database and spool), one ``d2r worker`` and HAProxy (TCP, round robin, connect checks every
500 ms) in front of the nodes. Then, in one run:

1. **one node**: HAProxy in front of ``node-a`` only; ``--senders`` senders send ``--studies``
   studies as fast as they are acknowledged (half with a second image on a second association);
2. **two nodes**: ``node-b`` started, HAProxy in front of both; the same load again;
3. **kill -9 node-a**: the same load paced over ``--send-seconds``; ``node-a``'s process group
   is killed with SIGKILL at ``--fault-after`` seconds and a C-ECHO probe goes through HAProxy
   every ~100 ms from the kill on.

Each phase waits until every acknowledged study is finished and checks Orthanc for exactly one
set of SRs per study. Prints each phase's table (``tests.reliability.ha.HaResult.table``) and a
summary.

Usage::

    python -m bench.ha.run [--studies 100] [--senders 4] [--send-seconds 30] [--model DIR]
                           [--work DIR] [--phases one,two,kill] [--env D2R_...=...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.reliability.ha import (  # noqa: E402
    KILL_NODE_A,
    HaConfig,
    HaResult,
    HaStack,
    run_scenario,
)
from tests.support.orthanc import OrthancServers  # noqa: E402
from tests.support.processes import small_random_checkpoint  # noqa: E402

PHASES = ("one", "two", "kill")


def summary(results: dict[str, HaResult]) -> str:
    head = (
        "| phase | nodes | studies | acknowledged | done exactly once | acknowledged/s | done/s "
        "| p50 s to SR | p95 s to SR | retries |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for name, r in results.items():
        t = r.throughput()
        whole = r.rows()[-1]
        acked = r.acknowledged_studies()
        lines.append(
            f"| {name} | {1 if name == 'one' else 2} | {len(r.studies)} | {len(acked)} "
            f"| {len(acked) - len(r.not_exactly_once)} | {t['acknowledged/s']} | {t['done/s']} "
            f"| {_num(whole['p50 s to SR'])} | {_num(whole['p95 s to SR'])} "
            f"| {sum(i.retries for i in r.instances)} |"
        )
    kill = results.get("kill")
    if kill is not None and kill.probe is not None:
        p = kill.probe
        lines.append("")
        lines.append(
            f"kill -9 node-a -> first association accepted through HAProxy: "
            f"{_num(p.first_accepted_after, 3)} s; HAProxy marked node-a DOWN after "
            f"{_num(p.marked_down_after, 3)} s; {p.failed} of {p.probes} probes (C-ECHO every "
            f"~100 ms for {kill.config.probe_seconds:g} s) failed"
        )
    return "\n".join(lines)


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=100, help="studies per phase")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--send-seconds", type=float, default=30.0, help="pacing of the kill phase")
    parser.add_argument(
        "--fault-after", type=float, default=None, help="seconds into the kill phase (40 %%)"
    )
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--cols", type=int, default=128)
    parser.add_argument("--phases", default=",".join(PHASES), help="one,two,kill (any of them)")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--settle-timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument(
        "--env", action="append", default=[], help="NAME=VALUE for nodes and worker (repeatable)"
    )
    args = parser.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="d2r-ha-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or small_random_checkpoint(work / "model")
    if model is None:
        return 1
    orthanc_factory = OrthancServers(work)

    env = dict(e.split("=", 1) for e in args.env)
    base = HaConfig(
        studies=args.studies,
        senders=args.senders,
        rows=args.rows,
        cols=args.cols,
        send_seconds=0.0,
        second_image_delay=0.0,  # ingest phases: every association as soon as the last ended
        settle_timeout=args.settle_timeout,
    )
    results: dict[str, HaResult] = {}
    began = time.monotonic()
    stack = HaStack(work / "stack", model, orthanc_factory, env=env)
    try:
        first = ["node-a"] if "one" in phases else ["node-a", "node-b"]
        stack.start(first)
        expected: tuple[int, int] | None = None
        for phase in phases:
            if phase != "one" and "node-b" not in stack.nodes:
                stack.start_node("node-b")
                stack.start_proxy(["node-a", "node-b"])
            names = {"one": "one node", "two": "two nodes"}
            config = replace(base, name=names.get(phase, phase), seed=PHASES.index(phase) * 7)
            if phase == "kill":
                config = replace(
                    config,
                    name="two nodes, kill -9 node-a",
                    send_seconds=args.send_seconds,
                    second_image_delay=0.3,
                    fault_after=args.fault_after,
                    faults=(KILL_NODE_A,),
                )
            result = run_scenario(stack, config, expected=expected)
            expected = result.expected_sr
            results[phase] = result
            print(result.table(), flush=True)
            if result.not_exactly_once or result.unrecorded:
                print(result.problems(), flush=True)
    finally:
        stack.stop()
        orthanc_factory.stop()
    print()
    print(summary(results))
    print(f"\nwall {time.monotonic() - began:.0f} s, work folder {work}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    name: {
                        "rows": r.rows(),
                        "throughput": r.throughput(),
                        "probe": None if r.probe is None else vars(r.probe),
                        "per_server": r.per_server(),
                    }
                    for name, r in results.items()
                },
                indent=2,
            )
        )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    ok = all(not r.not_exactly_once and not r.unrecorded for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
