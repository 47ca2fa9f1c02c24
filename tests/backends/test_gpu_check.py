"""The GPU check's scripts, dry-run on the CPU: the logic a GPU machine runs stays working.

``bench/gpu_check.sh`` runs where a GPU is lent for minutes at a time, so a broken stage there
costs the whole loan. These tests run the same Python checks with ``--device cpu`` on the small
checkpoint, in the same two processes for inference, and read the tables they write.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import base_env

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _rows(table: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and not line.startswith("|---"):
            rows[cells[0]] = cells[1:]
    return rows


def _run(args: list[str], out: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = base_env(PYTHONPATH=str(REPO), OUT=str(out), OMP_NUM_THREADS="2")
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_inference_check_dry_run(model_dir: Path, tmp_path: Path) -> None:
    res = _run(
        ["bench/inference/gpu.py", "--device", "cpu", "--checkpoint", str(model_dir),
         "--iters", "1", "--batch", "2", "--budget", "240",
         "--stages", "eager,export,tensorrt"],
        tmp_path, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "CPU (dry run)" in table and f"checkpoint {model_dir.name}" in table
    rows = _rows(table)
    assert rows["torch fp32"][3] == "reference"
    assert float(rows["torch fp32"][0]) > 0 and float(rows["torch fp32"][1]) > 0
    assert rows["torch fp16 (autocast)"][3].startswith("text ")
    export = rows["ONNX export"][3]
    assert export.startswith("ok: 3 graphs, opset "), export
    detector_diff = float(export.rsplit("max diff ", 1)[1])
    assert detector_diff < 1e-3
    if importlib.util.find_spec("tensorrt") is None:
        assert rows["TensorRT fp16"][3].startswith("not run: tensorrt not importable")
    # the worker's path, one study per call against predict_batch, appended by its own process
    res = _run(
        ["bench/inference/gpu.py", "--device", "cpu", "--checkpoint", str(model_dir),
         "--iters", "1", "--batch", "2", "--budget", "240", "--stages", "batching,auto",
         "--append"],
        tmp_path, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows((tmp_path / "gpu_check.md").read_text())
    alone = rows["Predictor.predict, 1 study per call"]
    batched = rows["Predictor.predict_batch, 2 studies per call"]
    assert float(alone[1]) > 0 and float(batched[1]) > 0
    assert batched[3].startswith("text same as each study alone"), batched
    auto = rows["D2R_BACKEND=auto, 1 study per call"]  # the worker's policy on this device
    assert auto[3].startswith("chose onnxruntime on cpu (D2R_BACKEND=auto: ONNX export of"), auto
    assert float(rows["D2R_BACKEND=auto, 2 studies per call"][1]) > 0
    # torch.compile runs in a second process that appends its row, as in gpu_check.sh
    res = _run(
        ["bench/inference/gpu.py", "--device", "cpu", "--checkpoint", str(model_dir),
         "--iters", "1", "--batch", "2", "--budget", "240", "--stages", "compile", "--append"],
        tmp_path, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows((tmp_path / "gpu_check.md").read_text())
    assert "ONNX export" in rows  # the first process's rows are kept
    compiled = rows["torch.compile decoder step"]
    assert float(compiled[0]) > 0 and compiled[3].startswith("text same, classes same"), compiled
    assert not list(tmp_path.glob("*.traceback.txt"))


def test_training_check_dry_run(tmp_path: Path) -> None:
    res = _run(
        ["bench/training/gpu_train.py", "--device", "cpu", "--presets", "small",
         "--studies", "8", "--epochs", "2", "--batch", "4"],
        tmp_path, timeout=240,
    )  # fmt: skip
    table = (tmp_path / "gpu_train.md").read_text()
    rows = _rows(table)
    assert "CPU (dry run)" in table
    steps, ms_per_step = int(rows["small"][0]), float(rows["small"][1])
    assert steps == 4 and ms_per_step > 0  # 8 studies, batch 4, 2 epochs
    notes = rows["small"][4]
    assert "FAILED" not in notes, res.stderr[-3000:]
    # exit 1 says the loss did not fall, and so does the row
    assert res.returncode in (0, 1), res.stderr[-3000:]
    assert (res.returncode == 0) == notes.startswith("loss falls"), notes


def test_gpu_check_stops_without_cuda(tmp_path: Path) -> None:
    env = base_env(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, OUT=str(tmp_path))
    res = subprocess.run(
        ["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert res.returncode == 1
    assert "CUDA is not available" in res.stderr
    assert "bench/inference/gpu.py --device cpu" in res.stderr
    assert not (tmp_path / "gpu_check.md").exists()
