"""The worker refuses a bad backend configuration before it starts (one line, exit 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from d2r_core.errors import ConfigError
from tests.support.processes import base_env, run_d2r
from worker.settings import WorkerSettings


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"D2R_BACKEND": "tvm"}, "D2R_BACKEND"),
        ({"D2R_BACKEND": "onnxruntime"}, "D2R_ENGINE_DIR"),
        ({"D2R_BACKEND": "tensorrt", "D2R_ENGINE_DIR": "/e"}, "D2R_DEVICE"),
        ({"D2R_BACKEND": "onnxruntime", "D2R_ENGINE_DIR": "/e", "D2R_TORCH_COMPILE": "1"},
         "D2R_TORCH_COMPILE"),
        ({"D2R_TORCH_COMPILE": "maybe"}, "D2R_TORCH_COMPILE"),
        ({"D2R_TORCH_COMPILE": "true"}, "D2R_TORCH_COMPILE"),  # auto may choose onnxruntime
    ],
)  # fmt: skip
def test_settings_name_the_bad_setting(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        WorkerSettings.from_env(env)
    assert info.value.setting == setting


def test_settings_accept_each_backend(tmp_path: Path) -> None:
    s = WorkerSettings.from_env({})
    assert (s.backend, s.engine_dir) == ("auto", None)
    assert s.backend_cache == s.node.spool_dir.parent / "backend-cache"
    s = WorkerSettings.from_env({"D2R_BACKEND_CACHE_DIR": str(tmp_path)})
    assert s.backend_cache == tmp_path
    s = WorkerSettings.from_env({"D2R_BACKEND": "torch", "D2R_TORCH_COMPILE": "true"})
    assert (s.backend, s.torch_compile, s.engine_dir) == ("torch", True, None)
    s = WorkerSettings.from_env(
        {"D2R_BACKEND": "tensorrt", "D2R_DEVICE": "cuda:1", "D2R_ENGINE_DIR": str(tmp_path)}
    )
    assert (s.backend, s.device, s.engine_dir) == ("tensorrt", "cuda:1", tmp_path)


def _mismatched_export(onnx_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in onnx_dir.iterdir():
        if f.name != "export.json":
            os.symlink(f, dest / f.name)
    info = json.loads((onnx_dir / "export.json").read_text())
    info["checkpoint_sha256"] = "ef" * 32
    (dest / "export.json").write_text(json.dumps(info))
    return dest


@pytest.mark.slow
def test_require_model_checks_the_engine_dir(
    model_dir: Path, onnx_dir: Path, tmp_path: Path
) -> None:
    # the random test checkpoint has no input-gate statistics
    env = {"D2R_MODEL": str(model_dir), "D2R_BACKEND": "onnxruntime", "D2R_INPUT_GATE": "off"}
    ok = WorkerSettings.from_env(env | {"D2R_ENGINE_DIR": str(onnx_dir)})
    assert ok.require_model() == model_dir
    bad = WorkerSettings.from_env(
        env | {"D2R_ENGINE_DIR": str(_mismatched_export(onnx_dir, tmp_path / "x"))}
    )
    with pytest.raises(ConfigError, match="made from checkpoint efefefefefef") as info:
        bad.require_model()
    assert info.value.setting == "D2R_ENGINE_DIR"
    trt = WorkerSettings.from_env(
        env | {"D2R_BACKEND": "tensorrt", "D2R_DEVICE": "cuda", "D2R_ENGINE_DIR": str(tmp_path)}
    )
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="tensorrt package is not installed"):
            trt.require_model()


@pytest.mark.slow
def test_worker_exits_2_with_one_line(model_dir: Path, onnx_dir: Path, tmp_path: Path) -> None:
    common = {
        "D2R_MODEL": str(model_dir),
        "D2R_SPOOL_DIR": str(tmp_path / "spool"),
        "D2R_BROKER_URL": "redis://127.0.0.1:1/0",  # never reached
    }
    cases = [
        ({"D2R_BACKEND": "tvm"}, "D2R_BACKEND"),
        ({"D2R_BACKEND": "onnxruntime"}, "D2R_ENGINE_DIR"),
        (
            {
                "D2R_BACKEND": "onnxruntime",
                "D2R_ENGINE_DIR": str(_mismatched_export(onnx_dir, tmp_path / "other")),
            },
            "D2R_ENGINE_DIR",
        ),
    ]
    for extra, setting in cases:
        res = run_d2r("worker", "--pool", "solo", env=base_env(**common, **extra), timeout=120)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and f"configuration error: {setting}:" in lines[0], lines
