"""Input gate: decline images outside the inputs a checkpoint was validated on.

Two layers, cheapest first:

1. Checks that need no model: the header's photometric interpretation must be one the
   preprocessor reads, the image must not be smaller than the model can resolve
   (``min(Rows, Columns) < image_size / 2``), and its pixels must not be nearly constant.
2. An out-of-distribution score in the model's own feature space: the Mahalanobis distance
   (Lee et al., NeurIPS 2018, "A simple unified framework for detecting out-of-distribution
   samples") of the global branch's average-pooled ResNet trunk features from the mean of the
   training images' features, with a shrunk covariance (the feature dimension is close to the
   number of fitting images; shrinkage towards a scaled identity, Ledoit & Wolf 2004, keeps the
   inverse stable). The threshold is a high percentile (default 99.5th) of the distances of
   held-out in-distribution images that were not used to fit the mean and covariance.

The statistics live beside the weights in ``gate.safetensors`` (mean, precision matrix, and
the threshold and provenance in its metadata). They are not part of the checkpoint hash: they
change no graph, and re-calibrating must not invalidate exported engines.

The metadata also keeps the reference distribution of the score: the quantiles of the held-out
in-distribution scores the threshold was taken from (:data:`REFERENCE_BINS` equal-probability
bins). The node compares the scores of the studies it serves with it (score drift,
``feedback.drift``); gate files written before it have none, and their score drift is not
measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import pydicom
import torch
from torch import Tensor

from model.errors import CheckpointError
from model.files import GATE_FILE
from model.modeling import D2RNet
from model.preprocess import COLOUR_PHOTOMETRICS, ImageSample

#: identifies the feature the statistics were computed on
FEATURE: Final = "global-trunk-avgpool"
DEFAULT_PERCENTILE: Final = 99.5
DEFAULT_SHRINKAGE: Final = 0.1
#: equal-probability bins of the reference distribution: its quantiles at 0, 1/20, ..., 1
REFERENCE_BINS: Final = 20
#: scaled pixels whose standard deviation is below this are "nearly constant"
MIN_PIXEL_STD: Final = 0.02
_PHOTOMETRICS: Final = ("MONOCHROME1", "MONOCHROME2", *COLOUR_PHOTOMETRICS)


@dataclass(frozen=True)
class GateCalibration:
    """What the calibration of a gate says about its scores, without the statistics themselves:
    the threshold, the percentile it is, how many held-out images it was taken from, and their
    scores' quantiles at probabilities ``0, 1/k, ..., 1`` (``reference``, k =
    :data:`REFERENCE_BINS`; empty in gate files written before it was kept)."""

    threshold: float
    percentile: float
    calibration_images: int
    reference: tuple[float, ...] = ()


@dataclass(frozen=True)
class GateStatistics:
    """Reference statistics of a checkpoint's training images and the calibrated threshold."""

    mean: Tensor  # (D,)
    precision: Tensor  # (D,D) inverse of the shrunk covariance
    threshold: float
    percentile: float
    fit_images: int
    calibration_images: int
    feature: str = FEATURE
    #: quantiles of the held-out scores (:attr:`GateCalibration.reference`)
    reference: tuple[float, ...] = ()

    @property
    def calibration(self) -> GateCalibration:
        return GateCalibration(
            self.threshold, self.percentile, self.calibration_images, self.reference
        )

    def score(self, features: Tensor) -> Tensor:
        """Mahalanobis distance ``(B,)`` of pooled features ``(B,D)`` from the mean."""
        d = features.double() - self.mean.double()
        return torch.sqrt(torch.clamp(((d @ self.precision.double()) * d).sum(-1), min=0.0))

    def save(self, directory: Path) -> Path:
        from safetensors.torch import save_file

        meta = {
            "threshold": repr(self.threshold),
            "percentile": repr(self.percentile),
            "fit_images": str(self.fit_images),
            "calibration_images": str(self.calibration_images),
            "feature": self.feature,
        }
        if self.reference:
            meta["reference_quantiles"] = json.dumps([float(q) for q in self.reference])
        path = Path(directory) / GATE_FILE
        tensors = {"mean": self.mean.float().contiguous(), "precision": self.precision.float()}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
        return path


def load_gate(directory: Path, feature_dim: int) -> GateStatistics | None:
    """The statistics stored in a checkpoint directory, or ``None`` when it has none."""
    from safetensors import SafetensorError, safe_open

    path = Path(directory) / GATE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            mean, precision = f.get_tensor("mean"), f.get_tensor("precision")
        stats = GateStatistics(
            mean=mean.float(),
            precision=precision.float(),
            threshold=float(meta["threshold"]),
            percentile=float(meta["percentile"]),
            fit_images=int(meta["fit_images"]),
            calibration_images=int(meta["calibration_images"]),
            feature=meta["feature"],
            reference=_reference(meta),
        )
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{GATE_FILE}: cannot read the input-gate statistics: {e}") from e
    if stats.feature != FEATURE:
        raise CheckpointError(f"{GATE_FILE}: feature {stats.feature!r}, expected {FEATURE!r}")
    if tuple(stats.mean.shape) != (feature_dim,) or tuple(stats.precision.shape) != (
        feature_dim,
        feature_dim,
    ):
        raise CheckpointError(
            f"{GATE_FILE}: statistics of {tuple(stats.mean.shape)} features, "
            f"the model has {feature_dim}"
        )
    return stats


