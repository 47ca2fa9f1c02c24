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

Usage::

    python bench/ingest/run.py [--cache DIR] [--work DIR] [--runs 3] [--diagnostic]
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from dicom_node.scp import start_server  # noqa: E402
from dicom_node.settings import NodeSettings  # noqa: E402
from dicom_node.spool import Spool  # noqa: E402
from dicom_node.studies import StudyStore  # noqa: E402
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


def corpus(cache: Path) -> list[Path]:
    """Return the 200 benchmark files, generating them on first use."""
    cache.mkdir(parents=True, exist_ok=True)
    files = sorted(cache.glob("s*/i*.dcm"))
    if len(files) == STUDIES * PER_STUDY:
        return files
    print(f"generating {STUDIES * PER_STUDY} files in {cache} ...", file=sys.stderr)
    rng = np.random.default_rng(0)
    for s in range(STUDIES):
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
    return sorted(cache.glob("s*/i*.dcm"))


def wipe(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.sync()


def send(files: list[Path], aet: str, port: int) -> float:
    cmd = [STORESCU, "-pdu", str(PDU), "-aec", aet, "127.0.0.1", str(port), *map(str, files)]
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"storescu failed ({res.returncode}): {res.stderr[-2000:]}")
    return elapsed


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
    try:
        yield "D2RBENCH", port, lambda: len(list(spool.instances_dir.rglob("*.dcm")))
    finally:
        server.shutdown()
        received = sum(len(store.instances(uid)) for uid in _study_uids(spool))
        store.close()
        if received != STUDIES * PER_STUDY:
            raise RuntimeError(f"study database holds {received} instances")


def _study_uids(spool: Spool) -> list[str]:
    return [p.name for p in spool.instances_dir.iterdir()]


@contextmanager
def storescp_receiver(out: Path) -> Iterator[tuple[str, int, Callable[[], int]]]:
    port = free_port()
    proc = subprocess.Popen(
        [STORESCP, "+B", "-pdu", str(PDU), "-aet", "STORESCP", "-od", str(out), str(port)],
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    files = corpus(args.cache)
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
