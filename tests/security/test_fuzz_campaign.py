"""The fuzzing campaign in CI (``fuzz/``): every target fuzzed for a short while, and every stored
input replayed.

``test_target_fuzzes_clean`` runs each atheris target in its own process for
:data:`FUZZ_SECONDS` under the runner's limits (``python -m fuzz run``): it fails when the run
finds an input that breaks the target's property, raises, hangs past ``-timeout`` or grows past
the runner's memory limit (the target's own peak RSS; libFuzzer's ``-rss_limit_mb`` would read
the peak a child inherits from this large test process), and shows that input. The replay tests
run the seed corpus, the regression inputs (``fuzz/regressions/``) and any recorded crash
(``fuzz/crashes/``) through each target in this process. The long campaign is
``python -m fuzz run-all --seconds 1800`` (``fuzz/README.md``).
"""

from __future__ import annotations

import base64
import importlib
from pathlib import Path

import pytest

from fuzz import CORPUS_DIR, FUZZ_DIR, REGRESSIONS_DIR, TARGETS
from fuzz.__main__ import replay, replay_inputs, run

#: seconds each target is fuzzed in CI (six targets: about two minutes, plus start-up)
FUZZ_SECONDS = 20
#: the seed corpus stays small (it is kept in the repository)
MAX_CORPUS_BYTES = 2 * 1024 * 1024


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_target_fuzzes_clean(target: str, tmp_path: Path) -> None:
    result = run(target, seconds=FUZZ_SECONDS, crashes=tmp_path, echo=False)
    found = "".join(
        f"\n{p.name} (base64): {base64.b64encode(p.read_bytes()[:4096]).decode()}"
        for p in result.crashes
    )
    assert result.returncode == 0 and not result.crashes, (
        f"fuzzing {target} failed (exit {result.returncode}); reproduce with "
        f"`python -m fuzz replay {target} FILE`:{found}\n{result.output[-6000:]}"
    )
    runs = result.stats.get("number_of_executed_units", 0)
    assert runs > len(replay_inputs(target)), f"{target} ran only {runs} inputs"


@pytest.mark.slow
def test_a_target_over_its_memory_limit_fails(tmp_path: Path) -> None:
    """The limit holds: a target whose own peak passes it (here: a limit below what Python and
    the target's imports take) fails with the input, whatever this process's size."""
    result = run("destination", seconds=5, crashes=tmp_path, echo=False, rss_limit_mb=50)
    assert result.returncode != 0 and result.crashes
    assert "over the limit of 50" in result.output


#: a cstore regression input kills pynetdicom's DUL thread (InvalidEventError 'Evt15' in
#: 'Sta13', pynetdicom's own state machine); the node cleans up after it, the thread's
#: exception is pynetdicom's
_DUL_THREAD_DIES = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnhandledThreadExceptionWarning"
)
REPLAYED = [pytest.param(t, marks=_DUL_THREAD_DIES) if t == "cstore" else t for t in TARGETS]


@pytest.mark.parametrize("target", REPLAYED)
def test_stored_inputs_replay_clean(target: str) -> None:
    inputs = replay_inputs(target)
    assert any(p.parent == CORPUS_DIR / target for p in inputs), f"{target} has no seeds"
    failures = replay(target, inputs)
    assert not failures, "\n\n".join(f"{f.path}\n{f.error}" for f in failures)


def test_seed_corpus_is_small() -> None:
    total = sum(p.stat().st_size for p in CORPUS_DIR.rglob("*") if p.is_file())
    assert 0 < total < MAX_CORPUS_BYTES


@pytest.mark.parametrize("target", TARGETS)
def test_known_gaps_name_their_regression_inputs(target: str) -> None:
    """A tolerated failure is one that was reported, with an input that shows it."""
    gaps = getattr(importlib.import_module(f"fuzz.{target}"), "KNOWN_GAPS", ())
    for gap in gaps:
        path, _, name = gap.test.partition("::")
        test_file = FUZZ_DIR.parent / path
        assert gap.summary and gap.where and test_file.is_file(), gap.test
        assert f"def {name}(" in test_file.read_text(), gap.test
    if gaps:
        assert any((REGRESSIONS_DIR / target).iterdir()), f"{target}: gaps without inputs"
