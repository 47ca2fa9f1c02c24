"""``d2r predict`` reads its settings as every command does: the config file of ``--config``
under the environment, through the settings' declarations; its flags override them.

The model is a stand-in that records what ``d2r predict`` hands it (no torch needed).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from cli.main import main
from model.errors import CheckpointError
from tests.support.dicom_files import make_dx


class _Recorded(Exception):
    pass


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The arguments of each ``Predictor.from_checkpoint`` call (the stand-in then fails as a
    bad checkpoint does)."""
    for name in list(os.environ):
        if name.startswith("D2R_"):
            monkeypatch.delenv(name)
    calls: list[dict[str, Any]] = []

    class Predictor:
        @classmethod
        def from_checkpoint(cls, model_dir: Path, **kwargs: Any) -> None:
            calls.append({"model_dir": model_dir, **kwargs})
            raise CheckpointError("stand-in")

    predict = types.ModuleType("model.predict")
    predict.Predictor = Predictor  # type: ignore[attr-defined]
    backends = types.ModuleType("model.backends")
    backends.BackendError = _Recorded  # type: ignore[attr-defined]
    backends.TORCH, backends.ONNXRUNTIME, backends.TENSORRT = "torch", "onnxruntime", "tensorrt"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "model.predict", predict)
    monkeypatch.setitem(sys.modules, "model.backends", backends)
    return calls


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "image.dcm"
    make_dx(path)
    return str(path)


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "d2r.env"
    path.write_text(text, encoding="utf-8")
    return str(path)


FILE = (
    "D2R_MODEL=/opt/d2r/models/from-file\n"
    "D2R_BACKEND=onnxruntime\n"
    "D2R_ENGINE_DIR=/opt/d2r/engines/from-file\n"
    "D2R_DEVICE=cuda:1\n"
    "D2R_INPUT_GATE=off\n"
    "D2R_REPORT_CHOICE=probable\n"
)


def test_predict_reads_the_config_file(
    loads: list[dict[str, Any]], image: str, tmp_path: Path
) -> None:
    assert main(["--config", _config(tmp_path, FILE), "predict", image]) == 1
    (call,) = loads
    assert call["model_dir"] == Path("/opt/d2r/models/from-file")
    assert (call["backend"], call["setting"]) == ("onnxruntime", "D2R_BACKEND")
    assert call["engine_dir"] == Path("/opt/d2r/engines/from-file")
    assert call["engine_setting"] == "D2R_ENGINE_DIR"
    assert call["device"] == "cuda:1"
    assert call["input_gate"] is False
    assert call["choose_report"] is None  # probable: the most probable report


def test_flags_and_the_environment_override_the_file(
    loads: list[dict[str, Any]],
    image: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("D2R_INPUT_GATE", "on")
    monkeypatch.setenv("D2R_REPORT_CHOICE", "consistent")
    argv = ["--config", _config(tmp_path, FILE), "predict", image]
    flags = ["--model", str(tmp_path), "--backend", "torch", "--device", "cpu"]
    assert main([*argv, *flags, "--engine-dir", "/e"]) == 1
    (call,) = loads
    assert call["model_dir"] == tmp_path
    assert (call["backend"], call["setting"]) == ("torch", "--backend")
    assert (call["engine_dir"], call["engine_setting"]) == (Path("/e"), "--engine-dir")
    assert call["device"] == "cpu"
    assert call["input_gate"] is True
    assert call["choose_report"] is not None


def test_defaults_without_a_config_file(loads: list[dict[str, Any]], image: str) -> None:
    """D2R_BACKEND=auto on the CPU: a checkpoint it cannot read is left to the loader, which
    names what is wrong with it."""
    assert main(["predict", image, "--model", "/m"]) == 1
    (call,) = loads
    assert (call["backend"], call["device"], call["engine_dir"]) == ("torch", "cpu", None)
    assert (call["input_gate"], call["engine_setting"]) == (True, "--engine-dir")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("D2R_REPORT_CHOICE=longest\n", "D2R_REPORT_CHOICE: expected one of consistent, probable"),
        ("D2R_INPUT_GATE=maybe\n", "D2R_INPUT_GATE: expected true or false, got 'maybe'"),
        ("D2R_DEVICE=gpu\n", "D2R_DEVICE: expected cpu, cuda or cuda:N, got 'gpu'"),
        ("D2R_MAX_PIXEL_BYTES=1\n", "D2R_MAX_PIXEL_BYTES: must be >= "),
    ],
)
def test_an_invalid_setting_in_the_file_is_one_line(
    loads: list[dict[str, Any]],
    image: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    expected: str,
) -> None:
    assert main(["--config", _config(tmp_path, text), "predict", image, "--model", "/m"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and loads == []
    (line,) = captured.err.splitlines()
    assert line.startswith(f"d2r predict: {expected}")
