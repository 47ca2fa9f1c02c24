"""Torch datasets over :class:`~training.datasets.StudyRecord` lists, through ``model.preprocess``.

Images (DICOM, PNG or JPG) go through the one preprocessing path of serving
(:class:`model.preprocess.Preprocessor` for DICOM; the same ``ScaleToUnit`` and ``Letterbox``
steps for PNG/JPG) and boxes move into the model frame with the same
:class:`~model.preprocess.BoxMapping`. No horizontal flip anywhere: the reports name the
patient's left and right.

::

    records --prepare_samples--> [Sample] (cached letterboxed images, frame boxes, token ids)
            --ReportDataset / DetectionDataset--> collate_reports / collate_detection -> batch dict

Augmentations (:func:`photometric`, :func:`random_affine`) are pure functions of a
``torch.Generator``; the affine moves the boxes with the image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from d2r_core.classes import VINDR_CLASSES
from model.detector import Detections, select_boxes
from model.preprocess import BoxMapping, ImageSample, Letterbox, Preprocessor, ScaleToUnit
from model.tokenizer import EOS_ID, PAD_ID, Tokenizer
from training.datasets import StudyRecord
from training.errors import DatasetError

logger = logging.getLogger(__name__)

#: boxes narrower than this (model-frame pixels) after a transform are dropped
MIN_BOX_SIDE = 2.0


def load_image(path: Path, size: int) -> tuple[Tensor, BoxMapping]:
    """Read a DICOM, PNG or JPG file -> ``(1, size, size)`` tensor in [0, 1] and its mapping.

    DICOM goes through :class:`~model.preprocess.Preprocessor` (decoding, modality/VOI LUT,
    MONOCHROME1 inversion); 8/16-bit grayscale images skip the decoding step only.
    """
    if path.suffix.lower() in (".dcm", ".dicom"):
        import pydicom

        return Preprocessor(size)(pydicom.dcmread(path))
    from PIL import Image

    with Image.open(path) as im:
        gray = im if im.mode in ("L", "I", "I;16", "F") else im.convert("L")
        pixels = np.asarray(gray, dtype=np.float32)
    if pixels.ndim != 2:
        raise ValueError(f"{path}: expected a grayscale image, got shape {pixels.shape}")
    rows, columns = pixels.shape
    sample = ImageSample(pixels, BoxMapping(int(rows), int(columns)))
    sample = Letterbox(size)(ScaleToUnit()(sample))
    return torch.from_numpy(sample.pixels)[None], sample.mapping


@dataclass(frozen=True)
class Sample:
    """One prepared image: model input, frame boxes, class ids and report token ids."""

    id: str
    image: Tensor  # (1,S,S) float32 in [0, 1]
    boxes: Tensor  # (n,4) xyxy model-frame pixels
    labels: Tensor  # (n,) int64 index into VINDR_CLASSES
    scores: Tensor  # (n,) box scores (1 for annotated boxes)
    tokens: tuple[int, ...] = ()
    findings: str = ""
    impression: str = ""
    mapping: BoxMapping | None = None


def build_tokenizer(records: Sequence[StudyRecord], *, min_frequency: int) -> Tokenizer:
    """Vocabulary from the ``train`` split's findings and impressions only."""
    train = [(r.findings, r.impression) for r in records if r.split == "train"]
    if not train:
        raise DatasetError("vocabulary", ["no training-split reports to build a vocabulary from"])
    return Tokenizer.build(train, min_frequency=min_frequency)


