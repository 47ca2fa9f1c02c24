"""Real TensorRT build and run (needs CUDA and the tensorrt package; deselect with -m "not gpu")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
import torch

from model.backends import EngineMismatchError, TensorRTBackend
from model.predict import Predictor
from tests.support.dicom_files import rg1_path
from trt_build.build import BuildOptions, build_engines

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def trt():  # type: ignore[no-untyped-def]
    """The tensorrt module; skips (only where -m "not gpu" did not deselect) without it."""
    module = pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return module


@pytest.fixture(scope="module")
def engine_dir(trt, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("engine")
    build_engines(model_dir, out, BuildOptions(fp16=False, max_batch=2))
    return out


def test_manifest_names_this_machine(trt, engine_dir: Path, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from model.checkpoint import checkpoint_sha256

    m = json.loads((engine_dir / "manifest.json").read_text())
    assert m["checkpoint_sha256"] == checkpoint_sha256(model_dir)
    assert m["gpu_name"] == torch.cuda.get_device_name()
    assert m["tensorrt_version"] == trt.__version__
    assert (engine_dir / "timing.cache").stat().st_size > 0
    for plan in m["engines"].values():
        assert (engine_dir / plan).stat().st_size > 0


def test_tensorrt_matches_torch(engine_dir: Path, model_dir: Path) -> None:
    ds = pydicom.dcmread(rg1_path())
    ref = Predictor.from_checkpoint(
        model_dir, device="cuda", lesion_score_threshold=0.0, input_gate=False
    )
    got = Predictor.from_checkpoint(
        model_dir, device="cuda", lesion_score_threshold=0.0, backend="tensorrt", input_gate=False,
        engine_dir=engine_dir,
    )  # fmt: skip
    a, b = ref.predict([ds]), got.predict([ds])
    assert (a.findings, a.impression) == (b.findings, b.impression)
    assert [x.class_name for x in a.lesions] == [x.class_name for x in b.lesions]
    for x, y in zip(a.lesions, b.lesions, strict=True):
        assert max(abs(u - v) for u, v in zip(x.box, y.box, strict=True)) <= 1.0


def test_engine_of_another_gpu_is_refused(
    engine_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    from model.checkpoint import checkpoint_sha256

    other = tmp_path / "other"
    shutil.copytree(engine_dir, other)
    m = json.loads((other / "manifest.json").read_text())
    m["gpu_name"] = "Some Other GPU"
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineMismatchError, match="GPU 'Some Other GPU'"):
        TensorRTBackend(other, checkpoint_sha256=checkpoint_sha256(model_dir))
