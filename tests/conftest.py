"""Shared fixtures: real peers (Orthanc, Redis), a randomly initialised D2R-Net checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fixtures import orthanc, orthanc_factory  # noqa: F401
from tests.support.processes import base_env, run_d2r


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small randomly initialised D2R-Net checkpoint written by ``d2r init-model``."""
    out = tmp_path_factory.mktemp("model") / "d2r-small-random"
    res = run_d2r(
        "init-model", "--out", str(out), "--preset", "small", "--seed", "0", env=base_env()
    )
    assert res.returncode == 0, res.stderr
    return out