def load_calibration(directory: Path) -> GateCalibration | None:
    """The calibration of the gate stored in a checkpoint directory (its metadata alone, no
    statistics read), or ``None`` when it has none.

    Raises
    ------
    CheckpointError
        The file or its metadata cannot be read.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(directory) / GATE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return GateCalibration(
            threshold=float(meta["threshold"]),
            percentile=float(meta["percentile"]),
            calibration_images=int(meta["calibration_images"]),
            reference=_reference(meta),
        )
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{GATE_FILE}: cannot read the input-gate statistics: {e}") from e


def _reference(meta: dict[str, str]) -> tuple[float, ...]:
    """The reference quantiles of the metadata (``()`` when it has none).

    Raises
    ------
    ValueError
        Not a list of at least two finite, non-decreasing numbers.
    """
    text = meta.get("reference_quantiles")
    if text is None:
        return ()
    values = json.loads(text)
    if not isinstance(values, list) or len(values) < 2:
        raise ValueError("reference_quantiles: must list at least two quantiles")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ValueError("reference_quantiles: must be numbers")
    quantiles = tuple(float(v) for v in values)
    if not all(np.isfinite(quantiles)) or any(
        b < a for a, b in zip(quantiles, quantiles[1:], strict=False)
    ):
        raise ValueError("reference_quantiles: must be finite and non-decreasing")
    return quantiles


def reference_quantiles(scores: npt.ArrayLike, bins: int = REFERENCE_BINS) -> tuple[float, ...]:
    """The quantiles of ``scores`` at probabilities ``0, 1/bins, ..., 1`` (linear
    interpolation), the reference distribution of the score.

    >>> reference_quantiles([1.0, 2.0, 3.0, 5.0], bins=2)
    (1.0, 2.5, 5.0)
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("scores: at least one score is needed")
    return tuple(float(q) for q in np.quantile(values, np.linspace(0.0, 1.0, bins + 1)))


def feature_dim(model: D2RNet) -> int:
    """Width of the pooled global-branch trunk output."""
    conv = model.visual.global_branch.proj
    return int(conv.in_channels)


@torch.inference_mode()
def gate_features(model: D2RNet, images: Tensor) -> Tensor:
    """Letterboxed images ``(B,1,S,S)`` in [0, 1] -> pooled trunk features ``(B,D)``."""
    trunk = model.visual.global_branch.trunk
    features: Tensor = trunk(model.stem(images)).mean(dim=(2, 3))
    return features


def fit_gate(
    fit: Tensor,
    calibration: Tensor,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    shrinkage: float = DEFAULT_SHRINKAGE,
) -> GateStatistics:
    """Mean and shrunk covariance from ``fit`` ``(N,D)``; the threshold from ``calibration``."""
    if fit.shape[0] < 2 or calibration.shape[0] < 1:
        raise ValueError("the input gate needs at least 2 fitting and 1 calibration image")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile: must be in (0, 100], got {percentile}")
    x = fit.double()
    mean = x.mean(0)
    cov = torch.cov(x.T).reshape(x.shape[1], x.shape[1])
    scale = float(torch.trace(cov)) / cov.shape[0] or 1.0
    shrunk = (1.0 - shrinkage) * cov + shrinkage * scale * torch.eye(cov.shape[0], dtype=x.dtype)
    precision = torch.linalg.inv(shrunk)
    stats = GateStatistics(mean.float(), precision.float(), 0.0, percentile, x.shape[0], 0)
    scores = stats.score(calibration).numpy()
    threshold = float(np.percentile(scores, percentile))
    return GateStatistics(
        mean.float(),
        precision.float(),
        threshold,
        percentile,
        x.shape[0],
        calibration.shape[0],
        reference=reference_quantiles(scores),
    )


def header_reason(ds: pydicom.Dataset, image_size: int) -> str | None:
    """Why the header alone rules the image out, or ``None``."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _PHOTOMETRICS:
        return f"photometric interpretation {photometric or '(missing)'!r} cannot be read"
    try:
        rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    except (TypeError, ValueError):
        return "unreadable image size"
    if min(rows, columns) < image_size // 2:
        return f"image of {rows}x{columns} is smaller than the model reads ({image_size // 2} px)"
    return None


def pixel_reason(sample: ImageSample) -> str | None:
    """Why the intensity-scaled pixels rule the image out (nearly constant), or ``None``."""
    std = float(np.std(sample.pixels))
    if not np.isfinite(std) or std < MIN_PIXEL_STD:
        return f"pixels are nearly constant (standard deviation {std:.4f} of the range)"
    return None


@dataclass(frozen=True)
class GateResult:
    """What the gate decided for one image."""

    accepted: bool
    reason: str = ""
    score: float | None = None
    threshold: float | None = None


def score_reason(score: float, stats: GateStatistics) -> str | None:
    if score <= stats.threshold and np.isfinite(score):
        return None
    return (
        f"image outside the inputs the model was validated on (out-of-distribution score "
        f"{score:.1f} above the threshold {stats.threshold:.1f}, the {stats.percentile:g}th "
        f"percentile of held-out training-distribution images)"
    )


def describe(stats: GateStatistics) -> str:
    """One JSON line for logs and ``d2r calibrate-gate``."""
    return json.dumps(
        {
            "feature": stats.feature,
            "threshold": round(stats.threshold, 3),
            "percentile": stats.percentile,
            "fit_images": stats.fit_images,
            "calibration_images": stats.calibration_images,
            "reference_quantiles": len(stats.reference),
        }
    )


__all__ = [
    "DEFAULT_PERCENTILE",
    "FEATURE",
    "GATE_FILE",
    "REFERENCE_BINS",
    "GateCalibration",
    "GateResult",
    "GateStatistics",
    "describe",
    "feature_dim",
    "fit_gate",
    "gate_features",
    "header_reason",
    "load_calibration",
    "load_gate",
    "pixel_reason",
    "reference_quantiles",
    "score_reason",
]
