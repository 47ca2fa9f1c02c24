"""Urgent studies first, measured: an urgent study's time to SR behind a routine backlog.

The production split on loopback, started as the README starts it: ``d2r node`` and one ``d2r
worker`` on a private Redis, Orthanc as the PACS (``tests/reliability/stack.py``). First, on the
idle node, one urgent study from each source (after a warm-up study); then a backlog of
``--backlog`` routine studies, and, while it is worked off, one urgent study from each source in
turn:

- ``rule``: dcmtk ``storescu`` from calling AE ``ED_CR1`` (``D2R_PRIORITY_RULES=ED_CR1=urgent``);
- ``header``: dcmtk ``storescu`` of a study whose Requested Procedure Priority is ``STAT``;
- ``c-store``: pynetdicom ``send_c_store(ds, priority=1)`` (C-STORE Priority HIGH; storescu
  cannot set it).

For each it reports the time from its last instance acknowledged to its SRs acknowledged by the
PACS (the study's ``finished_at``), the routine studies claimed between its queueing and its
claim (ahead of it) and those finished between its arrival and its SRs, and the same time on the
idle node; then that every routine study was reported exactly once. Target: under the backlog
within two study-processing times of idle, at most one batch of routine studies ahead.

    python -m bench.priority.run --backlog 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.reliability.stack import Stack, make_stack, send_datasets  # noqa: E402
from tests.support.dicom_files import make_dx  # noqa: E402
from tests.support.orthanc import OrthancServers  # noqa: E402
from tests.support.processes import small_random_checkpoint  # noqa: E402

STORESCU = "/usr/bin/storescu"
RULE_AE = "ED_CR1"
SOURCES = ("rule", "header", "c-store")
DEMO_MODEL = REPO / "models" / "d2r-demo-phantom"


@dataclass(frozen=True)
class Urgent:
    source: str
    priority: str
    backlog_left: int
    seconds_to_sr: float
    routine_claimed_ahead: int
    routine_finished_before: int


def send_urgent(stack: Stack, source: str, work: Path, seed: int) -> tuple[str, float]:
    """Send one urgent study by ``source``; returns its UID and when its last instance was
    acknowledged."""
    ds = make_dx(None, seed=seed)
    if source == "header":
        ds.RequestedProcedurePriority = "STAT"
    if source == "c-store":
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID))
        assoc = ae.associate("127.0.0.1", stack.node_port, ae_title="D2R")
        if not assoc.is_established:
            raise RuntimeError("the node refused the association")
        try:
            status = assoc.send_c_store(ds, priority=1)
        finally:
            assoc.release()
        if int(status.Status) != 0:
            raise RuntimeError(f"C-STORE answered 0x{int(status.Status):04X}")
        return str(ds.StudyInstanceUID), time.time()
    path = work / f"urgent-{seed}.dcm"
    ds.save_as(path, enforce_file_format=True)
    calling = RULE_AE if source == "rule" else "MODALITY"
    subprocess.run(
        [STORESCU, "-aet", calling, "-aec", "D2R", "127.0.0.1", str(stack.node_port), str(path)],
        check=True,
        capture_output=True,
    )
    return str(ds.StudyInstanceUID), time.time()


def _event_at(stack: Stack, uid: str, kind: str) -> float:
    return max(e.at for e in stack.store.events(uid) if e.kind == kind)


def measure(
    stack: Stack, uid: str, sent: float, routine: list[str], timeout: float
) -> dict[str, Any]:
    """Wait for ``uid`` to be done; its time to SR and the routine studies ahead of it."""
    stack.wait_states([uid], {"done", "failed"}, timeout=timeout)
    view = stack.view(uid)
    assert view is not None and view.finished_at is not None, view
    queued, claimed = _event_at(stack, uid, "queued"), _event_at(stack, uid, "processing")
    ahead = finished = 0
    for r in routine:
        claims = [e.at for e in stack.store.events(r) if e.kind == "processing"]
        ahead += any(queued <= at < claimed for at in claims)
        done = stack.view(r)
        finished += (
            done is not None
            and done.finished_at is not None
            and (sent <= done.finished_at <= view.finished_at)
        )
    return {
        "priority": view.priority,
        "seconds_to_sr": round(view.finished_at - sent, 2),
        "routine_claimed_ahead": ahead,
        "routine_finished_before": finished,
    }


def processing_seconds(stack: Stack, uids: list[str]) -> float:
    """The median time from a study's claim to its SRs acknowledged."""
    times = []
    for uid in uids:
        view = stack.view(uid)
        if view is not None and view.finished_at is not None:
            times.append(view.finished_at - _event_at(stack, uid, "processing"))
    return statistics.median(times) if times else float("nan")


