"""The input gate: cheap header/pixel checks, the Mahalanobis score, calibrate-gate, and the
bundled demo model declining real radiographs while accepting phantom studies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from model.calibrate import fit_from_features
from model.errors import CheckpointError, GateMissingError
from model.gate import GATE_FILE, header_reason, load_gate, pixel_reason
from model.predict import Predictor
from model.preprocess import BoxMapping, ImageSample
from tests.support.processes import base_env, run_d2r

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "d2r-demo-phantom"
#: the real radiographs of pydicom-data: the RG1 chest CR and the RG3 tibia, every syntax
REAL = (
    "RG1_UNCR",
    "RG1_UNCI",
    "RG1_J2KR",
    "RG1_J2KI",
    "RG3_UNCR",
    "RG3_UNCI",
    "RG3_J2KR",
    "RG3_J2KI",
)


def test_mahalanobis_threshold_accepts_new_in_distribution_and_declines_a_shift() -> None:
    gen = torch.Generator().manual_seed(0)
    fit = torch.randn(400, 8, generator=gen) * torch.linspace(0.5, 3.0, 8)
    stats = fit_from_features(fit)
    assert stats.fit_images == 400 and stats.percentile == 99.5
    new = torch.randn(2000, 8, generator=gen) * torch.linspace(0.5, 3.0, 8)
    accepted = float((stats.score(new) <= stats.threshold).float().mean())
    assert 0.98 <= accepted < 1.0
    # a shift along the narrowest axis is far in Mahalanobis terms, though small in Euclidean
    shifted = new.clone()
    shifted[:, 0] += 8.0
    assert float((stats.score(shifted) > stats.threshold).float().mean()) > 0.99


def test_fit_needs_enough_images() -> None:
    with pytest.raises(Exception, match="at least 20"):
        fit_from_features(torch.randn(10, 4))


def _header(photometric: str, rows: int, columns: int) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation, ds.Rows, ds.Columns = photometric, rows, columns
    return ds


def test_cheap_checks() -> None:
    assert header_reason(_header("MONOCHROME2", 1024, 900), 256) is None
    assert "PALETTE COLOR" in (header_reason(_header("PALETTE COLOR", 1024, 1024), 256) or "")
    assert "smaller" in (header_reason(_header("MONOCHROME1", 100, 1024), 256) or "")
    flat = np.full((64, 64), 0.5, np.float32)
    flat[0, 0] = 0.51
    sample = ImageSample(flat, BoxMapping(64, 64), "1.2.3")
    assert "nearly constant" in (pixel_reason(sample) or "")
    noisy = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    assert pixel_reason(ImageSample(noisy, BoxMapping(64, 64), "1.2.3")) is None


def test_statistics_of_another_feature_size_are_refused(tmp_path: Path) -> None:
    fit_from_features(torch.randn(30, 6)).save(tmp_path)
    assert load_gate(tmp_path, 6) is not None
    with pytest.raises(CheckpointError, match=GATE_FILE):
        load_gate(tmp_path, 8)
    assert load_gate(tmp_path / "absent", 6) is None


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 phantom studies (DICOM 1024, as the demo model's held-out set is rendered)."""
    out = tmp_path_factory.mktemp("phantom-gate")
    res = run_d2r(
        "synth", "--out", str(out), "--studies", "24", "--seed", "31", "--size", "64",
        "--dicom-size", "1024", env=base_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return out


def _first_images(folder: Path) -> list[Path]:
    rows = [json.loads(x) for x in (folder / "studies.jsonl").read_text().splitlines()]
    return [folder / r["dicom"][0] for r in rows]


def test_demo_model_declines_real_radiographs_and_accepts_phantoms(phantom_dir: Path) -> None:
    predictor = Predictor.from_checkpoint(DEMO)
    lesion_threshold, gate, report, checkpoint, backend = predictor.parameters  # every SR group
    assert backend == "backend: torch on cpu (set explicitly)"
    assert report == "report: the most probable of a beam of 3"
    assert lesion_threshold == f"lesion score threshold: {predictor.lesion_score_threshold:g}"
    assert gate.startswith("input gate: on, threshold 19.3")
    assert checkpoint == f"checkpoint sha256: {predictor.checkpoint_sha256[:16]}"
    for name in REAL:
        ds = pydicom.dcmread(str(get_testdata_file(f"{name}.dcm")))
        pred = predictor.predict([ds])
        assert pred.abstained, name
        assert pred.ood_score is not None and pred.ood_threshold is not None
        assert pred.ood_score > pred.ood_threshold, name
        assert not pred.lesions and not pred.findings and not pred.impression
    accepted = [
        not predictor.predict([pydicom.dcmread(p)]).abstained
        for p in _first_images(phantom_dir)[:8]
    ]
    assert sum(accepted) >= len(accepted) - 1  # >= 98 % on 200 studies is measured in docs


def test_predict_json_of_an_abstention(rg1_path: Path) -> None:
    res = run_d2r(
        "predict", "--json", "--model", str(DEMO), str(rg1_path), env=base_env(D2R_INPUT_GATE="on")
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["abstained"] is True and data["input_gate"] == "on"
    assert "outside the inputs" in data["abstain_reason"]
    assert data["ood_score"] > data["ood_threshold"] > 0
    assert not {"findings", "impression", "lesions", "sentences"} & set(data)


def test_calibrate_gate_then_predict_uses_the_new_statistics(
    phantom_dir: Path, model_dir: Path, tmp_path: Path, rg1_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(model_dir, ckpt)
    env = base_env(D2R_INPUT_GATE="on")
    refused = run_d2r("predict", "--json", "--model", str(ckpt), str(rg1_path), env=env)
    assert refused.returncode == 1
    (line,) = refused.stderr.strip().splitlines()
    assert "D2R_INPUT_GATE" in line and "d2r calibrate-gate" in line
    res = run_d2r("calibrate-gate", "--model", str(ckpt), "--data", str(phantom_dir), env=env)
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    assert stats["calibration_images"] == 24 and (ckpt / GATE_FILE).is_file()
    phantom = _first_images(phantom_dir)[0]
    res = run_d2r("predict", "--json", "--model", str(ckpt), str(phantom), env=env)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["ood_threshold"] == pytest.approx(stats["threshold"], abs=1e-3)
    assert data["input_gate"] == "on" and data["ood_score"] is not None


def test_worker_refuses_a_checkpoint_without_statistics(model_dir: Path) -> None:
    from d2r_core.errors import ConfigError
    from worker.settings import WorkerSettings

    settings = WorkerSettings.from_env({"D2R_MODEL": str(model_dir)})
    with pytest.raises(ConfigError) as err:
        settings.require_model()
    assert str(err.value).startswith("D2R_INPUT_GATE:") and "d2r calibrate-gate" in str(err.value)
    assert "\n" not in str(err.value)
    off = WorkerSettings.from_env({"D2R_MODEL": str(model_dir), "D2R_INPUT_GATE": "off"})
    assert off.require_model() == model_dir
    with pytest.raises(GateMissingError):
        Predictor.from_checkpoint(model_dir)
