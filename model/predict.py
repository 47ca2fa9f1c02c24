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
from model.errors import GateMissingError, ModelError, PreprocessError
from model.gate import GATE_FILE, gate_features, header_reason, pixel_reason, score_reason
from model.preprocess import Letterbox, Preprocessor

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
    #: the input gate declined the image: no lesions and no text, ``abstain_reason`` says why
    abstained: bool = False
    abstain_reason: str = ""
    #: the gate's out-of-distribution score and threshold (None: not scored)
    ood_score: float | None = None
    ood_threshold: float | None = None
    #: whether the input gate ran (``D2R_INPUT_GATE``)
    input_gate: bool = True


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
        input_gate: bool = True,
        gate_setting: str = "D2R_INPUT_GATE",
    ) -> None:
        if input_gate and checkpoint.gate is None:
            raise GateMissingError(
                f"checkpoint {checkpoint.info.name} {checkpoint.info.version} has no input-gate "
                f"statistics ({GATE_FILE}): run d2r calibrate-gate --model DIR --data DIR, "
                f"or set {gate_setting}=off"
            )
        self.input_gate = input_gate
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
        input_gate: bool = True,
        gate_setting: str = "D2R_INPUT_GATE",
    ) -> Predictor:
        """Load and validate a checkpoint directory and start the named backend.

        Raises ``CheckpointError`` for a bad checkpoint (:class:`GateMissingError`, naming
        ``gate_setting``, for one without input-gate statistics while the gate is on) and
        :class:`model.backends.BackendError` (naming ``setting``) for a backend that
        cannot start; there is no fallback to another backend.
        """
        ckpt = load_checkpoint(Path(path), device=device)
        if input_gate and ckpt.gate is None:  # refuse before starting a backend
            cls._refuse(ckpt, path, gate_setting)
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
            input_gate=input_gate,
            gate_setting=gate_setting,
        )

    @property
    def parameters(self) -> tuple[str, ...]:
        """The settings that shape every result, as TID 4019 Algorithm Parameters text."""
        gate = self._ckpt.gate
        if not self.input_gate:
            gate_text = "input gate: off"
        else:
            threshold = "" if gate is None else f", threshold {gate.threshold:.3f}"
            gate_text = f"input gate: on{threshold}"
        return (
            f"lesion score threshold: {self.lesion_score_threshold:g}",
            gate_text,
            f"checkpoint sha256: {self.checkpoint_sha256[:16]}",
        )

    @staticmethod
    def _refuse(ckpt: LoadedCheckpoint, path: Path, gate_setting: str) -> None:
        raise GateMissingError(
            f"checkpoint {path} has no input-gate statistics ({GATE_FILE}): run "
            f"d2r calibrate-gate --model {path} --data DIR, or set {gate_setting}=off"
        )

    def _abstain(self, uid: str, reason: str, score: float | None = None) -> StudyPrediction:
        gate = self._ckpt.gate
        logger.info("image %s: declined by the input gate: %s", uid, reason)
        return StudyPrediction(
            "",
            "",
            (),
            uid,
            self.name,
            self.version,
            abstained=True,
            abstain_reason=reason,
            ood_score=score,
            ood_threshold=None if gate is None else gate.threshold,
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
        uid = str(ds.get("SOPInstanceUID", ""))
        gate = self._ckpt.gate if self.input_gate else None
        if gate is not None and (reason := header_reason(ds, self.config.image_size)):
            return self._abstain(uid, reason)
        stage("decode")
        decoded = self._preprocess.decode(ds)
        stage("preprocess")
        scaled = self._preprocess.intensity(decoded)
        if gate is not None and (reason := pixel_reason(scaled)):
            return self._abstain(uid, reason)
        sample = Letterbox(self.config.image_size)(scaled)
        pixels, mapping = torch.from_numpy(sample.pixels)[None], sample.mapping
        stage("predict")
        image = pixels[None].to(self.device)  # (1,1,S,S)
        score: float | None = None
        if gate is not None:
            score = float(gate.score(gate_features(self._ckpt.model, image).cpu())[0])
            if reason := score_reason(score, gate):
                return self._abstain(uid, reason, score)
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
        logger.info("predicted study image %s: %d lesions, %d tokens", uid, len(lesions), len(ids))
        return StudyPrediction(
            findings,
            impression,
            tuple(lesions),
            uid,
            self.name,
            self.version,
            ood_score=score,
            ood_threshold=None if gate is None else gate.threshold,
            input_gate=self.input_gate,
        )


__all__ = ["Lesion", "Predictor", "StudyPrediction"]
