"""A bounded run of the load benchmark (``bench/load/run.py``): 4 concurrent senders."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.stack import make_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SENDERS, STUDIES = 4, 10


def _bench() -> Any:
    path = Path(__file__).resolve().parents[2] / "bench" / "load" / "run.py"
    spec = importlib.util.spec_from_file_location("d2r_bench_load", path)
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return module


def test_percentile() -> None:
    bench = _bench()
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile(values, 95) == 95.0
    assert bench.percentile([3.0], 95) == 3.0


def test_concurrent_senders_every_study_reported_exactly_once(
    orthanc_factory: Any, model_dir: Path, tmp_path: Path
) -> None:
    bench = _bench()
    stack = make_stack(orthanc_factory, model_dir, tmp_path)
    try:
        stack.start_node()
        stack.start_worker()
        result = bench.run_load(stack, senders=SENDERS, studies=STUDIES, timeout=240)
    finally:
        stack.stop()
    print(result)
    assert result.studies == SENDERS * STUDIES
    assert result.acknowledged == result.studies
    assert result.done == result.studies
    assert result.exactly_once == result.studies
    assert 0 < result.p50_seconds <= result.p95_seconds <= result.max_seconds
    assert result.node_peak_rss_mib > 0 and result.worker_peak_rss_mib > 0
