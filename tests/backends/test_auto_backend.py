"""``D2R_BACKEND=auto``: the policy per device, the export cache in each of its states, two
processes on one cache, the fallback to torch, and parity with torch through the predictor."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

import model.export
from model import export_cache
from model.backend_choice import AUTO, BackendChoice, CacheOutcome, choose_cpu, choose_cuda
from model.backends import BackendError, OnnxRuntimeBackend
from model.checkpoint import checkpoint_sha256
from model.export_cache import PARITY_FILE, entry_problem, prepare_export
from model.predict import Predictor, StudyPrediction
from worker.predictor import ModelOptions, open_predictor

pytest.importorskip("onnxruntime")


# --------------------------------------------------------------------------- the policy


def test_cpu_takes_a_checked_export_and_says_so(tmp_path: Path) -> None:
    entry = tmp_path / ("ab" * 32)
    choice = choose_cpu(CacheOutcome(entry))
    assert (choice.backend, choice.engine_dir, choice.policy) == ("onnxruntime", entry, AUTO)
    assert choice.fallback is None
    assert choice.describe() == (
        "onnxruntime on cpu (D2R_BACKEND=auto: ONNX export of abababababab checked against torch)"
    )


def test_cpu_without_an_export_runs_torch_with_the_reason() -> None:
    outcome = CacheOutcome(None, fallback="parity_failed", detail="probe 0: text differs")
    choice = choose_cpu(outcome)
    assert (choice.backend, choice.engine_dir, choice.fallback) == ("torch", None, "parity_failed")
    assert choice.describe() == (
        "torch on cpu (D2R_BACKEND=auto, fallback parity_failed: probe 0: text differs)"
    )


def test_gpu_takes_tensorrt_only_with_an_engine_folder(tmp_path: Path) -> None:
    with_engine = choose_cuda(engine_dir=tmp_path, device="cuda:1")
    assert (with_engine.backend, with_engine.engine_dir, with_engine.device) == (
        "tensorrt",
        tmp_path,
        "cuda:1",
    )
    without = choose_cuda(engine_dir=None, device="cuda")
    assert (without.backend, without.engine_dir, without.fallback) == ("torch", None, None)


def test_an_explicit_backend_is_described_as_set() -> None:
    assert BackendChoice("torch").describe() == "torch on cpu (set explicitly)"


# --------------------------------------------------------------------------- the cache


@pytest.fixture(scope="module")
def made(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two processes preparing one empty cache at once (real export and parity check)."""
    cache = tmp_path_factory.mktemp("shared-cache")
    sha = checkpoint_sha256(model_dir)
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(2) as pool:
        outcomes = pool.starmap(prepare_export, [(model_dir, sha, cache)] * 2)
    return {"cache": cache, "sha": sha, "outcomes": outcomes}


@pytest.mark.slow
def test_two_processes_make_one_entry(made: dict[str, Any]) -> None:
    cache, sha, outcomes = made["cache"], made["sha"], made["outcomes"]
    assert [o.export_dir for o in outcomes] == [cache / sha] * 2
    assert sorted(o.created for o in outcomes) == [False, True]  # one made it, one waited
    assert sorted(p.name for p in cache.iterdir()) == [sha, f"{sha}.lock"]  # no partial folder
    parity = json.loads((cache / sha / PARITY_FILE).read_text())
    assert parity["passed"] is True and parity["probes"] == 2
    assert set(parity["files"]) == {p.name for p in (cache / sha).iterdir()} - {PARITY_FILE}
    assert entry_problem(cache / sha, sha) is None


def _copy_entry(made: dict[str, Any], cache: Path) -> Path:
    entry: Path = cache / made["sha"]
    shutil.copytree(made["cache"] / made["sha"], entry)
    return entry


