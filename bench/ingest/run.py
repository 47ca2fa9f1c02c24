"""C-STORE ingest benchmark: the d2r listener versus dcmtk ``storescp +B``.

Generates (once, into a cache directory) 200 synthetic DX chest radiographs of
about 10 MB each (2500 x 2048, 16 bits allocated, 20 studies x 10 instances), then
sends all of them over one association with dcmtk ``storescu -pdu 131072`` into

(a) the node's listener: the real ``handle_store`` + spool (fsync, atomic rename)
    + a SQLite ``StudyStore``, running in this process;
(b) dcmtk ``storescp +B -pdu 131072 -od DIR`` (bit-preserving, no fsync);
(c) with ``--diagnostic`` only: (a) with the spool's fsync calls disabled, which
    separates the cost of durability from the receive path (not a product mode).

Each receiver runs 3 times; the output is wiped and ``sync`` is run before each
run. Prints a Markdown table (median of the runs) and the throughput ratio.

``--product`` measures the product as users run it instead: ``d2r node`` (with a private Redis)
and ``d2r serve`` (its worker loading the demo model while the files arrive) are started as
processes exactly as the README does, with their HTTP endpoint, audit log, metrics, reconciler
and assembler on; the harness waits for ``/readyz`` and then sends the same files to each of
them and to ``storescp +B`` alternately, run after run. Cases: one association; ``--associations
4`` concurrent ``storescu`` processes (storescp with ``--fork``); and the same files re-sent
(duplicates) right after the first arrival. ``--files N`` uses the first N files of the corpus.
It also measures the disk the spool is on (``disk_rate``: write + fdatasync, one writer per
association) before the runs and after each case, since it bounds a durable receiver.

Usage::

    python bench/ingest/run.py [--cache DIR] [--work DIR] [--runs 3] [--diagnostic]
    python bench/ingest/run.py --product [--files 40] [--associations 4] [--runs 2]
    python bench/ingest/run.py --product --profile node --files 20
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from dicom_node.scp import start_server  # noqa: E402
from dicom_node.settings import NodeSettings  # noqa: E402
from dicom_node.spool import Spool  # noqa: E402
from studydb.store import StudyStore  # noqa: E402
from tests.support.dicom_files import chest_pixels, make_dx  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
PDU = 131072
ROWS, COLS = 2500, 2048
STUDIES, PER_STUDY = 20, 10
RUNS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def corpus(cache: Path, wanted: int = STUDIES * PER_STUDY) -> list[Path]:
    """Return the first ``wanted`` of the 200 benchmark files, generating them on first use."""
    cache.mkdir(parents=True, exist_ok=True)
    files = sorted(cache.glob("s*/i*.dcm"))
    if len(files) >= wanted:
        return files[:wanted]
    studies = min(STUDIES, -(-wanted // PER_STUDY))
    print(f"generating {studies * PER_STUDY} files in {cache} ...", file=sys.stderr)
    rng = np.random.default_rng(0)
    for s in range(studies):
        study_uid = generate_uid()
        series_uid = generate_uid()
        base = chest_pixels(ROWS, COLS, bits_stored=12, seed=s)
        d = cache / f"s{s:02d}"
        d.mkdir(exist_ok=True)
        for i in range(PER_STUDY):
            ds = make_dx(None, study_uid=study_uid, series_uid=series_uid, rows=8, cols=8, seed=s)
            noise = rng.integers(0, 64, size=base.shape, dtype=np.uint16)
            ds.PixelData = np.minimum(base + noise, 4095).astype(np.uint16).tobytes()
            ds.Rows, ds.Columns = ROWS, COLS
            ds.InstanceNumber = i + 1
            ds.save_as(d / f"i{i:02d}.dcm", enforce_file_format=True)
    return sorted(cache.glob("s*/i*.dcm"))[:wanted]


def wipe(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.sync()


def disk_rate(folder: Path, writers: int = 1, mib: int = 512) -> float:
    """MB/s of ``writers`` threads writing ``mib`` MiB in all (1 MiB writes), each file
    fdatasynced, in ``folder``: the sustained rate a receiver that makes every byte durable
    before it answers cannot exceed on this filesystem (what ``dd conv=fdatasync`` shows)."""
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    paths = [folder / f"disk-probe-{k}.bin" for k in range(writers)]

    def write(path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(mib // writers):
                os.write(fd, block)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    os.sync()
    start = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write, paths))  # a write error fails the probe instead of a thread
    elapsed = time.perf_counter() - start
    for p in paths:
        p.unlink(missing_ok=True)
    return (mib // writers) * writers * (1 << 20) / 1e6 / elapsed


def send(files: list[Path], aet: str, port: int, associations: int = 1) -> float:
    """Send ``files`` with ``associations`` concurrent storescu processes; wall seconds."""
    groups = [files[k::associations] for k in range(associations)]
    cmds = [
        [STORESCU, "-pdu", str(PDU), "-aec", aet, "127.0.0.1", str(port), *map(str, group)]
        for group in groups
        if group
    ]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for cmd in cmds
    ]
    errors = [(p.wait(), p.stderr.read() if p.stderr else "") for p in procs]
    elapsed = time.perf_counter() - start
    for rc, err in errors:
        if rc != 0:
            raise RuntimeError(f"storescu failed ({rc}): {err[-2000:]}")
    return elapsed


def _wait_ready(url: str, timeout: float = 120.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - loopback
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready")


@contextmanager
def product_receiver(
    out: Path,
    command: str,
    expected: int,
    profile: Path | None = None,
    *,
    early: bool = False,
    listener_processes: int = 1,
) -> Iterator[tuple[str, int, Callable[[], int]]]:
    """``d2r node`` (private Redis) or ``d2r serve`` as a process, ready per ``/readyz``
    (``early``: as soon as the DICOM port listens, while serve's worker still loads the model;
    ``listener_processes``: ``D2R_LISTENER_PROCESSES``)."""
    from tests.support.processes import Process, base_env, d2r_cmd, start_redis

    port, http_port = free_port(), free_port()
    env = base_env(
        D2R_AE_TITLE="D2RBENCH",
        D2R_HOST="127.0.0.1",
        D2R_PORT=str(port),
        D2R_SPOOL_DIR=str(out / "spool"),
        D2R_MAX_PDU=str(PDU),
        D2R_MIN_FREE_BYTES=str(1 << 30),
        D2R_HTTP_PORT=str(http_port),
        D2R_AUDIT_LOG=str(out / "audit.jsonl"),
        D2R_MODEL=str(REPO / "models" / "d2r-demo-phantom"),
        # the studies are complete only after the run: the worker does not compete for the CPU
        D2R_STUDY_QUIET_SECONDS="600",
        D2R_STUDY_FORCE_SECONDS="600",
        D2R_STUDY_RELEASE_GRACE_SECONDS="600",
        D2R_LISTENER_PROCESSES=str(listener_processes),
    )
    redis = None
    if command == "node":
        redis, url = start_redis(out)
        env["D2R_BROKER_URL"] = url
    proc = Process(d2r_cmd(command), env=env, log=out / f"{command}.log")
    try:
        if early:
            wait_port(port, timeout=120)
        else:
            _wait_ready(f"http://127.0.0.1:{http_port}/readyz")
        sampler = None
        if profile is not None:  # py-spy samples the process (all threads) while files arrive
            sampler = subprocess.Popen(
                ["py-spy", "record", "--pid", str(proc.pid), "--format", "raw", "--threads"]
                + ["--rate", "200", "--output", str(profile), "--nonblocking"]
                + (["--subprocesses"] if listener_processes > 1 else []),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        yield "D2RBENCH", port, lambda: len(list((out / "spool").rglob("instances/*/*.dcm")))
        if sampler is not None:
            sampler.send_signal(2)
            sampler.wait(30)
    finally:
        proc.stop()
        if redis is not None:
            redis.stop()
        store = StudyStore(f"sqlite:///{out / 'd2r.db'}")
        try:
            spool_root = out / "spool" / "instances"
            uids = [p.name for p in spool_root.iterdir()] if spool_root.is_dir() else []
            received = sum(len(store.instances(uid)) for uid in uids)
        finally:
            store.close()
        if received != expected:
            raise RuntimeError(f"d2r {command}: study database holds {received} instances")


def top_frames(raw: Path, limit: int = 15) -> list[tuple[float, str]]:
    """Share of samples per innermost frame (self time) of a py-spy raw (collapsed) profile,
    idle threads (waiting in select/poll/sleep/lock acquire) left out."""
    counts: dict[str, int] = {}
    total = 0
    idle = ("select", "poll", "wait (threading", "sleep", "acquire", "_wait_for_tstate_lock")
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.split(";")[-1]
        if any(leaf.startswith(i) for i in idle):
            continue
        counts[leaf] = counts.get(leaf, 0) + int(n)
        total += int(n)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return [(100.0 * n / max(total, 1), leaf) for leaf, n in ranked]


def profile_main(args: argparse.Namespace, files: list[Path]) -> int:
    """py-spy on ``d2r node`` while the files arrive over one association; top self frames."""
    out = args.work / "out"
    wipe(out)
    command = args.profile
    raw = args.work / f"{command}-profile.txt"
    n = args.profile_associations
    processes = args.listener_processes or 1
    with product_receiver(out, command, len(files), profile=raw, listener_processes=processes) as (
        aet,
        port,
        _count,
    ):
        elapsed = send(files, aet, port, n)
    print(
        f"d2r {command}, {processes} listener process(es), {len(files)} files, "
        f"{n} association(s): {elapsed:.2f} s"
    )
    print("busy samples:\n")
    print("| share of busy samples | innermost frame |\n|---|---|")
    for share, leaf in top_frames(raw):
        print(f"| {share:.1f} % | `{leaf}` |")
    return 0


RECEIVER_NAMES = {
    "node": "d2r node",
    "node-processes": "d2r node, D2R_LISTENER_PROCESSES",
    "serve": "d2r serve",
    "serve-loading": "d2r serve, worker loading the model",
    "storescp": "storescp +B",
}


def product_main(args: argparse.Namespace, files: list[Path]) -> int:
    """Alternate d2r node, d2r serve and storescp, run after run, for each case."""
    total_mb = sum(f.stat().st_size for f in files) / 1e6
    all_cases = {
        "one": ("one association", 1, False),
        "many": (f"{args.associations} associations", args.associations, False),
        "duplicates": ("re-sent duplicates, one association", 1, True),
    }
    cases = [all_cases[c] for c in args.cases.split(",")]
    all_receivers: dict[str, Callable[[Path, int], Any]] = {
        "d2r node": lambda out, n: product_receiver(out, "node", len(files)),
        "d2r node, D2R_LISTENER_PROCESSES": lambda out, n: product_receiver(
            out, "node", len(files), listener_processes=args.listener_processes or 2
        ),
        "d2r serve": lambda out, n: product_receiver(out, "serve", len(files)),
        "d2r serve, worker loading the model": lambda out, n: product_receiver(
            out, "serve", len(files), early=True
        ),
        "storescp +B": lambda out, n: storescp_receiver(out, fork=n > 1),
    }
    wanted = {RECEIVER_NAMES[r] for r in args.receivers.split(",")} | {"storescp +B"}
    receivers = {name: r for name, r in all_receivers.items() if name in wanted}
    rows = []
    disk = {n: [disk_rate(args.work / "disk", n)] for n in {n for _, n, _ in cases}}
    for case, n, duplicates in cases:
        times: dict[str, list[float]] = {name: [] for name in receivers}
        for _ in range(args.runs):
            for name, receiver in receivers.items():
                out = args.work / "out"
                wipe(out)
                with receiver(out, n) as (aet, port, count):
                    elapsed = send(files, aet, port, n)
                    if duplicates:
                        elapsed = send(files, aet, port, n)
                    if count() != len(files):
                        raise RuntimeError(f"{name}: {count()} of {len(files)} files written")
                times[name].append(elapsed)
                print(f"{case}: {name}: {elapsed:.2f} s", file=sys.stderr)
        disk[n].append(disk_rate(args.work / "disk", n))
        base = statistics.median(times["storescp +B"])
        for name, runs in times.items():
            med = statistics.median(runs)
            rows.append((case, name, runs, med, total_mb / med, base / med))
    shutil.rmtree(args.work / "out", ignore_errors=True)
    print(f"\n{len(files)} instances, {total_mb:.1f} MB, storescu -pdu {PDU}\n")
    print("| case | receiver | runs (s) | median s | MB/s | vs storescp +B |")
    print("|---|---|---|---|---|---|")
    for case, name, runs, med, mbs, ratio in rows:
        runs_text = " / ".join(f"{t:.2f}" for t in runs)
        if name == RECEIVER_NAMES["node-processes"]:
            name = f"{name}={args.listener_processes or 2}"
        print(f"| {case} | {name} | {runs_text} | {med:.2f} | {mbs:.1f} | {ratio:.2f}x |")
    # the disk bounds a receiver that answers only once the bytes are on stable storage
    print(
        "\n| case | disk MB/s, write + fdatasync (before the runs / after each case) "
        "| the best of them vs storescp +B |"
    )
    print("|---|---|---|")
    for case, n, _ in cases:
        scp = next(mbs for c, name, _, _, mbs, _ in rows if c == case and name == "storescp +B")
        rates = " / ".join(f"{r:.0f}" for r in disk[n])
        print(
            f"| {case} ({n} writer{'s' if n > 1 else ''}) | {rates} | {max(disk[n]) / scp:.2f}x |"
        )
    return 0


@contextmanager
def _without_fsync() -> Iterator[None]:
    """Diagnostic only: make the spool's fsync calls no-ops (durability of storescp +B)."""
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


