"""End-to-end load: concurrent senders -> ``d2r node`` + ``d2r worker`` on Redis -> Orthanc.

``--senders`` threads each send ``--studies`` one-image studies (small synthetic DX files, one
association per study) to the node; every study must come back to Orthanc as exactly one SR pair.
Reports p50/p95/max end-to-end latency (first instance received -> SRs acknowledged, from the
study database), the wall time, and the peak RSS (VmHWM) of the node and of the worker (main
process plus its pool child), sampled while the run lasts.

Usage::

    python bench/load/run.py [--senders 4] [--studies 50] [--model DIR] [--work DIR]
                             [--batch-max N] [--batch-wait-ms MS] [--env D2R_...=...]
                             [--against D2R_BACKEND=torch]

The worker starts with the README's defaults (``D2R_BACKEND=auto``: on a new cache it first
exports and checks the ONNX graphs); the load starts once it has loaded its model, and that
start is reported beside the drain. ``--against`` adds a second run, on a fresh stack, with
other worker settings, such as the previous default ``D2R_BACKEND=torch``.

Without ``--model`` a small randomly initialised checkpoint is written first (``d2r init-model``).

It also prints where a study's time goes in the worker, the median per study of each stage the
worker logs (``study ... timings:`` lines): spool-read, decode, preprocess, predict (the model),
sr-build, write-results, database (claim and result) and, from the send task, send and its
database work; ``outside model`` is the sum of all but predict. With ``--batch-max`` > 1 a
study's predict stage also holds the rest of its batch (the batched call, then the studies
built before it), so compare studies/s rather than predict.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.reliability.stack import (  # noqa: E402
    BASIC_TEXT_SR,
    COMPREHENSIVE_SR,
    Stack,
    make_stack,
    peak_rss_kib,
    send_datasets,
)
from tests.support.dicom_files import make_dx  # noqa: E402
from tests.support.orthanc import OrthancServers  # noqa: E402
from tests.support.processes import small_random_checkpoint  # noqa: E402


@dataclass(frozen=True)
class LoadResult:
    senders: int
    studies: int
    acknowledged: int
    done: int
    exactly_once: int
    wall_seconds: float
    p50_seconds: float
    p95_seconds: float
    max_seconds: float
    node_peak_rss_mib: float
    worker_peak_rss_mib: float


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def run_load(stack: Stack, *, senders: int, studies: int, timeout: float) -> LoadResult:
    """Drive ``stack`` (node and worker already started) and measure."""
    per_sender = [
        [make_dx(None, rows=256, cols=208, seed=s * 1000 + n) for n in range(studies)]
        for s in range(senders)
    ]
    acknowledged: list[str] = []
    lock = threading.Lock()
    peaks = {"node": 0, "worker": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            assert stack.node is not None
            peaks["node"] = max(peaks["node"], peak_rss_kib(stack.node.pid))
            peaks["worker"] = max(
                peaks["worker"], sum(peak_rss_kib(w.pid) for w in stack.workers if w.alive())
            )

    def send(batch: list) -> None:  # type: ignore[type-arg]
        ok = send_datasets(stack.node_port, batch)
        with lock:
            acknowledged.extend(ok)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    threads = [threading.Thread(target=send, args=(batch,)) for batch in per_sender]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    uids = [str(ds.StudyInstanceUID) for batch in per_sender for ds in batch]
    stack.wait_states(uids, {"done", "failed", "skipped"}, timeout=timeout)
    wall = time.monotonic() - started
    stop.set()
    sampler.join()
    latencies = []
    done = 0
    for uid in uids:
        view = stack.view(uid)
        if view is not None and view.state == "done" and view.finished_at is not None:
            done += 1
            latencies.append(view.finished_at - view.first_received_at)
    exactly_once = sum(
        stack.sr_classes(uid) == sorted([COMPREHENSIVE_SR, BASIC_TEXT_SR])
        and sum(e.kind == "reported" for e in stack.store.events(uid)) == 1
        for uid in uids
    )
    return LoadResult(
        senders=senders,
        studies=len(uids),
        acknowledged=len(acknowledged),
        done=done,
        exactly_once=exactly_once,
        wall_seconds=round(wall, 1),
        p50_seconds=round(percentile(latencies, 50), 2) if latencies else float("nan"),
        p95_seconds=round(percentile(latencies, 95), 2) if latencies else float("nan"),
        max_seconds=round(max(latencies), 2) if latencies else float("nan"),
        node_peak_rss_mib=round(peaks["node"] / 1024, 1),
        worker_peak_rss_mib=round(peaks["worker"] / 1024, 1),
    )


_TIMING = re.compile(r"study (\S+) .*timings: (.*)$")
_PART = re.compile(r"([\w-]+)=([0-9.]+)ms")


def stage_breakdown(logs: list[str]) -> dict[str, float]:
    """Median milliseconds per study of each worker stage, from the workers' log lines."""
    per_study: dict[str, dict[str, float]] = {}
    for text in logs:
        for line in text.splitlines():
            m = _TIMING.search(line)
            if m is None:
                continue
            parts = per_study.setdefault(m.group(1), {})
            for name, value in _PART.findall(m.group(2)):
                parts[name] = parts.get(name, 0.0) + float(value)
    if not per_study:
        return {}
    names = sorted({n for p in per_study.values() for n in p})
    out = {n: statistics.median(p.get(n, 0.0) for p in per_study.values()) for n in names}
    out["outside model"] = statistics.median(
        sum(v for k, v in p.items() if k != "predict") for p in per_study.values()
    )
    return {k: round(v, 1) for k, v in out.items()}


