from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
import torch

from model.checkpoint import (
    checkpoint_sha256,
    init_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from model.errors import CheckpointError
from model.predict import Predictor


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_init_checkpoint_files_and_metadata(small_checkpoint: Path) -> None:
    names = sorted(p.name for p in small_checkpoint.iterdir())
    assert names == [
        "classes.json",
        "config.json",
        "model.json",
        "vocab.json",
        "weights.safetensors",
    ]
    info = json.loads((small_checkpoint / "model.json").read_text())
    assert "randomly initialised, not trained" in info["training_data"]
    assert info["format_version"] == 1


def test_init_is_deterministic_and_hash_stable(small_checkpoint: Path, tmp_path: Path) -> None:
    again = init_checkpoint(
        tmp_path / "again", "small", seed=0, created="2026-01-01T00:00:00+00:00"
    )
    assert checkpoint_sha256(again) == checkpoint_sha256(small_checkpoint)
    other = init_checkpoint(
        tmp_path / "other", "small", seed=1, created="2026-01-01T00:00:00+00:00"
    )
    assert checkpoint_sha256(other) != checkpoint_sha256(small_checkpoint)


def test_save_load_gives_identical_outputs(small_checkpoint: Path, tmp_path: Path) -> None:
    first = load_checkpoint(small_checkpoint)
    resaved = save_checkpoint(
        first.model, first.tokenizer, tmp_path / "re", name="x", version="1", training_data="test"
    )
    second = load_checkpoint(resaved)
    image = torch.rand(2, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        b1, m1, s1 = first.model.generator_boxes(image)
        b2, m2, s2 = second.model.generator_boxes(image)
        assert torch.equal(b1, b2) and torch.equal(m1, m2) and torch.equal(s1, s2)
        e1, _ = first.model.encode(image, b1, m1, s1)
        e2, _ = second.model.encode(image, b2, m2, s2)
        assert torch.equal(e1, e2)
        assert first.model.generate(image, b1, m1, s1, max_tokens=12) == second.model.generate(
            image, b2, m2, s2, max_tokens=12
        )
    assert second.info.name == "x" and second.config == first.config


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "config.json").unlink(), "config.json: missing"),
        (lambda d: (d / "model.json").write_text("{"), "model.json: not valid JSON"),
        (lambda d: (d / "classes.json").write_text(json.dumps(["Cardiomegaly"])), "classes.json"),
        (lambda d: (d / "weights.safetensors").write_bytes(b"garbage"), "weights.safetensors"),
        (lambda d: _edit(d / "config.json", d_model=64), "weights.safetensors: tensor"),
        (lambda d: _edit(d / "config.json", num_heads="8"), "config.json: num_heads"),
        (lambda d: _edit(d / "config.json", vocab_size=99), "vocab_size"),
        (lambda d: _edit(d / "model.json", format_version=9), "format_version"),
        (lambda d: _edit(d / "vocab.json", format="other"), "vocab.json: format"),
    ],
)
def test_invalid_checkpoints_named(
    small_checkpoint: Path, tmp_path: Path, mutate: Callable[[Path], object], message: str
) -> None:
    ckpt = _copy(small_checkpoint, tmp_path)
    mutate(ckpt)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt)


def _edit(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_tensor_named(small_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    ckpt = _copy(small_checkpoint, tmp_path)
    state = load_file(str(ckpt / "weights.safetensors"))
    del state["decoder.out.bias"]
    save_file(state, str(ckpt / "weights.safetensors"))
    with pytest.raises(CheckpointError, match="decoder.out.bias"):
        load_checkpoint(ckpt)


def test_predictor_api(small_checkpoint: Path, rg1: pydicom.Dataset) -> None:
    predictor = Predictor.from_checkpoint(
        small_checkpoint, lesion_score_threshold=0.0, input_gate=False
    )
    assert predictor.checkpoint_sha256 == checkpoint_sha256(small_checkpoint)
    result = predictor.predict([rg1])
    assert result.sop_instance_uid == rg1.SOPInstanceUID
    assert (result.model_name, result.model_version) == (predictor.name, predictor.version)
    assert isinstance(result.findings, str) and isinstance(result.impression, str)
    assert result.lesions, "threshold 0 must return lesions"
    for lesion in result.lesions:
        x0, y0, x1, y1 = lesion.box
        assert 0 <= x0 < x1 <= rg1.Columns and 0 <= y0 < y1 <= rg1.Rows
        assert 0.0 <= lesion.score <= 1.0
    with pytest.raises(Exception, match="no image"):
        predictor.predict([])