class _Exporter:
    """Stands in for the ONNX exporter: copies a finished export (optionally with the
    detector's weights scaled, so that it computes something else) and counts its calls."""

    def __init__(self, source: Path, *, fail: bool = False, perturb: bool = False) -> None:
        self.source = source
        self.fail = fail
        self.perturb = perturb
        self.calls = 0

    def __call__(self, checkpoint_dir: Path, out_dir: Path) -> dict[str, Any]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("exporter crashed")
        out_dir.mkdir(parents=True)
        for f in self.source.iterdir():
            if f.name != PARITY_FILE:
                shutil.copy(f, out_dir / f.name)
        if self.perturb:
            weights = out_dir / "detector.onnx.data"
            scaled = np.frombuffer(weights.read_bytes(), dtype=np.float32) * np.float32(1.5)
            weights.write_bytes(scaled.tobytes())
        info: dict[str, Any] = json.loads((out_dir / "export.json").read_text())
        info["checkpoint_sha256"] = checkpoint_sha256(checkpoint_dir)
        (out_dir / "export.json").write_text(json.dumps(info))
        return info


@pytest.mark.slow
def test_a_valid_entry_is_used_without_exporting(
    made: dict[str, Any], model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = _copy_entry(made, tmp_path)
    exporter = _Exporter(entry, fail=True)
    monkeypatch.setattr(model.export, "export_checkpoint", exporter)
    outcome = prepare_export(model_dir, made["sha"], tmp_path)
    assert (outcome.export_dir, outcome.created, exporter.calls) == (entry, False, 0)


@pytest.mark.slow
def test_another_checkpoints_entry_is_ignored(
    made: dict[str, Any], eager_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache holds the session model's entry; a second checkpoint gets its own."""
    _copy_entry(made, tmp_path)
    exporter = _Exporter(made["cache"] / made["sha"])  # the eager model shares the weights
    monkeypatch.setattr(model.export, "export_checkpoint", exporter)
    other = checkpoint_sha256(eager_model)
    assert other != made["sha"]
    outcome = prepare_export(eager_model, other, tmp_path)
    assert (outcome.export_dir, outcome.created, exporter.calls) == (tmp_path / other, True, 1)
    assert entry_problem(tmp_path / made["sha"], made["sha"]) is None  # left alone


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated graph", "other checkpoint", "no parity record"])
def test_a_corrupt_entry_is_made_again(
    damage: str,
    made: dict[str, Any],
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sha = made["sha"]
    entry = _copy_entry(made, tmp_path)
    if damage == "truncated graph":
        data = entry / "detector.onnx.data"
        data.write_bytes(data.read_bytes()[:1000])
        assert "detector.onnx.data: missing or changed" in str(entry_problem(entry, sha))
    elif damage == "other checkpoint":
        info = json.loads((entry / "export.json").read_text())
        (entry / "export.json").write_text(json.dumps(info | {"checkpoint_sha256": "ef" * 32}))
        assert "exported from checkpoint efefefefefef" in str(entry_problem(entry, sha))
    else:
        (entry / PARITY_FILE).unlink()
    exporter = _Exporter(made["cache"] / sha)
    monkeypatch.setattr(model.export, "export_checkpoint", exporter)
    outcome = prepare_export(model_dir, sha, tmp_path)
    assert (outcome.export_dir, outcome.created, exporter.calls) == (entry, True, 1)
    assert entry_problem(entry, sha) is None


@pytest.mark.slow
def test_a_failed_parity_check_runs_torch_and_is_not_retried(
    made: dict[str, Any], model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export whose detector computes something else than the checkpoint's."""
    cache = tmp_path / "cache"
    exporter = _Exporter(made["cache"] / made["sha"], perturb=True)
    monkeypatch.setattr(model.export, "export_checkpoint", exporter)
    outcome = prepare_export(model_dir, made["sha"], cache)
    assert (outcome.export_dir, outcome.fallback) == (None, "parity_failed")
    assert outcome.detail.startswith("parity check against torch failed: probe 0:")
    assert not (cache / made["sha"]).exists()
    again = prepare_export(model_dir, made["sha"], cache)  # recorded: no second export
    assert (again.fallback, again.detail, exporter.calls) == ("parity_failed", outcome.detail, 1)
    marker = cache / f"{made['sha']}.failed"
    record = json.loads(marker.read_text())
    record["versions"]["onnxruntime"] = "0.0.1"  # another onnxruntime: worth a new try
    marker.write_text(json.dumps(record))
    prepare_export(model_dir, made["sha"], cache)
    assert exporter.calls == 2


def test_a_failed_export_runs_torch(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model.export, "export_checkpoint", _Exporter(tmp_path, fail=True))
    outcome = prepare_export(model_dir, checkpoint_sha256(model_dir), tmp_path / "cache")
    assert (outcome.export_dir, outcome.fallback) == (None, "export_failed")
    assert outcome.detail == "ONNX export failed: RuntimeError: exporter crashed"
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []


def test_an_unwritable_cache_runs_torch(model_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    outcome = prepare_export(model_dir, checkpoint_sha256(model_dir), blocker / "cache")
    assert (outcome.export_dir, outcome.fallback) == (None, "cache_unusable")


def test_no_onnxruntime_runs_torch(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_cache, "runtime_versions", lambda: {"torch": "2", "onnxruntime": ""})
    outcome = prepare_export(model_dir, checkpoint_sha256(model_dir), tmp_path)
    assert (outcome.export_dir, outcome.fallback) == (None, "onnxruntime_missing")


# --------------------------------------------------------------------------- the predictor


def _options(model_dir: Path, cache: Path, **changes: Any) -> ModelOptions:
    base = ModelOptions(model_dir, cache_dir=cache, input_gate=False, report_choice="probable")
    return ModelOptions(**{**base.__dict__, **changes})


@pytest.mark.slow
def test_auto_predicts_as_torch_does(
    made: dict[str, Any],
    model_dir: Path,
    phantom_studies: list[pydicom.Dataset],
    rg1: pydicom.Dataset,
) -> None:
    auto = open_predictor(_options(model_dir, made["cache"], lesion_min_score=0.0))
    torch_p = open_predictor(
        _options(model_dir, made["cache"], backend="torch", lesion_min_score=0.0)
    )
    assert isinstance(auto.backend, OnnxRuntimeBackend)
    assert auto.backend_choice.engine_dir == made["cache"] / made["sha"]
    assert "backend: onnxruntime on cpu (D2R_BACKEND=auto: ONNX export of" in auto.parameters[-1]
    assert torch_p.parameters[-1] == "backend: torch on cpu (set explicitly)"
    for ds in [*phantom_studies, rg1]:
        _assert_same(torch_p.predict([ds]), auto.predict([ds]))


def _assert_same(a: StudyPrediction, b: StudyPrediction) -> None:
    assert (a.findings, a.impression) == (b.findings, b.impression)
    assert a.lesions, "threshold 0 must give lesions"
    assert [x.class_name for x in a.lesions] == [x.class_name for x in b.lesions]
    for x, y in zip(a.lesions, b.lesions, strict=True):
        assert max(abs(u - v) for u, v in zip(x.box, y.box, strict=True)) <= 1.0
        assert abs(x.score - y.score) < 1e-3


@pytest.mark.slow
def test_an_export_that_does_not_load_gives_way_to_torch(
    made: dict[str, Any], model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise BackendError("D2R_BACKEND=onnxruntime: session failed")

    monkeypatch.setattr(OnnxRuntimeBackend, "__init__", refuse)
    predictor = open_predictor(_options(model_dir, made["cache"]))
    choice = predictor.backend_choice
    assert (choice.backend, choice.policy, choice.fallback) == ("torch", AUTO, "load_failed")
    assert predictor.parameters[-1] == (
        "backend: torch on cpu (D2R_BACKEND=auto, fallback load_failed: "
        "D2R_BACKEND=onnxruntime: session failed)"
    )


@pytest.mark.slow
def test_an_explicit_backend_refuses_instead_of_falling_back(
    made: dict[str, Any], model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise BackendError("D2R_BACKEND=onnxruntime: session failed")

    monkeypatch.setattr(OnnxRuntimeBackend, "__init__", refuse)
    explicit = _options(
        model_dir, made["cache"], backend="onnxruntime", engine_dir=made["cache"] / made["sha"]
    )
    with pytest.raises(BackendError, match="session failed"):
        open_predictor(explicit)


def test_predictor_defaults_to_naming_its_backend(model_dir: Path) -> None:
    p = Predictor.from_checkpoint(model_dir, backend="torch", input_gate=False)
    assert p.backend_choice == BackendChoice("torch")
