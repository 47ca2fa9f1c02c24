"""Write a trained checkpoint's input-gate statistics from its training images."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from model.calibrate import MIN_IMAGES, fit_from_features, pooled_features
from model.gate import GateStatistics, describe
from model.modeling import D2RNet
from training.data import Sample

logger = logging.getLogger(__name__)


def write_gate(
    model: D2RNet, samples: Sequence[Sample], out: Path, *, device: str | torch.device = "cpu"
) -> GateStatistics | None:
    """Fit the gate on ``samples``' images (model input, before augmentation) into ``out``.

    With fewer than :data:`model.calibrate.MIN_IMAGES` images nothing is written (a warning
    says so); the checkpoint then needs ``d2r calibrate-gate`` before it serves with the gate on.
    """
    if len(samples) < MIN_IMAGES:
        logger.warning(
            "input gate not fitted: %d training images, at least %d needed; "
            "run d2r calibrate-gate --model %s --data DIR",
            len(samples),
            MIN_IMAGES,
            out,
        )
        return None
    was_training = model.training
    model.eval()
    try:
        features = pooled_features(model, (s.image for s in samples), device=str(device))
    finally:
        model.train(was_training)
    stats = fit_from_features(features)
    stats.save(out)
    logger.info("input gate of %s: %s", out, describe(stats))
    return stats


__all__ = ["write_gate"]
