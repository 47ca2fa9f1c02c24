"""Backend selection errors name the setting; TensorRT manifests must match the machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.backends import (
    BackendError,
    EngineManifest,
    EngineMismatchError,
    RuntimeInfo,
    check_manifest,
    create_backend,
    manifest_mismatches,
)
from model.config import SMALL
from model.modeling import D2RNet
from tests.support.dicom_files import rg1_path
from tests.support.processes import base_env, run_d2r

SHA = "12" * 32
H100 = RuntimeInfo("NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35")


@pytest.fixture(scope="module")
def tiny() -> D2RNet:
    torch.manual_seed(0)
    return D2RNet(SMALL.replace(vocab_size=40)).eval()


def _manifest(**changes: object) -> EngineManifest:
    base = EngineManifest(
        checkpoint_sha256=SHA,
        tensorrt_version=H100.tensorrt_version,
        cuda_version="13.0",
        gpu_name=H100.gpu_name,
        compute_capability=H100.compute_capability,
        precision="fp16",
        max_batch=4,
        profiles={"detector": {"image": {"min": [1, 1, 256, 256], "opt": [1, 1, 256, 256],
                                         "max": [4, 1, 256, 256]}}},
        engines={"detector": "detector.plan"},
        created="2026-11-27T21:00:00+00:00",
    )  # fmt: skip
    data = base.to_dict() | changes
    return EngineManifest.from_dict(data)


@pytest.mark.parametrize(
    ("name", "kwargs", "pattern"),
    [
        ("tensorflow", {}, r"^D2R_BACKEND: unknown backend 'tensorflow'"),
        ("onnxruntime", {}, r"^D2R_BACKEND=onnxruntime needs .* set D2R_ENGINE_DIR"),
        ("tensorrt", {}, r"^D2R_BACKEND=tensorrt needs .* set D2R_ENGINE_DIR"),
        ("onnxruntime", {"engine_dir": Path("/nonexistent")}, r"^D2R_ENGINE_DIR: /nonexistent"),
        ("onnxruntime", {"torch_compile": True}, r"^D2R_BACKEND=onnxruntime: torch.compile"),
    ],
)
def test_selection_errors_name_the_setting(
    tiny: D2RNet, name: str, kwargs: dict[str, object], pattern: str
) -> None:
    with pytest.raises(BackendError, match=pattern):
        create_backend(name, tiny, checkpoint_sha256=SHA, **kwargs)  # type: ignore[arg-type]


def test_tensorrt_needs_cuda_and_the_package(tiny: D2RNet, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"^D2R_BACKEND=tensorrt needs a CUDA device"):
        create_backend("tensorrt", tiny, checkpoint_sha256=SHA, engine_dir=tmp_path)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match=r"^--backend=tensorrt: .*not importable"):
            create_backend(
                "tensorrt", tiny, checkpoint_sha256=SHA, engine_dir=tmp_path, device="cuda",
                setting="--backend",
            )  # fmt: skip


def test_torch_backend_is_the_model(tiny: D2RNet) -> None:
    backend = create_backend("torch", tiny, checkpoint_sha256=SHA)
    image = torch.rand(2, 1, 256, 256)
    with torch.no_grad():
        ref = tiny.detector.dense(tiny.stem(image))
        got = backend.detector(image)
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b)


def test_manifest_round_trip(tmp_path: Path) -> None:
    m = _manifest()
    m.write(tmp_path)
    assert EngineManifest.read(tmp_path) == m
    assert json.loads((tmp_path / "manifest.json").read_text())["format"] == "d2r-trt-engine/2"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"precision": "fp8"}, "precision"),
        ({"max_batch": 0}, "max_batch"),
        ({"format": "other/1"}, "format"),
        ({"extra": 1}, "extra"),
    ],
)
def test_manifest_validation_names_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: "):
        _manifest(**changes)


def test_manifest_missing_field_and_file(tmp_path: Path) -> None:
    data = _manifest().to_dict()
    del data["gpu_name"]
    with pytest.raises(ValueError, match=r"^gpu_name: missing"):
        EngineManifest.from_dict(data)
    with pytest.raises(BackendError, match=r"manifest.json: missing"):
        EngineManifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BackendError, match=r"gpu_name: missing"):
        EngineManifest.read(tmp_path)


def test_manifest_matches_its_own_machine() -> None:
    assert manifest_mismatches(_manifest(), checkpoint_sha256=SHA, runtime=H100) == []
    check_manifest(_manifest(), checkpoint_sha256=SHA, runtime=H100)


@pytest.mark.parametrize(
    ("runtime", "sha", "expected"),
    [
        (RuntimeInfo("NVIDIA A100-SXM4-80GB", "8.0", H100.tensorrt_version), SHA, "GPU"),
        (RuntimeInfo(H100.gpu_name, "9.0", "10.3.0"), SHA, "TensorRT 10.13.0.35 != 10.3.0"),
        (H100, "34" * 32, "checkpoint 121212121212 != loaded 343434343434"),
    ],
    ids=["other-gpu", "other-tensorrt", "other-checkpoint"],
)
def test_mismatched_engine_is_refused(runtime: RuntimeInfo, sha: str, expected: str) -> None:
    with pytest.raises(EngineMismatchError) as info:
        check_manifest(_manifest(), checkpoint_sha256=sha, runtime=runtime)
    message = str(info.value)
    assert message.startswith("D2R_BACKEND=tensorrt: engine does not match")
    assert expected in message and "\n" not in message
    if expected == "GPU":
        assert "compute capability 9.0 != 8.0" in message


def test_cli_predict_unavailable_backend_is_one_line(model_dir: Path, tmp_path: Path) -> None:
    res = run_d2r(
        "predict", str(rg1_path()), "--model", str(model_dir), "--backend", "onnxruntime",
        env=base_env(),
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "d2r predict: --backend=onnxruntime needs an ONNX export directory: set --engine-dir"
    ]
    res = run_d2r(
        "predict", str(rg1_path()), "--model", str(model_dir), env=base_env(D2R_BACKEND="tvm")
    )
    assert res.returncode == 2 and "D2R_BACKEND: unknown backend 'tvm'" in res.stderr