def prepare_sample(
    record: StudyRecord,
    size: int,
    tokenizer: Tokenizer | None = None,
    *,
    max_tokens: int | None = None,
) -> Sample:
    """Load and preprocess one record (boxes mapped with the image's ``BoxMapping``)."""
    image, mapping = load_image(record.image_path, size)
    scores_extra = record.extra.get("scores") if isinstance(record.extra, dict) else None
    if record.boxes:
        boxes = torch.tensor(
            mapping.to_frame([b.box for b in record.boxes]), dtype=torch.float32
        ).reshape(-1, 4)
        labels = torch.tensor([VINDR_CLASSES.index(b.class_name) for b in record.boxes])
    else:
        boxes, labels = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    if isinstance(scores_extra, list) and len(scores_extra) == len(record.boxes):
        scores = torch.tensor([float(s) for s in scores_extra], dtype=torch.float32)
    else:
        scores = torch.ones(len(record.boxes))
    tokens: tuple[int, ...] = ()
    if tokenizer is not None:
        tokens = tuple(tokenizer.encode(record.findings, record.impression, max_tokens=max_tokens))
    return Sample(
        record.id,
        image,
        boxes,
        labels,
        scores,
        tokens,
        record.findings,
        record.impression,
        mapping,
    )


def prepare_samples(
    records: Sequence[StudyRecord],
    size: int,
    tokenizer: Tokenizer | None = None,
    *,
    max_tokens: int | None = None,
) -> list[Sample]:
    """Prepare every record; one :class:`DatasetError` lists all unreadable images."""
    out: list[Sample] = []
    problems: list[str] = []
    for rec in records:
        try:
            out.append(prepare_sample(rec, size, tokenizer, max_tokens=max_tokens))
        except (OSError, ValueError) as exc:
            problems.append(f"{rec.image_path}: {exc}")
    if problems:
        raise DatasetError("images", problems)
    logger.info("prepared %d images at %d px", len(out), size)
    return out


# --------------------------------------------------------------------------- augmentation


def photometric(image: Tensor, gen: torch.Generator, strength: float = 1.0) -> Tensor:
    """Random contrast, brightness, gamma, blur and noise on a ``(1,S,S)`` image (boxes fixed).

    ``strength`` 0 is the identity; 1 is the strong augmentation of the student.
    """
    if strength <= 0:
        return image

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    s = strength
    x = image
    gamma = math.exp(u(-0.35, 0.35) * s)
    x = x.clamp(min=0.0) ** gamma
    x = (x - 0.5) * (1.0 + u(-0.25, 0.25) * s) + 0.5 + u(-0.1, 0.1) * s
    if u(0.0, 1.0) < 0.5 * s:
        k = torch.tensor([1.0, 2.0, 1.0])
        k2 = (k[:, None] * k[None, :] / 16.0).view(1, 1, 3, 3)
        x = F.conv2d(x[None], k2, padding=1)[0]
    noise = torch.randn(x.shape, generator=gen) * (0.03 * s * u(0.0, 1.0))
    return (x + noise).clamp(0.0, 1.0)


def random_affine(
    image: Tensor,
    boxes: Tensor,
    gen: torch.Generator,
    *,
    max_scale: float = 0.08,
    max_shift: float = 0.05,
) -> tuple[Tensor, Tensor, Tensor]:
    """Small random zoom and shift of a ``(1,S,S)`` image with its ``(n,4)`` boxes.

    Axis-aligned (no rotation, no flip), so boxes map exactly. Returns the image, the boxes
    clipped to the frame and a ``(n,)`` mask of boxes kept (at least ``MIN_BOX_SIDE`` wide).
    """
    size = image.shape[-1]
    scale = 1.0 + (float(torch.rand((), generator=gen)) * 2 - 1) * max_scale
    shift = (torch.rand(2, generator=gen) * 2 - 1) * max_shift * size  # frame pixels
    # frame point p maps to scale * (p - c) + c + shift, c the centre
    c = size / 2.0
    theta = torch.tensor(
        [
            [1.0 / scale, 0.0, -float(shift[0]) / scale * 2.0 / size],
            [0.0, 1.0 / scale, -float(shift[1]) / scale * 2.0 / size],
        ]
    )[None]
    grid = F.affine_grid(theta, [1, 1, size, size], align_corners=False)
    out = F.grid_sample(
        image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )[0]
    moved = (boxes - c) * scale + c + shift.repeat(2)
    moved[:, 0::2] = moved[:, 0::2].clamp(0.0, float(size))
    moved[:, 1::2] = moved[:, 1::2].clamp(0.0, float(size))
    keep = ((moved[:, 2] - moved[:, 0]) >= MIN_BOX_SIDE) & (
        (moved[:, 3] - moved[:, 1]) >= MIN_BOX_SIDE
    )
    return out, moved, keep


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The per-sample augmentation stream: the same for a given (seed, epoch, index)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + index)