def wait_model_loaded(stack: Stack, timeout: float) -> None:
    started = time.monotonic()
    while not all(" loaded (sha256 " in w.log_tail(10**9) for w in stack.workers):
        if time.monotonic() - started > timeout or not all(w.alive() for w in stack.workers):
            raise RuntimeError("the worker did not load its model:\n" + stack.logs())
        time.sleep(0.2)


def backlog_left(stack: Stack, routine: list[str]) -> int:
    return sum(stack.state(u) in ("receiving", "queued") for u in routine)


# Longer than a screen: the run's phases in order (idle, backlog, urgent under it, checks)
def run(args: argparse.Namespace, work: Path, model: Path) -> dict[str, Any]:
    orthancs = OrthancServers(work)
    env = dict(e.split("=", 1) for e in args.env)
    stack = make_stack(
        orthancs,
        model,
        work,
        D2R_STUDY_QUIET_SECONDS="1",
        D2R_PRIORITY_RULES=f"{RULE_AE}=urgent",
    )
    try:
        stack.start_node()
        stack.start_worker(**env)
        wait_model_loaded(stack, args.timeout)
        seed = 10_000
        warm = send_datasets(stack.node_port, [make_dx(None, seed=seed)])
        assert warm, "the warm-up study was not acknowledged"
        idle: dict[str, dict[str, Any]] = {}
        idle_uids = []
        for source in SOURCES:
            seed += 1
            uid, sent = send_urgent(stack, source, work, seed)
            idle[source] = measure(stack, uid, sent, [], args.timeout)
            idle_uids.append(uid)
        per_study = processing_seconds(stack, idle_uids)

        backlog = [make_dx(None, seed=n) for n in range(args.backlog)]
        routine = [str(ds.StudyInstanceUID) for ds in backlog]
        acknowledged = send_datasets(stack.node_port, backlog)
        stack.wait_states(routine, {"queued", "processing", "sending", "done"}, args.timeout)
        under: list[Urgent] = []
        for source in SOURCES:
            seed += 1
            left = backlog_left(stack, routine)
            uid, sent = send_urgent(stack, source, work, seed)
            under.append(
                Urgent(
                    source, backlog_left=left, **measure(stack, uid, sent, routine, args.timeout)
                )
            )
        stack.wait_states(routine, {"done", "failed"}, timeout=args.timeout)
        once = 0
        for uid in routine:
            try:
                stack.assert_reported_exactly_once(uid)
                once += 1
            except AssertionError:
                pass
        batch = int(env.get("D2R_BATCH_MAX", "1"))
        verdicts = [
            u.seconds_to_sr <= idle[u.source]["seconds_to_sr"] + 2 * per_study
            and u.routine_claimed_ahead <= batch
            for u in under
        ]
        return {
            "backlog": args.backlog,
            "acknowledged": len(acknowledged),
            "study processing s (median, idle)": round(per_study, 2),
            "idle": idle,
            "under backlog": [asdict(u) for u in under],
            "routine reported exactly once": f"{once} of {len(routine)}",
            "target met": all(verdicts) and once == len(routine),
        }
    finally:
        stack.stop()
        orthancs.stop()


def table(result: dict[str, Any]) -> str:
    lines = [
        "| source | priority | idle s to SR | under backlog s to SR | backlog left at send "
        "| routine claimed ahead | routine finished before it |",
        "|---|---|---|---|---|---|---|",
    ]
    for u in result["under backlog"]:
        idle = result["idle"][u["source"]]
        lines.append(
            f"| {u['source']} | {u['priority']} | {idle['seconds_to_sr']} | {u['seconds_to_sr']} "
            f"| {u['backlog_left']} | {u['routine_claimed_ahead']} "
            f"| {u['routine_finished_before']} |"
        )
    lines.append(
        f"study processing (median, idle): {result['study processing s (median, idle)']} s; "
        f"routine reported exactly once: {result['routine reported exactly once']}; "
        f"target met: {result['target met']}"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=30, help="routine studies queued first")
    parser.add_argument("--model", type=Path, default=None, help="default: the demo model")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the worker")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="d2r-priority-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or (DEMO_MODEL if DEMO_MODEL.is_dir() else None)
    model = model or small_random_checkpoint(work / "model")
    if model is None:
        return 1
    started = time.monotonic()
    result = run(args, work, model)
    result["wall s"] = round(time.monotonic() - started, 1)
    print(table(result))
    print(json.dumps(result, indent=2))
    return 0 if result["target met"] else 2


if __name__ == "__main__":
    sys.exit(main())
