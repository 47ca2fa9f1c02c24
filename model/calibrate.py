"""Fit the input gate's statistics for a checkpoint from in-distribution images.

Cross-fitting: the images are split into ``folds`` folds (every ``folds``-th image in the given
order); each image is scored by statistics fitted on the other folds, so every image gives an
out-of-sample score, and the threshold is the chosen percentile of those scores. The threshold
thus measures how far *unseen* in-distribution images fall, not how well a fit remembers its
own images; the stored mean and covariance are then fitted on all images (slightly tighter
around new in-distribution images than each fold's fit, so the threshold errs towards
accepting them). The quantiles of the same out-of-fold scores are kept as the reference
distribution that the node's score drift is measured against (``model.gate``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.errors import InvalidDicomError
from torch import Tensor

from model.checkpoint import load_checkpoint
from model.errors import PreprocessError
from model.gate import (
    DEFAULT_PERCENTILE,
    GateStatistics,
    fit_gate,
    gate_features,
    header_reason,
    pixel_reason,
    reference_quantiles,
)
from model.modeling import D2RNet
from model.preprocess import Letterbox, Preprocessor

logger = logging.getLogger(__name__)

#: fewer images than this cannot give a meaningful covariance and percentile
MIN_IMAGES = 20


def pooled_features(
    model: D2RNet, images: Iterable[Tensor], *, device: str = "cpu", batch: int = 16
) -> Tensor:
    """Pooled gate features ``(N,D)`` of letterboxed images ``(1,S,S)`` in [0, 1]."""
    out: list[Tensor] = []
    pending: list[Tensor] = []

    def flush() -> None:
        if pending:
            out.append(gate_features(model, torch.stack(pending).to(device)).cpu())
            pending.clear()

    for image in images:
        pending.append(image)
        if len(pending) == batch:
            flush()
    flush()
    return torch.cat(out) if out else torch.zeros(0, 0)


def fit_from_features(
    features: Tensor, *, folds: int = 5, percentile: float = DEFAULT_PERCENTILE
) -> GateStatistics:
    """Fit the gate on ``features`` ``(N,D)``; the threshold and the reference distribution
    from out-of-fold scores."""
    n = features.shape[0]
    if n < MIN_IMAGES:
        raise PreprocessError(f"the input gate needs at least {MIN_IMAGES} usable images, got {n}")
    fold = torch.arange(n) % folds
    scores = torch.cat(
        [
            fit_gate(features[fold != k], features[fold == k]).score(features[fold == k])
            for k in range(folds)
        ]
    )
    full = fit_gate(features, features[:1], percentile=percentile)
    held_out = scores.numpy()
    threshold = float(np.percentile(held_out, percentile))
    return replace(
        full,
        threshold=threshold,
        calibration_images=n,
        reference=reference_quantiles(held_out),
    )


def dicom_image(path: Path, preprocess: Preprocessor) -> Tensor | str:
    """The letterboxed image of one DICOM file, or why the gate's cheap checks refuse it."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError) as e:
        return f"not readable: {type(e).__name__}"
    if reason := header_reason(ds, preprocess.size):
        return reason
    try:
        scaled = preprocess.intensity(preprocess.decode(ds))
    except PreprocessError as e:
        return str(e)
    if reason := pixel_reason(scaled):
        return reason
    return torch.from_numpy(Letterbox(preprocess.size)(scaled).pixels)[None]


def calibrate_checkpoint(
    model_dir: Path,
    files: Sequence[Path],
    *,
    percentile: float = DEFAULT_PERCENTILE,
    device: str = "cpu",
) -> tuple[GateStatistics, int]:
    """Fit and write ``gate.safetensors`` into ``model_dir``; returns it and the files skipped."""
    ckpt = load_checkpoint(model_dir, device=device)
    preprocess = Preprocessor(ckpt.config.image_size)
    images: list[Tensor] = []
    skipped = 0
    for path in files:
        got = dicom_image(path, preprocess)
        if isinstance(got, str):
            skipped += 1
            logger.warning("calibrate-gate: skipped %s: %s", path.name, got)
        else:
            images.append(got)
    features = pooled_features(ckpt.model, images, device=device)
    stats = fit_from_features(features, percentile=percentile)
    stats.save(model_dir)
    return stats, skipped


__all__ = [
    "MIN_IMAGES",
    "calibrate_checkpoint",
    "dicom_image",
    "fit_from_features",
    "pooled_features",
]
