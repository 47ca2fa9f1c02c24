"""Semi-supervised lesion detector training (Unbiased-Teacher style) and pseudo-labelling.

Two stages on :class:`model.detector.LesionDetector` (FCOS), as in D2R-Net's detector stage:

1. **Burn-in**: supervised FCOS loss on box-labelled images.
2. **Teacher-student**: the teacher starts as a copy of the burnt-in student and follows it as
   an exponential moving average (``keep_rate`` 0.9996, every step, buffers included). For each
   unlabelled image the teacher sees a weakly augmented view (mild photometric jitter); its
   detections with score >= ``threshold`` (0.89) become pseudo-boxes. The student sees a
   strongly augmented view (photometric + small zoom/shift, pseudo-boxes moved with it) and
   learns from them with weight ``unsup_weight`` (1.0, classification and regression alike),
   plus the supervised loss on a labelled batch. Unlabelled images without any pseudo-box are
   left out of that step's unsupervised loss (FCOS normalises by the foreground count).

The teacher is the detector that is kept. :func:`pseudo_label` runs it over report-dataset
images and returns boxes in source pixels (COCO results and R2Gen ``annotation.json`` fields).

Design choices: FCOS (the model's detector) instead of Faster R-CNN; AdamW (lr 1e-3) instead
of SGD 0.01, because the detector trains from scratch on a small data set; the supervised
loss keeps running during the teacher-student stage.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d2r_core.classes import VINDR_CLASSES
from model.modeling import D2RNet
from training.data import (
    Sample,
    SampleDataset,
    collate_detection,
    sample_generator,
    strong_augment,
    weak_augment,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectorTrainConfig:
    """Settings of :func:`train_detector`.

    Parameters
    ----------
    burn_in_steps : int
        Supervised steps before the teacher is created.
    semi_steps : int
        Teacher-student steps (0 skips the stage).
    batch_size, unlabeled_batch_size : int
        Labelled and unlabelled images per step.
    lr, weight_decay : float
        AdamW settings; the learning rate warms up linearly and then follows a cosine.
    warmup_steps : int
        Linear warm-up length.
    grad_clip_norm : float
        Gradient-norm clip (0 disables).
    threshold : float
        Teacher score needed for a pseudo-box (0.89 as in D2R-Net).
    keep_rate : float
        EMA keep rate of the teacher (0.9996).
    unsup_weight : float
        Weight of the unlabelled loss.
    augment_labeled : bool
        Apply the strong augmentation to labelled images as well.
    seed : int
        Seed of the sampling order and augmentations.
    """

    burn_in_steps: int = 2000
    semi_steps: int = 0
    batch_size: int = 8
    unlabeled_batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip_norm: float = 10.0
    threshold: float = 0.89
    keep_rate: float = 0.9996
    unsup_weight: float = 1.0
    augment_labeled: bool = True
    seed: int = 456789

    def __post_init__(self) -> None:
        for name in ("burn_in_steps", "semi_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "unlabeled_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold: must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.keep_rate <= 1.0:
            raise ValueError(f"keep_rate: must be in [0, 1], got {self.keep_rate}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")


class DetectorModel(nn.Module):
    """The input stem and the FCOS detector of a :class:`D2RNet` (shared parameters)."""

    def __init__(self, model: D2RNet) -> None:
        super().__init__()
        self.stem = model.stem
        self.detector = model.detector

    def loss(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """FCOS losses of model-frame ``targets`` on ``(B,1,S,S)`` images."""
        return self.detector.loss(self.stem(images), targets)


def total_loss(parts: dict[str, Tensor]) -> Tensor:
    """Sum of the FCOS loss terms (classification, box regression, centerness)."""
    values = list(parts.values())
    return sum(values[1:], values[0])


def _to(batch: dict[str, Any], device: str | torch.device) -> dict[str, Any]:
    out = dict(batch)
    out["images"] = batch["images"].to(device)
    out["targets"] = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    return out


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, keep_rate: float) -> None:
    """``teacher = keep_rate * teacher + (1 - keep_rate) * student`` (parameters and buffers)."""
    t_state = teacher.state_dict()
    for name, value in student.state_dict().items():
        target = t_state[name]
        if target.dtype.is_floating_point:
            target.mul_(keep_rate).add_(value.detach(), alpha=1.0 - keep_rate)
        else:
            target.copy_(value)


@torch.no_grad()
def pseudo_targets(
    teacher: D2RNet, images: Tensor, threshold: float, *, iou: float = 0.5, max_boxes: int = 20
) -> list[dict[str, Tensor]]:
    """Teacher detections with score >= ``threshold`` as FCOS targets (model frame)."""
    dets = teacher.detect(
        images,
        score_threshold=threshold,
        iou_threshold=iou,
        max_detections=max_boxes,
        class_agnostic=False,
    )
    return [{"boxes": d.boxes, "labels": d.labels, "scores": d.scores} for d in dets]


def _cycle(
    dataset: SampleDataset, batch_size: int, seed: int, collate: Callable[..., dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([dataset[int(i)] for i in order[start : start + batch_size]])
        if len(order) < batch_size:
            yield collate([dataset[int(i)] for i in order])
        epoch += 1


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_detector(
    model: D2RNet,
    labeled: Sequence[Sample],
    unlabeled: Sequence[Sample],
    config: DetectorTrainConfig,
    *,
    metrics_csv: Path | None = None,
    log_every: int = 20,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> D2RNet:
    """Burn-in, then teacher-student training of ``model.detector``.

    Returns the model to keep: the EMA teacher when the teacher-student stage ran, the
    student otherwise. ``model`` is trained in place (it is the student).
    """
    if not labeled:
        raise ValueError("labeled: need at least one box-labelled image")
    torch.manual_seed(config.seed)
    model.to(device)
    student = DetectorModel(model)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = config.burn_in_steps + config.semi_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, total, config.warmup_steps)
    )
    lab_ds = SampleDataset(
        labeled, strong_augment if config.augment_labeled else None, seed=config.seed
    )
    lab_iter = _cycle(lab_ds, min(config.batch_size, len(labeled)), config.seed, collate_detection)
    unl_ds = SampleDataset(unlabeled, None, seed=config.seed + 1)
    unl_iter = (
        _cycle(
            unl_ds,
            min(config.unlabeled_batch_size, len(unlabeled)),
            config.seed + 1,
            collate_detection,
        )
        if unlabeled and config.semi_steps
        else None
    )
    teacher: D2RNet | None = None
    writer = _CsvLog(metrics_csv)
    bar = _progress(total, "detector") if progress else None
    started = time.perf_counter()
    for step in range(total):
        semi = step >= config.burn_in_steps and unl_iter is not None
        if semi and teacher is None:  # before this step's forward touches BatchNorm statistics
            teacher = copy.deepcopy(model).eval()
            teacher.requires_grad_(False)
            logger.info("burn-in done after %d steps; teacher created", step)
        batch = _to(next(lab_iter), device)
        sup = student.loss(batch["images"], batch["targets"])
        loss = total_loss(sup)
        row: dict[str, float] = {"sup_loss": float(loss.detach())}
        if semi and teacher is not None and unl_iter is not None:
            unl = next(unl_iter)
            weak_images, strong_samples = [], []
            for i, index in enumerate(unl["index"].tolist()):
                gen = sample_generator(config.seed + 2, step, i)
                base = unl_ds.samples[index]
                weak_images.append(weak_augment(base, gen).image)
            pseudo = pseudo_targets(teacher, torch.stack(weak_images).to(device), config.threshold)
            for i, index in enumerate(unl["index"].tolist()):
                base = unl_ds.samples[index]
                p = pseudo[i]
                with_boxes = Sample(
                    base.id, base.image, p["boxes"].cpu(), p["labels"].cpu(), p["scores"].cpu()
                )
                strong_samples.append(
                    strong_augment(with_boxes, sample_generator(config.seed + 3, step, i))
                )
            # FCOS normalises its loss by the number of foreground locations: an image without
            # confident pseudo-boxes would weigh its background loss without that normalisation,
            # so only images with at least one pseudo-box enter the unsupervised loss
            kept_samples = [s for s in strong_samples if s.boxes.shape[0] > 0]
            row["pseudo_boxes"] = float(sum(len(p["boxes"]) for p in pseudo)) / len(pseudo)
            if kept_samples:
                images = torch.stack([s.image for s in kept_samples]).to(device)
                targets = [
                    {"boxes": s.boxes.to(device), "labels": s.labels.to(device)}
                    for s in kept_samples
                ]
                unsup = total_loss(student.loss(images, targets))
                loss = loss + config.unsup_weight * unsup
                row["unsup_loss"] = float(unsup.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        if config.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip_norm)
        opt.step()
        sched.step()
        if teacher is not None:
            ema_update(teacher, model, config.keep_rate)
        row.update(step=step + 1, loss=float(loss.detach()), lr=float(sched.get_last_lr()[0]))
        row["elapsed_s"] = time.perf_counter() - started
        writer.write(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if (step + 1) % log_every == 0 or step + 1 == total:
            logger.info(
                "detector step %d/%d loss %.4f (%.0f s)",
                step + 1,
                total,
                float(loss.detach()),
                row["elapsed_s"],
            )
    if bar is not None:
        bar.close()
    writer.close()
    model.eval()
    return teacher if teacher is not None else model


# --------------------------------------------------------------------------- pseudo-labels


@torch.no_grad()
def pseudo_label(
    model: D2RNet, samples: Sequence[Sample], *, threshold: float, batch_size: int = 16
) -> dict[str, list[tuple[str, float, tuple[float, float, float, float]]]]:
    """Detections per sample id in source pixels: ``(class_name, score, xyxy)``.

    Boxes entirely on the letterbox padding are dropped; the rest are clipped to the image.
    """
    model.eval()
    out: dict[str, list[tuple[str, float, tuple[float, float, float, float]]]] = {}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        dets = model.detect(
            torch.stack([s.image for s in chunk]),
            score_threshold=threshold,
            iou_threshold=model.config.lesion_nms_iou,
            max_detections=model.config.max_lesions,
            class_agnostic=False,
        )
        for s, d in zip(chunk, dets, strict=True):
            if s.mapping is None:
                raise ValueError(f"{s.id}: sample has no box mapping")
            source = s.mapping.to_source(d.boxes.numpy(), clip=True)
            found = []
            for box, score, label in zip(source, d.scores.tolist(), d.labels.tolist(), strict=True):
                if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
                    continue
                x0, y0, x1, y1 = (float(v) for v in box)
                found.append((VINDR_CLASSES[label], float(score), (x0, y0, x1, y1)))
            out[s.id] = sorted(found, key=lambda f: -f[1])
    return out


def coco_results(
    detections: dict[str, list[tuple[str, float, tuple[float, float, float, float]]]],
    samples: Sequence[Sample],
) -> dict[str, Any]:
    """A COCO object (images, categories, annotations with ``score``) of the detections."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for n, s in enumerate(samples, start=1):
        m = s.mapping
        images.append(
            {
                "id": n,
                "file_name": s.id,
                "height": m.source_rows if m else 0,
                "width": m.source_columns if m else 0,
            }
        )
        for name, score, (x0, y0, x1, y1) in detections.get(s.id, []):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": n,
                    "category_id": VINDR_CLASSES.index(name) + 1,
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": round((x1 - x0) * (y1 - y0), 2),
                    "score": round(score, 4),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": c} for i, c in enumerate(VINDR_CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def annotate_entries(
    annotation: dict[str, Any],
    detections: dict[str, list[tuple[str, float, tuple[float, float, float, float]]]],
    sizes: dict[str, tuple[int, int]],
) -> dict[str, Any]:
    """Copy of an R2Gen ``annotation.json`` object with the box fields set from detections.

    ``boxes`` are COCO ``[x, y, w, h]`` in source pixels, ``labels`` class names, ``scores``,
    ``height``/``width`` the source size. Entries without detections get empty lists.
    """
    out: dict[str, Any] = {}
    for split, entries in annotation.items():
        if not isinstance(entries, list):
            out[split] = entries
            continue
        new = []
        for entry in entries:
            e = dict(entry)
            dets = detections.get(str(e.get("id")), [])
            e["boxes"] = [
                [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
                for _, _, (x0, y0, x1, y1) in dets
            ]
            e["labels"] = [name for name, _, _ in dets]
            e["scores"] = [round(score, 4) for _, score, _ in dets]
            if str(e.get("id")) in sizes:
                e["height"], e["width"] = sizes[str(e.get("id"))]
            new.append(e)
        out[split] = new
    return out


# --------------------------------------------------------------------------- logging helpers


class _CsvLog:
    """Append rows to a CSV file (header from the first row's keys plus later new keys)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.rows: list[dict[str, float]] = []

    def write(self, row: dict[str, float]) -> None:
        self.rows.append(dict(row))

    def close(self) -> None:
        if self.path is None or not self.rows:
            return
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)


def _progress(total: int, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)


__all__ = [
    "DetectorModel",
    "DetectorTrainConfig",
    "annotate_entries",
    "coco_results",
    "ema_update",
    "pseudo_label",
    "pseudo_targets",
    "total_loss",
    "train_detector",
]