@contextmanager
def node_receiver_no_fsync(out: Path) -> Iterator[tuple[str, int, Callable[[], int]]]:
    with _without_fsync(), node_receiver(out) as receiver:
        yield receiver


@contextmanager
def node_receiver(out: Path) -> Iterator[tuple[str, int, Callable[[], int]]]:
    port = free_port()
    settings = NodeSettings.from_env(
        {
            "D2R_AE_TITLE": "D2RBENCH",
            "D2R_HOST": "127.0.0.1",
            "D2R_PORT": str(port),
            "D2R_SPOOL_DIR": str(out / "spool"),
            "D2R_MAX_PDU": str(PDU),
            "D2R_MIN_FREE_BYTES": str(1 << 30),
        }
    )
    spool = Spool(settings.spool_dir, min_free_bytes=settings.min_free_bytes)
    store = StudyStore(settings.database_url)
    server = start_server(settings, spool, store, block=False)
    assert server is not None

    def written() -> int:
        return len(list(spool.instances_dir.rglob("*.dcm")))

    try:
        yield "D2RBENCH", port, written
    finally:
        server.shutdown()
        received = sum(len(store.instances(uid)) for uid in _study_uids(spool))
        store.close()
        if received != written():
            raise RuntimeError(f"study database holds {received} of {written()} instances")


