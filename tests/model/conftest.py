"""Fixtures of the D2R-Net tests: CPU thread limits, a real chest CR, a small checkpoint."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from model.checkpoint import init_checkpoint


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def rg1_path() -> Path:
    """The real chest CR of pydicom-data: MONOCHROME1, 1955 rows x 1841 columns."""
    path = get_testdata_file("RG1_UNCR.dcm")
    assert path is not None, "pydicom-data is not installed"
    return Path(path)


@pytest.fixture(scope="session")
def rg1(rg1_path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(rg1_path)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised ``small`` checkpoint (seed 0)."""
    return init_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "small",
        "small",
        seed=0,
        created="2026-01-01T00:00:00+00:00",
    )
