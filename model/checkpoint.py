"""Checkpoint directories: save, validate and load; random initialisation.

A checkpoint is one directory, never a pickle::

    weights.safetensors   every parameter and persistent buffer of D2RNet
    config.json           ModelConfig.to_dict()
    vocab.json            Tokenizer.to_dict()
    classes.json          the detector class names, in index order
    model.json            name, version, training data, created, format version
    gate.safetensors      optional: the input gate's statistics (see model.gate); not hashed
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from d2r_core.classes import VINDR_CLASSES
from model.config import ModelConfig, get_preset
from model.errors import CheckpointError, ModelConfigError, TokenizerError
from model.files import (
    CHECKPOINT_FILES,
    CLASSES,
    CONFIG,
    INFO,
    VOCAB,
    WEIGHTS,
    checkpoint_sha256,
)
from model.gate import GateStatistics, feature_dim, load_gate
from model.modeling import D2RNet
from model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1

#: sentences used by ``init_checkpoint`` callers that have no training reports
BUILTIN_REPORTS: tuple[tuple[str, str], ...] = (
    (
        "The heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
        "No acute cardiopulmonary abnormality.",
    ),
    (
        "The heart is mildly enlarged. There is a small left pleural effusion.",
        "Mild cardiomegaly and small left pleural effusion.",
    ),
    ("There is a right lower lobe consolidation. No pneumothorax.", "Right lower lobe pneumonia."),
    (
        "Bilateral interstitial opacities are seen. The cardiac silhouette is enlarged.",
        "Findings consistent with pulmonary edema.",
    ),
    (
        "A nodule is seen in the left upper lobe. The mediastinum is normal.",
        "Left upper lobe nodule. Recommend CT for further evaluation.",
    ),
    ("There is a right pneumothorax. No rib fracture is seen.", "Right pneumothorax."),
)


@dataclass(frozen=True)
class ModelInfo:
    """Contents of ``model.json``."""

    name: str
    version: str
    training_data: str
    created: str
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ModelInfo:
        if not isinstance(data, dict):
            raise CheckpointError(f"{INFO}: expected a JSON object")
        for key in ("name", "version", "training_data", "created"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise CheckpointError(f"{INFO}: field {key!r} must be a non-empty string")
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{INFO}: field 'format_version' must be {FORMAT_VERSION}, "
                f"got {data.get('format_version')!r}"
            )
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise CheckpointError(f"{INFO}: unknown field {unknown[0]!r}")
        return cls(**data)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A validated checkpoint: the model in eval mode and its metadata."""

    model: D2RNet
    config: ModelConfig
    tokenizer: Tokenizer
    info: ModelInfo
    sha256: str
    #: the input gate's reference statistics (``gate.safetensors``), None when absent
    gate: GateStatistics | None = None


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def save_checkpoint(
    model: D2RNet,
    tokenizer: Tokenizer,
    out_dir: Path,
    *,
    name: str,
    version: str,
    training_data: str,
    created: str | None = None,
    half: bool = False,
) -> Path:
    """Write ``model`` and its metadata as a checkpoint directory (created if needed).

    ``half`` stores floating-point tensors as fp16 (half the size); :func:`load_checkpoint`
    upcasts them to the model's fp32.
    """
    from safetensors.torch import save_file

    if model.config.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(
            f"{VOCAB}: {tokenizer.vocab_size} tokens but the model's "
            f"vocab_size is {model.config.vocab_size}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.dtype == torch.float32 else v for k, v in state.items()}
    save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    _write_json(out_dir / CONFIG, model.config.to_dict())
    tokenizer.save(out_dir / VOCAB)
    _write_json(out_dir / CLASSES, list(VINDR_CLASSES))
    created = created or dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    _write_json(out_dir / INFO, ModelInfo(name, version, training_data, created).to_dict())
    logger.info("wrote checkpoint %s (%s %s)", out_dir, name, version)
    return out_dir


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path.name}: missing from checkpoint {path.parent}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path.name}: not valid JSON: {e}") from e