def _study_uids(spool: Spool) -> list[str]:
    return [p.name for p in spool.instances_dir.iterdir()]


@contextmanager
def storescp_receiver(
    out: Path, *, fork: bool = False
) -> Iterator[tuple[str, int, Callable[[], int]]]:
    port = free_port()
    proc = subprocess.Popen(
        [STORESCP, "+B", *(["--fork"] if fork else []), "-pdu", str(PDU), "-aet", "STORESCP"]
        + ["-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield "STORESCP", port, lambda: len(list(out.glob("*")))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@dataclass
class Result:
    receiver: str
    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=REPO / "var/bench-ingest/cache")
    parser.add_argument("--work", type=Path, default=REPO / "var/bench-ingest/work")
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument(
        "--diagnostic",
        action="store_true",
        help="also run the node with the spool's fsync disabled (not a product mode)",
    )
    parser.add_argument("--product", action="store_true", help="d2r node and d2r serve processes")
    parser.add_argument("--files", type=int, default=0, help="use the first N files (0: all)")
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument(
        "--cases",
        default="one,many,duplicates",
        help="with --product: comma list of one, many (--associations), duplicates",
    )
    parser.add_argument(
        "--receivers",
        default="node,serve,serve-loading",
        help="with --product: comma list of node, node-processes, serve, serve-loading "
        "(storescp always runs)",
    )
    parser.add_argument(
        "--listener-processes",
        type=int,
        default=None,
        help="the node's D2R_LISTENER_PROCESSES: with --receivers node-processes (default 2), "
        "with --profile (default 1; py-spy then samples every listener process)",
    )
    parser.add_argument(
        "--profile",
        choices=("node", "serve"),
        default=None,
        help="with --product: py-spy on that process while the files arrive (one run)",
    )
    parser.add_argument(
        "--profile-associations", type=int, default=1, help="with --profile: concurrent senders"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    files = corpus(args.cache, args.files or STUDIES * PER_STUDY)
    if args.product and args.profile:
        return profile_main(args, files)
    if args.product:
        return product_main(args, files)
    total_mb = sum(f.stat().st_size for f in files) / 1e6
    receivers = {
        "d2r node (handle_store + spool fsync + SQLite StudyStore)": node_receiver,
        "dcmtk storescp +B -pdu 131072": storescp_receiver,
    }
    if args.diagnostic:
        receivers["d2r node, spool fsync disabled (diagnostic)"] = node_receiver_no_fsync
    results = []
    for name, receiver in receivers.items():
        runs = []
        for _ in range(args.runs):
            out = args.work / "out"
            wipe(out)
            with receiver(out) as (aet, port, count):
                elapsed = send(files, aet, port)
                if count() != len(files):
                    raise RuntimeError(f"{name}: {count()} of {len(files)} files written")
            runs.append(elapsed)
            print(f"{name}: {elapsed:.2f} s", file=sys.stderr)
        results.append(Result(name, runs))
    shutil.rmtree(args.work / "out", ignore_errors=True)

    print(f"\n{len(files)} instances, {total_mb:.1f} MB, one association, storescu -pdu {PDU}\n")
    print("| Receiver | runs (s) | median s | MB/s | instances/s |")
    print("|---|---|---|---|---|")
    for r in results:
        runs_text = " / ".join(f"{t:.2f}" for t in r.runs)
        print(
            f"| {r.receiver} | {runs_text} | {r.median:.2f} | {total_mb / r.median:.1f} "
            f"| {len(files) / r.median:.1f} |"
        )
    ratio = results[1].median / results[0].median
    print(f"\nnode / storescp throughput ratio: {ratio:.2f}x")
    if len(results) > 2:
        ratio = results[1].median / results[2].median
        print(f"node without spool fsync / storescp throughput ratio: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
