"""trt_build up to the TensorRT API: profiles, calibration batching, options, errors, and the
exported graphs' operators against what TensorRT's ONNX parser supports.

A fake ``tensorrt`` module object stands in for TensorRT's calibrator base class here only.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.support.dicom_files import make_dx, rg1_path
from trt_build.build import BuildOptions, build_engines, import_tensorrt
from trt_build.calibration import (
    CalibrationStream,
    calibration_batches,
    find_dicom_files,
    load_images,
    make_calibrator,
    part_feeds,
)
from trt_build.errors import CalibrationError, ProfileError, TensorRTUnavailable
from trt_build.profiles import compute_profiles, dimension_ranges

GRAPHS = {
    "detector": {"inputs": [{"name": "image", "shape": ["batch", 1, 256, 256]}]},
    "visual": {
        "inputs": [
            {"name": "image", "shape": ["batch", 1, 256, 256]},
            {"name": "boxes", "shape": ["batch", 4, 4]},
            {"name": "box_mask", "shape": ["batch", 4]},
            {"name": "box_scores", "shape": ["batch", 4, 22]},
        ]
    },
    "decoder_step": {
        "inputs": [
            {"name": "tokens", "shape": ["batch", 1]},
            {"name": "memory", "shape": ["batch", 3, 128]},
            {"name": "cache", "shape": ["batch", 2, "past", 128]},
            {"name": "context", "shape": ["batch", 1, 128]},
            {"name": "cross", "shape": ["batch", 2, 68, 128]},
            {"name": "enc_mask", "shape": ["batch", 68]},
        ]
    },
}


def test_profiles_cover_images_and_beams() -> None:
    p = compute_profiles(GRAPHS, max_batch=4, beam_size=3, max_tokens=60)
    assert p["visual"]["boxes"] == {"min": [1, 4, 4], "opt": [1, 4, 4], "max": [4, 4, 4]}
    assert p["decoder_step"]["cache"] == {
        "min": [1, 2, 0, 128],  # the first step: nothing cached yet
        "opt": [3, 2, 30, 128],
        "max": [12, 2, 58, 128],  # the last step of a max_tokens-long sequence
    }
    assert p["decoder_step"]["tokens"]["max"] == [12, 1]
    assert p["decoder_step"]["cross"]["max"] == [12, 2, 68, 128]


def test_profile_errors() -> None:
    with pytest.raises(ProfileError, match="exceeds the exported limit 64"):
        dimension_ranges("decoder_step", max_batch=32, beam_size=3, max_tokens=60)
    with pytest.raises(ProfileError, match="max_batch: must be at least 1"):
        dimension_ranges("detector", max_batch=0, beam_size=3, max_tokens=60)
    bad = {"detector": {"inputs": [{"name": "image", "shape": ["height", 1]}]}}
    with pytest.raises(ProfileError, match="unknown dynamic dimension 'height'"):
        compute_profiles(bad, max_batch=2, beam_size=3, max_tokens=60)


def test_calibration_batches_drop_the_tail() -> None:
    images = [np.full((1, 8, 8), i, np.float32) for i in range(7)]
    batches = calibration_batches(images, 3)
    assert [b.shape for b in batches] == [(3, 1, 8, 8)] * 2
    assert batches[1][:, 0, 0, 0].tolist() == [3, 4, 5]
    with pytest.raises(CalibrationError, match="2 usable calibration image"):
        calibration_batches(images[:2], 3)


def test_calibration_images_from_dicom(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    make_dx(tmp_path / "a" / "one.dcm", rows=96, cols=80)
    (tmp_path / "notes.txt").write_text("not DICOM")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "rg1").write_bytes(rg1_path().read_bytes())  # no suffix: found by preamble
    files = find_dicom_files(tmp_path)
    assert [f.name for f in files] == ["one.dcm", "rg1"]
    images = load_images(files, 128)
    assert [i.shape for i in images] == [(1, 128, 128)] * 2
    assert all(i.dtype == np.float32 and 0.0 <= i.min() <= i.max() <= 1.0 for i in images)


def _fake_trt() -> Any:
    class FakeCalibratorBase:  # stands in for tensorrt.IInt8EntropyCalibrator2
        def __init__(self) -> None:
            self.base_initialised = True

    return types.SimpleNamespace(__version__="0.fake", IInt8EntropyCalibrator2=FakeCalibratorBase)


def test_calibrator_serves_batches_then_stops(tmp_path: Path) -> None:
    batches = [np.full((2, 1, 4, 4), i, np.float32) for i in range(3)]
    seen: list[np.ndarray] = []

    def boxes_fn(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        seen.append(batch)
        return np.zeros((2, 4, 4)), np.ones((2, 4)), np.zeros((2, 4, 22))

    stream = CalibrationStream("visual", batches, torch.from_numpy, boxes_fn)
    cal = make_calibrator(_fake_trt(), stream, tmp_path / "visual.calib")
    assert cal.base_initialised and cal.get_batch_size() == 2
    assert cal.read_calibration_cache() is None
    names = ["image", "boxes", "box_mask", "box_scores"]
    pointers = [cal.get_batch(names) for _ in range(3)]
    assert all(
        p is not None and len(p) == 4 and all(isinstance(x, int) for x in p) for p in pointers
    )
    assert stream._held["box_mask"].dtype == torch.bool
    assert stream._held["box_scores"].dtype == torch.float32
    assert float(stream._held["image"][0, 0, 0, 0]) == 2.0  # the last batch is held
    assert cal.get_batch(names) is None and stream.served == 3 and len(seen) == 3
    cal.write_calibration_cache(b"table")
    assert cal.read_calibration_cache() == b"table"


def test_calibration_errors(tmp_path: Path) -> None:
    batch = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(CalibrationError, match="no IInt8EntropyCalibrator2"):
        make_calibrator(types.SimpleNamespace(__version__="11.0"), CalibrationStream(
            "detector", [batch], torch.from_numpy), tmp_path / "c")  # fmt: skip
    with pytest.raises(CalibrationError, match="decoder_step: not calibrated"):
        part_feeds("decoder_step", batch)
    with pytest.raises(CalibrationError, match="has no input 'boxes'"):
        CalibrationStream("detector", [batch], torch.from_numpy).next_pointers(["boxes"])


def test_build_options() -> None:
    assert BuildOptions().precision == "fp32"
    assert BuildOptions(fp16=True).precision == "fp16"
    assert BuildOptions(int8=True, calib_dir=Path("x")).precision == "int8"
    with pytest.raises(ValueError, match="^calib_dir: --int8 needs --calib"):
        BuildOptions(int8=True)
    with pytest.raises(ValueError, match="^max_batch"):
        BuildOptions(max_batch=0)


def test_build_without_tensorrt_is_one_clear_error(model_dir: Path, tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed: the real build runs in tests/gpu")
    with pytest.raises(TensorRTUnavailable, match="tensorrt package is not importable"):
        import_tensorrt()
    with pytest.raises(TensorRTUnavailable):
        build_engines(model_dir, tmp_path / "engine", BuildOptions(fp16=True))
    assert not (tmp_path / "engine").exists()  # nothing half-built


#: every operator the exported graphs may contain: each is in TensorRT 10's ONNX parser
#: support matrix (onnx-tensorrt ``docs/operators.md``), within the restrictions checked below.
#: A new operator in an export means checking that matrix, then adding it here.
TENSORRT_OPERATORS = frozenset({
    "Add", "And", "Cast", "Clip", "Concat", "Conv", "Cos", "Div", "Erf", "Expand", "Gather",
    "Gemm", "GreaterOrEqual", "GridSample", "InstanceNormalization", "LayerNormalization",
    "LessOrEqual", "LogSoftmax", "MatMul", "Max", "MaxPool", "Mul", "Not", "Pow", "ReduceMax",
    "ReduceMean", "ReduceSum", "Relu", "Reshape", "Resize", "Shape", "Sigmoid", "Sin", "Slice",
    "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Where",
})  # fmt: skip


def test_exported_graphs_use_operators_tensorrt_parses(onnx_dir: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from model.export import PARTS, read_export

    info = read_export(onnx_dir)
    for part in PARTS:
        graph = onnx.load(str(onnx_dir / info["graphs"][part]["file"]), load_external_data=False)
        nodes = list(graph.graph.node)
        assert {n.domain for n in nodes} <= {"", "ai.onnx"}, part  # no custom-op domains
        assert not graph.functions, part  # everything inlined into standard operators
        unknown = {n.op_type for n in nodes} - TENSORRT_OPERATORS
        assert not unknown, f"{part}: check TensorRT's ONNX support for {sorted(unknown)}"
        constant = {i.name for i in graph.graph.initializer} | {
            out for n in nodes if n.op_type == "Constant" for out in n.output
        }
        for n in nodes:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            # TensorRT wants the axes of these operators fixed when the engine is built
            axes = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1}.get(n.op_type)
            if axes is not None and len(n.input) > axes and n.input[axes]:
                assert n.input[axes] in constant, f"{part}: {n.name} has computed axes"
            if n.op_type == "Resize":
                assert attrs["mode"] in (b"nearest", b"linear"), n.name
                assert attrs.get("antialias", 0) == 0, n.name
            if n.op_type == "GridSample":
                assert attrs["mode"] in (b"bilinear", b"nearest"), n.name
