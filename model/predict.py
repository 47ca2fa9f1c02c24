"""Serving API: a checkpoint in, ``StudyPrediction`` (report text + lesions) out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import torch

from model.checkpoint import LoadedCheckpoint, load_checkpoint
from model.classes import VINDR_CLASSES
from model.errors import ModelError, PreprocessError
from model.preprocess import Preprocessor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lesion:
    """One detected lesion in source-image pixels (continuous, (0,0) = top-left corner)."""

    class_name: str
    score: float
    box: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max


@dataclass(frozen=True)
class StudyPrediction:
    """Generated report and detected lesions for one study."""

    findings: str
    impression: str
    lesions: tuple[Lesion, ...]
    sop_instance_uid: str
    model_name: str
    model_version: str


class Predictor:
    """D2R-Net inference on one study's frontal image(s).

    Build with :meth:`from_checkpoint`; :meth:`predict` is safe to call repeatedly.
    """

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        *,
        device: str = "cpu",
        lesion_score_threshold: float | None = None,
    ) -> None:
        self._ckpt = checkpoint
        self.device = device
        self.name: str = checkpoint.info.name
        self.version: str = checkpoint.info.version
        self.checkpoint_sha256: str = checkpoint.sha256
        self.config = checkpoint.config
        self.lesion_score_threshold = (
            self.config.lesion_score_threshold
            if lesion_score_threshold is None
            else lesion_score_threshold
        )
        self._preprocess = Preprocessor(self.config.image_size)

    @classmethod
    def from_checkpoint(
        cls, path: Path, *, device: str = "cpu", lesion_score_threshold: float | None = None
    ) -> Predictor:
        """Load and validate a checkpoint directory (raises ``CheckpointError``)."""
        return cls(
            load_checkpoint(Path(path), device=device),
            device=device,
            lesion_score_threshold=lesion_score_threshold,
        )

    def predict(self, datasets: Sequence[pydicom.Dataset]) -> StudyPrediction:
        """Report and lesions; boxes refer to the first dataset (the chosen frontal image)."""
        if not datasets:
            raise PreprocessError("no image given: predict needs at least one frontal image")
        ds = datasets[0]
        pixels, mapping = self._preprocess(ds)
        image = pixels[None].to(self.device)  # (1,1,S,S)
        model, cfg = self._ckpt.model, self.config
        with torch.inference_mode():
            dense = model.detector.dense(model.stem(image))
            lesion_dets = model.detector.postprocess(
                *dense,
                score_threshold=self.lesion_score_threshold,
                iou_threshold=cfg.lesion_nms_iou,
                max_detections=cfg.max_lesions,
                class_agnostic=False,
            )[0]
            box_dets = model.detector.postprocess(
                *dense,
                score_threshold=cfg.box_score_threshold,
                iou_threshold=cfg.box_nms_iou,
                max_detections=cfg.num_boxes,
                class_agnostic=True,
            )
            from model.modeling import select_boxes

            boxes, box_mask = select_boxes(box_dets, cfg.num_boxes, image.device)
            ids = model.generate(image, boxes, box_mask)[0]
        findings, impression = self._ckpt.tokenizer.decode(ids)
        lesions = []
        source = mapping.to_source(lesion_dets.boxes.cpu().numpy(), clip=True)
        for box, score, label in zip(
            source, lesion_dets.scores.tolist(), lesion_dets.labels.tolist(), strict=True
        ):
            if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
                continue  # entirely on the letterbox padding
            if not 0 <= label < len(VINDR_CLASSES):
                raise ModelError(f"detector returned class index {label}")
            x0, y0, x1, y1 = (float(v) for v in box)
            lesions.append(Lesion(VINDR_CLASSES[label], float(score), (x0, y0, x1, y1)))
        uid = str(ds.get("SOPInstanceUID", ""))
        logger.info("predicted study image %s: %d lesions, %d tokens", uid, len(lesions), len(ids))
        return StudyPrediction(findings, impression, tuple(lesions), uid, self.name, self.version)


__all__ = ["Lesion", "Predictor", "StudyPrediction"]
