"""The TensorRT backend's binding of inputs and outputs, over a stand-in runtime on the CPU.

The engines here are stand-ins (:mod:`tests.support.trt_standin`) that run the exported ONNX
graphs with onnxruntime at the raw addresses the backend binds. This checks the backend's side
of the TensorRT API without TensorRT or a GPU:
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

import pydicom
import pytest
import torch
from torch import Tensor

from model.backends import TRT_ALIGNMENT, BackendError, _bindable, _Engine, _NamedGraphs
from model.checkpoint import load_checkpoint
from model.errors import ModelError
from model.export import PARTS, read_export
from model.predict import Predictor

pytest.importorskip("onnxruntime")
from tests.support import trt_standin  # noqa: E402 (needs onnxruntime)

pytestmark = pytest.mark.slow


class StandInTensorRT(_NamedGraphs):
    """The three graphs as :class:`model.backends._Engine` objects over stand-in plans."""

    name = "tensorrt"

    def __init__(self, onnx_dir: Path, plan_dir: Path) -> None:
        self.device = torch.device("cpu")
        info = read_export(onnx_dir)
        runtime = trt_standin.Runtime(trt_standin.Logger())
        self.engines = {}
        for part in PARTS:
            plan = plan_dir / f"{part}.plan"
            plan.write_text(str(onnx_dir / info["graphs"][part]["file"]))
            self.engines[part] = _Engine(trt_standin, runtime, plan, self.device)

    def _run(self, part: str, feeds: Mapping[str, Tensor]) -> list[Tensor]:
        return self.engines[part](feeds)


@pytest.fixture(scope="module")
def standin(onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> StandInTensorRT:
    return StandInTensorRT(onnx_dir, tmp_path_factory.mktemp("plans"))


@pytest.mark.parametrize("beam", [1, 3], ids=["greedy", "beam3"])
def test_engines_give_the_torch_report(
    model_dir: Path,
    standin: StandInTensorRT,
    phantom_studies: list[pydicom.Dataset],
    rg1: pydicom.Dataset,
    beam: int,
) -> None:
    ckpt = load_checkpoint(model_dir)
    ref = Predictor(ckpt, lesion_score_threshold=0.0, beam_size=beam)
    got = Predictor(ckpt, lesion_score_threshold=0.0, beam_size=beam, backend=standin)
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
