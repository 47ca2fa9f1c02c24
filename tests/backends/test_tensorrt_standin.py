"""Engine build and the TensorRT backend over a stand-in TensorRT on the CPU.

The stand-in (:mod:`tests.support.trt_standin`) checks the plans' optimisation profiles against
the exported graphs, and its engines run those graphs with onnxruntime at the raw addresses the
backend binds. This checks d2r's side of the TensorRT API without TensorRT or a GPU:
- profiles, INT8 calibration feeding and the timing cache in ``trt_build.build.build_plan``;
- tensor names and data types;
- input shapes;
- non-null, aligned addresses, including the empty cache of the first decoder step;
- output allocation.
The real engines run in ``tests/gpu``.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from torch import Tensor

from model.backends import TRT_ALIGNMENT, BackendError, _bindable, _Engine, _NamedGraphs
from model.checkpoint import load_checkpoint
from model.errors import ModelError
from model.export import PARTS, read_export
from model.predict import Predictor
from trt_build.build import TIMING_CACHE, BuildOptions, build_plan
from trt_build.calibration import CalibrationStream, make_calibrator
from trt_build.errors import EngineBuildError
from trt_build.profiles import compute_profiles

pytest.importorskip("onnxruntime")
from tests.support import trt_standin  # noqa: E402 (needs onnxruntime)

pytestmark = pytest.mark.slow


def _build(onnx_dir: Path, out: Path, part: str, profiles: Mapping[str, Any], **kw: Any) -> Path:
    """``build_plan`` of one exported graph with the stand-in; returns the plan file."""
    graph = onnx_dir / read_export(onnx_dir)["graphs"][part]["file"]
    plan = build_plan(
        trt_standin, graph, profiles[part], BuildOptions(fp16=True, max_batch=2),
        timing_cache=out / TIMING_CACHE, **kw,
    )  # fmt: skip
    (out / f"{part}.plan").write_bytes(plan)
    return out / f"{part}.plan"


def _profiles(onnx_dir: Path, model_dir: Path, **graph_changes: Any) -> dict[str, Any]:
    cfg = load_checkpoint(model_dir).config
    graphs = read_export(onnx_dir)["graphs"] | graph_changes
    return compute_profiles(graphs, max_batch=2, beam_size=cfg.beam_size, max_tokens=cfg.max_tokens)


class StandInTensorRT(_NamedGraphs):
    """The three graphs built by ``build_plan`` and run as :class:`model.backends._Engine`
    objects, all on the stand-in."""

    name = "tensorrt"

    def __init__(self, onnx_dir: Path, model_dir: Path, plan_dir: Path) -> None:
        self.device = torch.device("cpu")
        profiles = _profiles(onnx_dir, model_dir)
        runtime = trt_standin.Runtime(trt_standin.Logger())
        self.engines = {
            part: _Engine(
                trt_standin, runtime, _build(onnx_dir, plan_dir, part, profiles), self.device
            )
            for part in PARTS
        }

    def _run(self, part: str, feeds: Mapping[str, Tensor]) -> list[Tensor]:
        return self.engines[part](feeds)


@pytest.fixture(scope="module")
def standin(
    onnx_dir: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> StandInTensorRT:
    return StandInTensorRT(onnx_dir, model_dir, tmp_path_factory.mktemp("plans"))


@pytest.mark.parametrize("beam", [1, 3], ids=["greedy", "beam3"])
def test_engines_give_the_torch_report(
    model_dir: Path,
    standin: StandInTensorRT,
    phantom_studies: list[pydicom.Dataset],
    rg1: pydicom.Dataset,
    beam: int,
) -> None:
    ckpt = load_checkpoint(model_dir)
    ref = Predictor(ckpt, lesion_score_threshold=0.0, beam_size=beam, input_gate=False)
    got = Predictor(
        ckpt, lesion_score_threshold=0.0, beam_size=beam, backend=standin, input_gate=False
    )
    before = standin.engines["decoder_step"].context.runs
    for ds in [*phantom_studies, rg1]:
        a, b = ref.predict([ds]), got.predict([ds])
        assert (a.findings, a.impression) == (b.findings, b.impression)
        assert a.lesions and [x.class_name for x in a.lesions] == [x.class_name for x in b.lesions]
        for x, y in zip(a.lesions, b.lesions, strict=True):
            assert max(abs(u - v) for u, v in zip(x.box, y.box, strict=True)) <= 1.0
    # one decoder run per generated token: the engine, not a fallback, produced the text
    assert standin.engines["decoder_step"].context.runs - before >= len(phantom_studies) + 1


def test_empty_cache_is_bound_at_a_real_address(standin: StandInTensorRT) -> None:
    engine = standin.engines["decoder_step"]
    rows, sizes = 3, {"batch": 3, "past": 0}  # three beams at the first step
    feeds = {}
    for name in engine.inputs:
        _, dtype, dims = engine.engine.io[name]
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in dims)
        feeds[name] = torch.zeros(shape, dtype=torch.float32)
    feeds["tokens"] = torch.ones(rows, 1, dtype=torch.long)
    feeds["enc_mask"] = torch.ones(feeds["enc_mask"].shape, dtype=torch.bool)
    layers, d = feeds["cache"].shape[1], feeds["cache"].shape[3]
    assert feeds["cache"].numel() == 0 and feeds["cache"].data_ptr() == 0  # torch's address
    logp, memory, entries = engine(feeds)
    assert engine.context.shapes["cache"] == (rows, layers, 0, d)
    assert engine.context.addresses["cache"] != 0
    assert logp.shape[0] == rows and entries.shape == (rows, layers, 1, d)
    assert torch.isfinite(logp).all() and memory.dtype == torch.float32


def test_misaligned_and_strided_inputs_are_copied() -> None:
    base = torch.arange(1000, dtype=torch.float32)
    for t in (base[1:401].view(20, 20), base[:800].view(20, 40)[:, ::2]):
        bound = _bindable(t)
        assert bound.is_contiguous() and bound.data_ptr() % TRT_ALIGNMENT == 0
        assert torch.equal(bound, t)
    fresh = base[:400].view(20, 20)
    if fresh.data_ptr() % TRT_ALIGNMENT == 0:
        assert _bindable(fresh) is fresh  # nothing to copy


def test_shape_outside_the_engine_is_one_clear_error(standin: StandInTensorRT) -> None:
    image = torch.zeros(1, 1, 17, 17)  # the engine's images are fixed at the model size
    with pytest.raises(ModelError, match=r"detector.plan: input image of shape \(1, 1, 17, 17\)"):
        standin.engines["detector"]({"image": image})


def test_unknown_tensor_type_is_refused_at_load(onnx_dir: Path, tmp_path: Path) -> None:
    # a TensorRT without int64 (before 10) cannot hold the decoder's token ids
    old = types.SimpleNamespace(
        **{k: v for k, v in vars(trt_standin).items() if k != "int64" and not k.startswith("__")}
    )
    plan = tmp_path / "decoder_step.plan"
    plan.write_text(str(onnx_dir / read_export(onnx_dir)["graphs"]["decoder_step"]["file"]))
    runtime = trt_standin.Runtime(trt_standin.Logger())
    with pytest.raises(BackendError, match=r"decoder_step.plan: tensor tokens has unsupported"):
        _Engine(old, runtime, plan, torch.device("cpu"))


def test_plans_share_one_timing_cache(onnx_dir: Path, model_dir: Path, tmp_path: Path) -> None:
    profiles = _profiles(onnx_dir, model_dir)
    for part in PARTS:
        plan = _build(onnx_dir, tmp_path, part, profiles)
        assert plan.read_text().endswith(f"{part}.onnx")
    # each build read the cache the one before it wrote, and added its own timings
    cached = (tmp_path / TIMING_CACHE).read_text().split()
    assert cached == [f"{part}.onnx" for part in PARTS]


def test_profile_that_contradicts_the_graph_is_refused(
    onnx_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    visual = read_export(onnx_dir)["graphs"]["visual"]
    wrong = {**visual, "inputs": [dict(v) for v in visual["inputs"]]}
    wrong["inputs"][1]["shape"] = ["batch", 99, 4]  # not the number of boxes the graph has
    profiles = _profiles(onnx_dir, model_dir, visual=wrong)
    with pytest.raises(EngineBuildError, match=r"^visual.onnx: TensorRT builder returned no"):
        _build(onnx_dir, tmp_path, "visual", profiles)
    assert any(e.startswith("boxes: dimension 1") for e in trt_standin.BUILD_ERRORS)


def test_unparsable_graph_names_the_parser_error(tmp_path: Path) -> None:
    broken = tmp_path / "detector.onnx"
    broken.write_bytes(b"not an onnx graph")
    with pytest.raises(EngineBuildError, match=r"^detector.onnx: ONNX parser failed: "):
        build_plan(trt_standin, broken, {}, BuildOptions(), timing_cache=tmp_path / "t")


def test_int8_build_calibrates_once_then_reads_the_cache(
    onnx_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    profiles = _profiles(onnx_dir, model_dir)
    size = load_checkpoint(model_dir).config.image_size
    rng = np.random.default_rng(0)
    batches = [rng.random((2, 1, size, size), dtype=np.float32) for _ in range(3)]
    table = tmp_path / "detector.calib"
    served = []
    for _ in range(2):
        stream = CalibrationStream("detector", batches, torch.from_numpy)
        calibrator = make_calibrator(trt_standin, stream, table)
        _build(onnx_dir, tmp_path, "detector", profiles, calibrator=calibrator)
        served.append(stream.served)
    assert served == [3, 0]  # the second build used the table the first one wrote
    assert table.read_bytes() == b"standin 3 batches"
