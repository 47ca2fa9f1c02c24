"""Shared fixtures: real peers (Orthanc, Redis), a randomly initialised D2R-Net checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support.fixtures import orthanc, orthanc_factory  # noqa: F401
from tests.support.processes import base_env, run_d2r, use_backend_cache

#: folders whose every test runs the product end to end
E2E_FOLDERS = ("e2e", "reliability")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``e2e`` every test that talks to real peers or runs the product's processes, so
    ``pytest -m "not e2e"`` is the quick suite of units."""
    root = Path(__file__).parent
    for item in items:
        folder = item.path.relative_to(root).parts[0] if item.path.is_relative_to(root) else ""
        if (
            folder in E2E_FOLDERS
            or item.get_closest_marker("integration") is not None
            or item.get_closest_marker("viewer") is not None
        ):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True, scope="session")
def _shared_backend_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One export cache of ``D2R_BACKEND=auto`` for every ``d2r`` process of the session: each
    checkpoint is exported and checked once, as on a host whose workers share the default."""
    use_backend_cache(tmp_path_factory.mktemp("backend-cache"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small randomly initialised D2R-Net checkpoint written by ``d2r init-model``."""
    out = tmp_path_factory.mktemp("model") / "d2r-small-random"
    res = run_d2r(
        "init-model", "--out", str(out), "--preset", "small", "--seed", "0", env=base_env()
    )
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="session")
def eager_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random checkpoint with its lesion score thresholds at 0, so that it reports boxes.

    A randomly initialised detector scores about 0.07, below any useful threshold; this copy
    reports its three best boxes, so tests can follow boxes from the model to the viewer.
    """
    out = tmp_path_factory.mktemp("model") / "d2r-small-random-eager"
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.update(lesion_score_threshold=0.0, box_score_threshold=0.0, max_lesions=3)
    (out / "config.json").write_text(json.dumps(config))
    return out
