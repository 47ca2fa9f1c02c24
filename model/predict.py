"""Serving API: a checkpoint in, ``StudyPrediction`` (report text + lesions) out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import torch

from model.backends import TORCH, InferenceBackend, create_backend, run_graphs
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
    The dense graphs run on ``backend`` (default: eager PyTorch on ``device``);
    preprocessing, NMS, box mapping and beam search run here, the same for every backend.
    """

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        *,
        device: str = "cpu",
        lesion_score_threshold: float | None = None,
        backend: InferenceBackend | None = None,
        beam_size: int | None = None,
    ) -> None:
        self._ckpt = checkpoint
        self.device = device
        self.backend: InferenceBackend = backend or create_backend(
            TORCH, checkpoint.model, checkpoint_sha256=checkpoint.sha256, device=device
        )
        self.beam_size = beam_size
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
        cls,
        path: Path,
        *,
        device: str = "cpu",
        lesion_score_threshold: float | None = None,
        backend: str = TORCH,
        engine_dir: Path | None = None,
        torch_compile: bool = False,
        beam_size: int | None = None,
        setting: str = "D2R_BACKEND",
        engine_setting: str = "D2R_ENGINE_DIR",
    ) -> Predictor:
        """Load and validate a checkpoint directory and start the named backend.

        Raises ``CheckpointError`` for a bad checkpoint and
        :class:`model.backends.BackendError` (naming ``setting``) for a backend that
        cannot start; there is no fallback to another backend.
        """
        ckpt = load_checkpoint(Path(path), device=device)
        graphs = create_backend(
            backend,
            ckpt.model,
            checkpoint_sha256=ckpt.sha256,
            device=device,
            engine_dir=engine_dir,
            torch_compile=torch_compile,
            setting=setting,
            engine_setting=engine_setting,
        )
        return cls(
            ckpt,
            device=device,
            lesion_score_threshold=lesion_score_threshold,
            backend=graphs,
            beam_size=beam_size,
        )

    def predict(
        self,
        datasets: Sequence[pydicom.Dataset],
        *,
        on_stage: Callable[[str], None] | None = None,
    ) -> StudyPrediction:
        """Report and lesions; boxes refer to the first dataset (the chosen frontal image).

        ``on_stage`` is told ``"decode"``, ``"preprocess"`` and ``"predict"`` as each begins.
        """
        if not datasets:
            raise PreprocessError("no image given: predict needs at least one frontal image")
        stage = on_stage or (lambda _name: None)
        ds = datasets[0]
        stage("decode")
        decoded = self._preprocess.decode(ds)
        stage("preprocess")
        sample = self._preprocess.finish(decoded)
        pixels, mapping = torch.from_numpy(sample.pixels)[None], sample.mapping
        stage("predict")
        image = pixels[None].to(self.device)  # (1,1,S,S)
        with torch.inference_mode():
            dets, all_ids = run_graphs(
                self.backend,
                self._ckpt.model,
                image,
                lesion_score_threshold=self.lesion_score_threshold,
                beam_size=self.beam_size,
            )
        lesion_dets, ids = dets[0], all_ids[0]
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
