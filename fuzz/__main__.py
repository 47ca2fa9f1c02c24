"""Run the fuzz targets: ``python -m fuzz {run,run-all,replay,seed} ...`` (see fuzz/README.md).

``run`` starts each target in its own process (``python -m fuzz.<target>``) under libFuzzer's
limits: ``-max_total_time``, ``-rss_limit_mb``, ``-timeout``, ``-max_len``. New corpus entries go
to a temporary folder, merged into ``fuzz/corpus/<target>/`` only with ``--merge``; an input that
fails a target is written to ``fuzz/crashes/<target>/`` (or ``--crashes``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fuzz import CORPUS_DIR, CRASHES_DIR, FUZZ_DIR, REGRESSIONS_DIR, TARGETS
from fuzz._harness import RSS_LIMIT_ENV

#: libFuzzer limits of a run (the longest input, in bytes, is per target)
RSS_LIMIT_MB = 2048
TIMEOUT_SECONDS = 30
MAX_LEN = {
    "cstore": 64 * 1024,
    "stow": 64 * 1024,
    "http_request": 16 * 1024,
    "dicom_header": 64 * 1024,
    "hl7_ack": 8 * 1024,
    "destination": 2048,
}
_STATS = re.compile(r"^stat::(\w+):\s*(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class RunResult:
    """What one run of a target did."""

    target: str
    returncode: int
    seconds: float
    stats: dict[str, int]
    crashes: tuple[Path, ...]
    output: str

    @property
    def execs_per_second(self) -> float:
        return self.stats.get("number_of_executed_units", 0) / max(self.seconds, 1e-9)


def run(
    target: str,
    *,
    seconds: int,
    crashes: Path = CRASHES_DIR,
    merge: bool = False,
    rss_limit_mb: int = RSS_LIMIT_MB,
    timeout: int = TIMEOUT_SECONDS,
    extra: Sequence[str] = (),
    echo: bool = True,
) -> RunResult:
    """Fuzz ``target`` for ``seconds`` in a child process and return what it did."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")
    artifacts = crashes / target
    artifacts.mkdir(parents=True, exist_ok=True)
    before = set(artifacts.iterdir())
    with tempfile.TemporaryDirectory(prefix=f"d2r-fuzz-{target}-corpus-") as new_corpus:
        command = [
            sys.executable,
            "-m",
            f"fuzz.{target}",
            f"-max_total_time={seconds}",
            # libFuzzer's own limit reads ru_maxrss, which a child inherits from a large parent;
            # the target checks its own peak instead (fuzz._harness.rss_bounded)
            "-rss_limit_mb=0",
            f"-timeout={timeout}",
            f"-max_len={MAX_LEN[target]}",
            f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1",
            *extra,
            new_corpus,
            str(CORPUS_DIR / target),
        ]
        started = time.monotonic()
        proc = subprocess.run(
            command,
            cwd=FUZZ_DIR.parent,
            env={**os.environ, RSS_LIMIT_ENV: str(rss_limit_mb)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            # a hung target is killed by libFuzzer's -timeout; this is the last resort
            timeout=seconds + timeout + 300,
        )
        elapsed = time.monotonic() - started
        if merge and proc.returncode == 0:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    f"fuzz.{target}",
                    "-merge=1",
                    f"-max_len={MAX_LEN[target]}",
                    str(CORPUS_DIR / target),
                    new_corpus,
                ],
                cwd=FUZZ_DIR.parent,
                check=True,
                capture_output=True,
            )
    if echo:
        sys.stdout.write(proc.stdout)
    stats = {name: int(value) for name, value in _STATS.findall(proc.stdout)}
    found = tuple(sorted(set(artifacts.iterdir()) - before))
    return RunResult(target, proc.returncode, elapsed, stats, found, proc.stdout)


@dataclass(frozen=True)
class ReplayFailure:
    path: Path
    error: str


def replay_inputs(target: str) -> list[Path]:
    """The seed corpus, the regression inputs and the recorded crashes of ``target``."""
    folders = (CORPUS_DIR / target, REGRESSIONS_DIR / target, CRASHES_DIR / target)
    return sorted(
        p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.is_file()
    )


def replay(target: str, paths: Iterable[Path]) -> list[ReplayFailure]:
    """Run each input through ``target`` in this process; the inputs that fail it."""
    module = importlib.import_module(f"fuzz.{target}")
    failures = []
    last_resort = logging.lastResort
    try:
        with warnings.catch_warnings(), module.harness() as one_input:
            warnings.simplefilter("ignore")  # as in a fuzz run: malformed input warns a lot
            for path in paths:
                if path.name.startswith("."):
                    continue
                try:
                    one_input(path.read_bytes())
                except Exception:
                    failures.append(ReplayFailure(path, traceback.format_exc()))
    finally:
        logging.lastResort = last_resort
    return failures


def _summary(result: RunResult) -> str:
    state = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
    crashes = "".join(f"\n  input: {p}" for p in result.crashes)
    return (
        f"{result.target}: {state}, {result.stats.get('number_of_executed_units', 0)} runs "
        f"in {result.seconds:.0f} s ({result.execs_per_second:.0f}/s), "
        f"peak RSS {result.stats.get('peak_rss_mb', 0)} MB{crashes}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="fuzz one target")
    one.add_argument("target", choices=TARGETS)
    every = commands.add_parser("run-all", help="fuzz every target, one after the other")
    for sub in (one, every):
        sub.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
        sub.add_argument("--merge", action="store_true", help="keep new corpus entries")
        sub.add_argument("--rss-limit-mb", type=int, default=RSS_LIMIT_MB)
        sub.add_argument("--timeout", type=int, default=TIMEOUT_SECONDS, help="per input")
        sub.add_argument("--crashes", type=Path, default=CRASHES_DIR)
    again = commands.add_parser("replay", help="run the corpus and regression inputs once")
    again.add_argument("target", choices=TARGETS)
    again.add_argument("inputs", nargs="*", type=Path, help="default: every stored input")
    commands.add_parser("seed", help="rewrite the seed corpus")
    args = parser.parse_args(argv)

    if args.command == "seed":
        from fuzz.seeds import write_corpus

        for target, count in write_corpus().items():
            print(f"{target}: {count} seeds")
        return 0
    if args.command == "replay":
        failures = replay(args.target, args.inputs or replay_inputs(args.target))
        for failure in failures:
            print(f"{failure.path}\n{failure.error}")
        return 1 if failures else 0
    targets = [args.target] if args.command == "run" else list(TARGETS)
    results = [
        run(
            target,
            seconds=args.seconds,
            crashes=args.crashes,
            merge=args.merge,
            rss_limit_mb=args.rss_limit_mb,
            timeout=args.timeout,
        )
        for target in targets
    ]
    print("\n".join(_summary(r) for r in results))
    return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