def wait_model_loaded(stack: Stack, timeout: float) -> float:
    """Seconds from now until every worker logged its loaded model and backend (a worker on
    ``D2R_BACKEND=auto`` makes and checks its ONNX export first, on a new cache)."""
    started = time.monotonic()
    while not all(" loaded (sha256 " in w.log_tail(10**9) for w in stack.workers):
        if time.monotonic() - started > timeout or not all(w.alive() for w in stack.workers):
            raise RuntimeError("the worker did not load its model:\n" + stack.logs())
        time.sleep(0.2)
    return time.monotonic() - started


_BACKEND_LINE = re.compile(r"backend (\S+ on \S+ \([^)]*\))")


def run_once(args: argparse.Namespace, work: Path, model: Path, env: list[str]) -> dict[str, Any]:
    """One stack (node, worker, Redis, Orthanc) with the worker settings ``env``, measured."""
    work.mkdir(parents=True, exist_ok=True)
    orthanc_factory = OrthancServers(work)
    stack = make_stack(orthanc_factory, model, work, D2R_STUDY_QUIET_SECONDS="1")
    try:
        stack.start_node()
        batching = {
            name: str(value)
            for name, value in (
                ("D2R_BATCH_MAX", args.batch_max),
                ("D2R_BATCH_WAIT_MS", args.batch_wait_ms),
            )
            if value is not None
        }
        stack.start_worker(**batching, **dict(e.split("=", 1) for e in env))
        ready = wait_model_loaded(stack, args.timeout)
        result = run_load(stack, senders=args.senders, studies=args.studies, timeout=args.timeout)
        logs = [w.log_tail(10**9) for w in stack.workers]
    finally:
        stack.stop()
        orthanc_factory.stop()
    backend = _BACKEND_LINE.search(logs[0]) if logs else None
    return {
        "worker settings": " ".join(env) or "defaults",
        "backend": backend.group(1) if backend else "?",
        "start to model loaded s": round(ready, 1),
        "result": result,
        "breakdown": stage_breakdown(logs),
    }


# Longer than a screen: the arguments, one run per configuration, and the printed table
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--studies", type=int, default=50, help="studies per sender")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--batch-max", type=int, default=None, help="the worker's D2R_BATCH_MAX (default: its own)"
    )
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="D2R_BATCH_WAIT_MS")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        help="NAME=VALUE for the worker, e.g. D2R_BACKEND=onnxruntime (repeatable)",
    )
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a second run with these worker settings, e.g. D2R_BACKEND=torch (the previous "
        "default), on a fresh stack after the first (repeatable: all go in that run)",
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="d2r-load-"))
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or small_random_checkpoint(work / "model")
    if model is None:
        return 1
    runs = [run_once(args, work / "run1", model, args.env)]
    if args.against:
        runs.append(run_once(args, work / "run2", model, [*args.env, *args.against]))
    print(
        "| worker settings | backend | start to model loaded s | senders x studies | done "
        "| exactly once | wall s | studies/s | p50 s | p95 s | max s | node peak RSS MiB "
        "| worker peak RSS MiB | model ms / study | outside it ms / study |"
    )
    print("|" + "---|" * 15)
    for run in runs:
        r: LoadResult = run["result"]
        b = run["breakdown"]
        print(
            f"| {run['worker settings']} | {run['backend']} | {run['start to model loaded s']} "
            f"| {r.senders} x {r.studies // r.senders} | {r.done} | {r.exactly_once} "
            f"| {r.wall_seconds} | {r.done / r.wall_seconds:.2f} | {r.p50_seconds} "
            f"| {r.p95_seconds} | {r.max_seconds} | {r.node_peak_rss_mib} "
            f"| {r.worker_peak_rss_mib} | {b.get('predict', '?')} | {b.get('outside model', '?')} |"
        )
    for run in runs:
        print(json.dumps({**run, "result": asdict(run["result"])}))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(run["result"].exactly_once == run["result"].studies for run in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