# --------------------------------------------------------------------------- datasets


Augment = Callable[[Sample, torch.Generator], Sample]


def strong_augment(sample: Sample, gen: torch.Generator) -> Sample:
    """Photometric + small affine, boxes moved consistently (the student's view)."""
    image, boxes, keep = random_affine(sample.image, sample.boxes, gen)
    image = photometric(image, gen, 1.0)
    return replace(
        sample,
        image=image,
        boxes=boxes[keep],
        labels=sample.labels[keep],
        scores=sample.scores[keep],
    )


def weak_augment(sample: Sample, gen: torch.Generator) -> Sample:
    """Mild photometric jitter only (the teacher's view; geometry unchanged)."""
    return replace(sample, image=photometric(sample.image, gen, 0.3))


class SampleDataset(torch.utils.data.Dataset[tuple[int, Sample]]):
    """Prepared samples, optionally augmented with a per-(seed, epoch, index) generator."""

    def __init__(self, samples: Sequence[Sample], augment: Augment | None = None, seed: int = 0):
        self.samples = list(samples)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, Sample]:
        s = self.samples[index]
        if self.augment is not None:
            s = self.augment(s, sample_generator(self.seed, self.epoch, index))
        return index, s


def generator_boxes(sample: Sample, num_boxes: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``num_boxes`` boxes by score -> ``(K,4)`` boxes, ``(K,)`` mask and ``(K,C)``
    class scores (the box's score at its class: 1 for an annotated box, the pseudo-label
    score for a pseudo-box), built by :func:`model.detector.select_boxes` as at inference."""
    found = Detections(sample.boxes, sample.scores, sample.labels)
    boxes, mask, scores = select_boxes([found], num_boxes, len(VINDR_CLASSES))
    return boxes[0], mask[0], scores[0]


def collate_reports(batch: Sequence[tuple[int, Sample]], num_boxes: int) -> dict[str, Any]:
    """Stack images, pad token ids with PAD, pad generator boxes to ``num_boxes``."""
    samples = [s for _, s in batch]
    length = max(len(s.tokens) for s in samples)
    tokens = torch.full((len(samples), length), PAD_ID, dtype=torch.long)
    for i, s in enumerate(samples):
        if not s.tokens or s.tokens[-1] != EOS_ID:
            raise ValueError(f"{s.id}: token ids must end with EOS")
        tokens[i, : len(s.tokens)] = torch.tensor(s.tokens)
    gb = [generator_boxes(s, num_boxes) for s in samples]
    return {
        "index": torch.tensor([i for i, _ in batch]),
        "ids": [s.id for s in samples],
        "images": torch.stack([s.image for s in samples]),
        "tokens": tokens,
        "boxes": torch.stack([g[0] for g in gb]),
        "box_mask": torch.stack([g[1] for g in gb]),
        "box_scores": torch.stack([g[2] for g in gb]),
        "targets": [{"boxes": s.boxes, "labels": s.labels} for s in samples],
        "findings": [s.findings for s in samples],
        "impressions": [s.impression for s in samples],
    }


def collate_detection(batch: Sequence[tuple[int, Sample]]) -> dict[str, Any]:
    """Stack images; FCOS targets (model-frame ``boxes``, ``labels``) per image."""
    samples = [s for _, s in batch]
    return {
        "index": torch.tensor([i for i, _ in batch]),
        "ids": [s.id for s in samples],
        "images": torch.stack([s.image for s in samples]),
        "targets": [{"boxes": s.boxes, "labels": s.labels} for s in samples],
    }


__all__ = [
    "MIN_BOX_SIDE",
    "Sample",
    "SampleDataset",
    "build_tokenizer",
    "collate_detection",
    "collate_reports",
    "generator_boxes",
    "load_image",
    "photometric",
    "prepare_sample",
    "prepare_samples",
    "random_affine",
    "sample_generator",
    "strong_augment",
    "weak_augment",
]
