"""torch and onnxruntime backends give the same lesions and report text (CPU)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest

from model.backends import EngineMismatchError, OnnxRuntimeBackend
from model.checkpoint import checkpoint_sha256
from model.export import OPSET, PARTS
from model.predict import Predictor, StudyPrediction
from report.grounding import most_consistent
from tests.support.dicom_files import rg1_path
from tests.support.processes import base_env, run_d2r

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow


def _predictors(
    model_dir: Path, onnx_dir: Path, beam: int, choose: bool = False
) -> tuple[Predictor, Predictor]:
    common: dict[str, Any] = {"lesion_score_threshold": 0.0, "beam_size": beam, "input_gate": False}
    if choose:  # the report the grounding rules pick among the beam's, as the node's default
        common["choose_report"] = most_consistent
    torch_p = Predictor.from_checkpoint(model_dir, backend="torch", **common)
    ort_p = Predictor.from_checkpoint(
        model_dir,
        backend="onnxruntime",
        engine_dir=onnx_dir,
        **common,
    )
    return torch_p, ort_p


def _assert_same(a: StudyPrediction, b: StudyPrediction) -> None:
    assert a.findings == b.findings
    assert a.impression == b.impression
    assert a.lesions, "threshold 0 must give lesions"
    assert [x.class_name for x in a.lesions] == [x.class_name for x in b.lesions]
    for x, y in zip(a.lesions, b.lesions, strict=True):
        assert max(abs(u - v) for u, v in zip(x.box, y.box, strict=True)) <= 1.0
        assert abs(x.score - y.score) < 1e-3


@pytest.mark.parametrize(
    ("beam", "choose"),
    [(1, False), (3, False), (5, True)],
    ids=["greedy", "beam3", "beam5-consistent"],
)
def test_same_lesions_and_text(
    model_dir: Path,
    onnx_dir: Path,
    phantom_studies: list[pydicom.Dataset],
    rg1: pydicom.Dataset,
    beam: int,
    choose: bool,
) -> None:
    torch_p, ort_p = _predictors(model_dir, onnx_dir, beam, choose)
    assert ort_p.backend.name == "onnxruntime" and torch_p.backend.name == "torch"
    texts = set()
    for ds in [*phantom_studies, rg1]:
        a, b = torch_p.predict([ds]), ort_p.predict([ds])
        _assert_same(a, b)
        texts.add(a.findings + a.impression)
        assert a.sop_instance_uid == b.sop_instance_uid == ds.SOPInstanceUID
    assert texts  # every study produced text with both backends


def test_export_json_describes_the_graphs(model_dir: Path, onnx_dir: Path) -> None:
    info = json.loads((onnx_dir / "export.json").read_text())
    assert info["checkpoint_sha256"] == checkpoint_sha256(model_dir)
    assert info["opset"] == OPSET >= 17
    assert info["versions"]["torch"] and info["versions"]["onnx"] != "absent"
    assert set(info["graphs"]) == set(PARTS)
    for part in PARTS:
        graph = info["graphs"][part]
        assert (onnx_dir / graph["file"]).is_file()
        assert (onnx_dir / graph["data"]).stat().st_size > 100_000  # weights shipped beside
        for value in graph["inputs"]:
            assert graph["dynamic_axes"][value["name"]]["0"] == "batch"
    step = info["graphs"]["decoder_step"]
    assert step["dynamic_axes"]["tokens"] == {"0": "batch"}
    assert step["dynamic_axes"]["cache"] == {"0": "batch", "2": "past"}
    assert [v["name"] for v in step["outputs"]] == ["logprobs", "memory_out", "cache_out"]


def _copy_with_hash(onnx_dir: Path, dest: Path, sha: str) -> Path:
    dest.mkdir()
    for f in onnx_dir.iterdir():
        if f.name != "export.json":
            os.symlink(f, dest / f.name)
    info = json.loads((onnx_dir / "export.json").read_text())
    info["checkpoint_sha256"] = sha
    (dest / "export.json").write_text(json.dumps(info))
    return dest


def test_export_of_another_checkpoint_is_refused(
    model_dir: Path, onnx_dir: Path, tmp_path: Path
) -> None:
    other = _copy_with_hash(onnx_dir, tmp_path / "other", "ab" * 32)
    with pytest.raises(EngineMismatchError, match=r"^D2R_BACKEND=onnxruntime: .*abababababab"):
        OnnxRuntimeBackend(other, checkpoint_sha256=checkpoint_sha256(model_dir))


def test_cli_predict_backends_agree(model_dir: Path, onnx_dir: Path, tmp_path: Path) -> None:
    outputs = {}
    for backend in ("torch", "onnxruntime"):
        res = run_d2r(
            "predict", str(rg1_path()), "--model", str(model_dir), "--json", "--min-score", "0",
            "--backend", backend, "--engine-dir", str(onnx_dir), env=base_env(),
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        outputs[backend] = json.loads(res.stdout)
    a, b = outputs["torch"], outputs["onnxruntime"]
    assert (a["findings"], a["impression"]) == (b["findings"], b["impression"])
    assert [x["class_name"] for x in a["lesions"]] == [x["class_name"] for x in b["lesions"]]
    assert len(a["lesions"]) > 0
    for x, y in zip(a["lesions"], b["lesions"], strict=True):
        assert max(abs(u - v) for u, v in zip(x["box"], y["box"], strict=True)) <= 1.0
    # an export of another checkpoint: one line, exit 2, naming the option
    bad = _copy_with_hash(onnx_dir, tmp_path / "bad", "cd" * 32)
    res = run_d2r(
        "predict", str(rg1_path()), "--model", str(model_dir), "--backend", "onnxruntime",
        "--engine-dir", str(bad), env=base_env(),
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "--backend=onnxruntime" in res.stderr
    shutil.rmtree(bad)
