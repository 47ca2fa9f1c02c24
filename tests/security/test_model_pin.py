"""``D2R_MODEL_SHA256`` pins the checkpoint the worker may load."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2r_core.errors import ConfigError
from model.checkpoint import checkpoint_sha256
from worker.settings import WorkerSettings


def test_pinned_hash_accepts_the_checkpoint_and_refuses_another(model_dir: Path) -> None:
    actual = checkpoint_sha256(model_dir)
    pinned = WorkerSettings.from_env(
        {"D2R_MODEL": str(model_dir), "D2R_MODEL_SHA256": actual.upper()}
    )
    assert pinned.model_sha256 == actual
    pinned.verify_model_sha256(actual)  # the same checkpoint: accepted

    other = "0" * 64
    strict = WorkerSettings.from_env({"D2R_MODEL": str(model_dir), "D2R_MODEL_SHA256": other})
    with pytest.raises(ConfigError) as info:
        strict.verify_model_sha256(actual)
    assert info.value.setting == "D2R_MODEL_SHA256"
    assert actual[:12] in str(info.value) and "\n" not in str(info.value)

    WorkerSettings.from_env({"D2R_MODEL": str(model_dir)}).verify_model_sha256(actual)  # unpinned


@pytest.mark.parametrize("value", ["abc", "g" * 64, "0" * 63])
def test_malformed_hash_names_the_setting(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        WorkerSettings.from_env({"D2R_MODEL_SHA256": value})
    assert info.value.setting == "D2R_MODEL_SHA256"


def test_worker_refuses_to_start_on_another_checkpoint(model_dir: Path, tmp_path: Path) -> None:
    from tests.support.processes import base_env, run_d2r

    env = base_env(
        D2R_MODEL=str(model_dir),
        D2R_MODEL_SHA256="0" * 64,
        D2R_SPOOL_DIR=str(tmp_path / "spool"),
        D2R_BROKER_URL="redis://127.0.0.1:1/0",  # never reached: the check comes first
        D2R_HTTP_PORT="0",
    )
    res = run_d2r("worker", env=env, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "D2R_MODEL_SHA256" in lines[0]