# Longer than a screen: one check per file of the checkpoint, each naming the file it refuses
def load_checkpoint(path: Path, *, device: str = "cpu") -> LoadedCheckpoint:
    """Validate every file of a checkpoint directory and build the model (eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    info = ModelInfo.from_dict(_read_json(path / INFO))
    try:
        config = ModelConfig.from_dict(_read_json(path / CONFIG))
    except ModelConfigError as e:
        raise CheckpointError(f"{CONFIG}: {e}") from e
    try:
        tokenizer = Tokenizer.from_dict(_read_json(path / VOCAB))
    except TokenizerError as e:
        raise CheckpointError(f"{VOCAB}: {e}") from e
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(
            f"{VOCAB}: {tokenizer.vocab_size} tokens, but {CONFIG} field "
            f"'vocab_size' is {config.vocab_size}"
        )
    classes = _read_json(path / CLASSES)
    if classes != list(VINDR_CLASSES):
        raise CheckpointError(
            f"{CLASSES}: class list differs from the 22 VinDr-CXR labels "
            f"(expected {list(VINDR_CLASSES)[:2]}...)"
        )
    if config.num_classes != len(VINDR_CLASSES):
        raise CheckpointError(f"{CONFIG}: field 'num_classes' must be {len(VINDR_CLASSES)}")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{WEIGHTS}: missing from checkpoint {path}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{WEIGHTS}: cannot read tensors: {e}") from e
    model = D2RNet(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{WEIGHTS}: {len(missing)} tensors missing, e.g. {missing[0]!r}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{WEIGHTS}: unexpected tensor {unexpected[0]!r}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{WEIGHTS}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
        if state[key].dtype == torch.float16 and tensor.dtype == torch.float32:
            state[key] = state[key].float()  # fp16 storage (save_checkpoint(half=True))
        if state[key].dtype != tensor.dtype:
            raise CheckpointError(
                f"{WEIGHTS}: tensor {key!r} has dtype {state[key].dtype}, expected {tensor.dtype}"
            )
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    gate = load_gate(path, feature_dim(model))
    return LoadedCheckpoint(model, config, tokenizer, info, checkpoint_sha256(path), gate)


def load_detector_state(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and the detector's tensors (``detector.`` prefix removed, fp32) of a
    checkpoint directory.

    Only the detector is read, so a checkpoint whose other parts come from an earlier version
    of the architecture can still start a new model's detector (``d2r train --init-detector``).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    try:
        config = ModelConfig.from_dict(_read_json(path / CONFIG))
    except ModelConfigError as e:
        raise CheckpointError(f"{CONFIG}: {e}") from e
    try:
        state = load_file(str(path / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{WEIGHTS}: cannot read tensors: {e}") from e
    prefix = "detector."
    detector = {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}
    if not detector:
        raise CheckpointError(f"{WEIGHTS}: no detector tensors in {path}")
    return config, detector


def init_checkpoint(
    out_dir: Path,
    preset: str | ModelConfig = "small",
    *,
    seed: int = 0,
    name: str = "d2r-net-random",
    version: str = "0.0.0",
    reports: Iterable[tuple[str, str]] = BUILTIN_REPORTS,
    created: str | None = None,
) -> Path:
    """Write a randomly initialised checkpoint whose vocabulary comes from ``reports``.

    Deterministic for a given ``seed`` (and ``created``).
    """
    base = preset if isinstance(preset, ModelConfig) else get_preset(preset)
    tokenizer = Tokenizer.build(reports, min_frequency=1)
    config = base.replace(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = D2RNet(config).eval()
    return save_checkpoint(
        model,
        tokenizer,
        Path(out_dir),
        name=name,
        version=version,
        training_data="none: randomly initialised, not trained",
        created=created,
    )


__all__ = [
    "BUILTIN_REPORTS",
    "CHECKPOINT_FILES",
    "FORMAT_VERSION",
    "LoadedCheckpoint",
    "ModelInfo",
    "checkpoint_sha256",
    "init_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]
