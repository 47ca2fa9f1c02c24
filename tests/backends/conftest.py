"""Fixtures of the backend tests: one ONNX export per session, phantom studies, RG1."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
import torch

from tests.support.dicom_files import rg1_path
from tests.support.processes import base_env, run_d2r


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def onnx_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``d2r export-onnx`` of the session's small random checkpoint (exported once)."""
    out = tmp_path_factory.mktemp("onnx") / "export"
    res = run_d2r("export-onnx", "--model", str(model_dir), "--out", str(out), env=base_env())
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="session")
def phantom_studies(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    """The first DICOM image of each of 3 synthetic phantom studies (``d2r synth``)."""
    out = tmp_path_factory.mktemp("phantoms")
    res = run_d2r(
        "synth", "--out", str(out), "--studies", "3", "--seed", "7", "--size", "128",
        "--dicom-size", "512", env=base_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = (out / "studies.jsonl").read_text().splitlines()
    studies = [s for s in map(json.loads, lines) if "dicom" in s]
    assert len(studies) == 3
    return [pydicom.dcmread(out / s["dicom"][0]) for s in studies]


@pytest.fixture(scope="session")
def rg1() -> pydicom.Dataset:
    return pydicom.dcmread(rg1_path())
