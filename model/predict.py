"""Serving API: a checkpoint in, ``StudyPrediction`` (report text + lesions) out."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import torch

from d2r_core.classes import VINDR_CLASSES
from d2r_core.geometry import Box
from model.backend_choice import BackendChoice
from model.backends import TORCH, InferenceBackend, create_backend, run_graphs
from model.checkpoint import LoadedCheckpoint, load_checkpoint
from model.decoding import Hypothesis
from model.detector import Detections
from model.errors import GateMissingError, ModelError, PreprocessError
from model.gate import GATE_FILE, gate_features, header_reason, pixel_reason, score_reason
from model.preprocess import BoxMapping, Letterbox, Preprocessor

logger = logging.getLogger(__name__)

#: Chooses one of the beam's reports: ``(candidates, boxes, columns, rows) -> index``, with the
#: candidates as ``(findings, impression)`` texts, most probable first, and the study's lesions
#: as ``(class name, box)`` in source-image pixels of an image ``columns`` x ``rows``.
#: ``report.grounding.most_consistent`` picks the one that agrees best with the boxes.
ReportChooser = Callable[[Sequence[tuple[str, str]], Sequence[tuple[str, Box]], int, int], int]
#: beam width when a :data:`ReportChooser` is given and no beam size is (unless the
#: checkpoint's own is wider): the chooser compares this many hypotheses. Chosen on phantom
#: validation data (``d2r synth --seed 31337``), never on the held-out seed; see docs/model.md.
CHOICE_BEAM_SIZE = 5


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

    Build with :meth:`from_checkpoint`; :meth:`predict` is safe to call repeatedly and
    :meth:`predict_batch` runs several studies' dense graphs as one batch.
    The dense graphs run on ``backend`` (default: eager PyTorch on ``device``);
    preprocessing, NMS, box mapping and beam search run here, the same for every backend.

    The report is one of the beam's ``beam_size`` hypotheses: the most probable, or the one
    ``choose_report`` picks given the study's lesions (:data:`ReportChooser`); the text is
    always one the generator produced. ``beam_size`` defaults to the checkpoint's, and to at
    least :data:`CHOICE_BEAM_SIZE` with a chooser.
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
        choose_report: ReportChooser | None = None,
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
        if beam_size is None and choose_report is not None:
            beam_size = max(checkpoint.config.beam_size, CHOICE_BEAM_SIZE)
        #: beam width (None: the checkpoint's ``beam_size``)
        self.beam_size = beam_size
        self.choose_report = choose_report
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
        #: the most studies one call of the backend takes (None: no limit of its own)
        self.max_batch: int | None = getattr(self.backend, "max_batch", None)
        #: which backend runs and why (``worker.predictor.open_predictor`` sets ``auto``'s)
        self.backend_choice = BackendChoice(self.backend.name, device=device)

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
        choose_report: ReportChooser | None = None,
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
            choose_report=choose_report,
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
        beam = self.beam_size or self.config.beam_size
        if self.choose_report is None:
            report_text = f"report: the most probable of a beam of {beam}"
        else:
            chooser = self.choose_report
            name = getattr(chooser, "__qualname__", type(chooser).__name__)
            report_text = f"report: chosen among a beam of {beam} by {chooser.__module__}.{name}"
        return (
            f"lesion score threshold: {self.lesion_score_threshold:g}",
            gate_text,
            report_text,
            f"checkpoint sha256: {self.checkpoint_sha256[:16]}",
            f"backend: {self.backend_choice.describe()}",
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
        stage = on_stage or (lambda _name: None)
        prepared = self._prepare(datasets, stage)
        if isinstance(prepared, StudyPrediction):
            return prepared
        stage("predict")
        return self._infer([prepared])[0]

    def predict_batch(
        self,
        studies: Sequence[Sequence[pydicom.Dataset]],
        *,
        on_stage: Callable[[int, str], None] | None = None,
    ) -> list[StudyPrediction | Exception]:
        """:meth:`predict` for several studies, their dense graphs run as one batch.

        Returns one entry per study, in order: its prediction, the same as :meth:`predict`
        gives for it alone (up to floating-point rounding), or the exception that ended it
        (a :class:`PreprocessError` for an image that cannot be decoded). One study's failure
        never ends another: when the batched model call itself fails, each study of the batch
        runs alone. ``on_stage(index, stage)`` follows each study as :meth:`predict`'s does.
        Batches larger than the backend's largest (:attr:`max_batch`) run in parts.
        """
        stage = on_stage or (lambda _index, _name: None)
        results: list[StudyPrediction | Exception | None] = [None] * len(studies)
        ready: list[tuple[int, _Ready]] = []
        for index, datasets in enumerate(studies):
            try:
                prepared = self._prepare(datasets, functools.partial(stage, index))
            except Exception as exc:  # this study's input: the others go on
                results[index] = exc
                continue
            if isinstance(prepared, StudyPrediction):
                results[index] = prepared
            else:
                ready.append((index, prepared))
        started = []
        for index, prepared in ready:
            try:
                stage(index, "predict")
            except Exception as exc:
                results[index] = exc
            else:
                started.append((index, prepared))
        size = self.max_batch or len(started) or 1
        for start in range(0, len(started), size):
            part = started[start : start + size]
            for (index, _), outcome in zip(part, self._infer_isolated(part), strict=True):
                results[index] = outcome
        return [r if r is not None else ModelError("no result") for r in results]

    def _infer_isolated(
        self, part: Sequence[tuple[int, _Ready]]
    ) -> list[StudyPrediction | Exception]:
        """Run ``part`` as one batch; if that fails, each study alone, so only a poisoned
        one fails."""
        try:
            return list(self._infer([r for _, r in part]))
        except Exception as exc:
            if len(part) == 1:
                return [exc]
            logger.warning(
                "batched inference of %d studies failed (%s); running them one by one",
                len(part),
                type(exc).__name__,
            )
        outcomes: list[StudyPrediction | Exception] = []
        for _, ready in part:
            try:
                outcomes.append(self._infer([ready])[0])
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def _prepare(
        self, datasets: Sequence[pydicom.Dataset], stage: Callable[[str], None]
    ) -> StudyPrediction | _Ready:
        """Decode and letterbox the chosen image, or the abstention the gate's header and
        pixel checks decide."""
        if not datasets:
            raise PreprocessError("no image given: predict needs at least one frontal image")
        ds = datasets[0]
        uid = str(ds.get("SOPInstanceUID", ""))
        gate = self._ckpt.gate if self.input_gate else None
        if gate is not None and (reason := header_reason(ds, self.config.image_size)):
            return self._abstain(uid, reason)
        stage("decode")
        decoded = self._preprocess.decode(ds)
        stage("preprocess")
        scaled = self._preprocess.intensity(decoded, in_place=True)  # decoded is ours alone
        if gate is not None and (reason := pixel_reason(scaled)):
            return self._abstain(uid, reason)
        sample = Letterbox(self.config.image_size)(scaled)
        return _Ready(uid, torch.from_numpy(sample.pixels)[None], sample.mapping)

    def _infer(self, ready: Sequence[_Ready]) -> list[StudyPrediction]:
        """The gate's score, the detector, the visual graph and the decoder for a batch."""
        image = torch.stack([r.pixels for r in ready]).to(self.device)  # (B,1,S,S)
        gate = self._ckpt.gate if self.input_gate else None
        scores: list[float | None] = [None] * len(ready)
        if gate is not None:
            scores = [float(v) for v in gate.score(gate_features(self._ckpt.model, image).cpu())]
        out: list[StudyPrediction | None] = [None] * len(ready)
        keep = []
        for i, (r, score) in enumerate(zip(ready, scores, strict=True)):
            if gate is not None and score is not None and (reason := score_reason(score, gate)):
                out[i] = self._abstain(r.uid, reason, score)
            else:
                keep.append(i)
        if keep:
            with torch.inference_mode():
                dets, all_beams = run_graphs(
                    self.backend,
                    self._ckpt.model,
                    image if len(keep) == len(ready) else image[keep],
                    lesion_score_threshold=self.lesion_score_threshold,
                    beam_size=self.beam_size,
                )
            for i, lesion_dets, beams in zip(keep, dets, all_beams, strict=True):
                out[i] = self._prediction(ready[i], lesion_dets, beams, scores[i])
        return [p for p in out if p is not None]

    def _prediction(
        self,
        ready: _Ready,
        lesion_dets: Detections,
        beams: Sequence[Hypothesis],
        score: float | None,
    ) -> StudyPrediction:
        """One study's report text (the chosen hypothesis) and lesions in source-image
        pixels."""
        gate = self._ckpt.gate if self.input_gate else None
        lesions = []
        source = ready.mapping.to_source(lesion_dets.boxes.cpu().numpy(), clip=True)
        for box, lesion_score, label in zip(
            source, lesion_dets.scores.tolist(), lesion_dets.labels.tolist(), strict=True
        ):
            if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
                continue  # entirely on the letterbox padding
            if not 0 <= label < len(VINDR_CLASSES):
                raise ModelError(f"detector returned class index {label}")
            x0, y0, x1, y1 = (float(v) for v in box)
            lesions.append(Lesion(VINDR_CLASSES[label], float(lesion_score), (x0, y0, x1, y1)))
        ids, findings, impression = self._choose(beams, lesions, ready.mapping)
        logger.info(
            "predicted study image %s: %d lesions, %d tokens", ready.uid, len(lesions), len(ids)
        )
        return StudyPrediction(
            findings,
            impression,
            tuple(lesions),
            ready.uid,
            self.name,
            self.version,
            ood_score=score,
            ood_threshold=None if gate is None else gate.threshold,
            input_gate=self.input_gate,
        )

    def _choose(
        self, beams: Sequence[Hypothesis], lesions: Sequence[Lesion], mapping: BoxMapping
    ) -> tuple[tuple[int, ...], str, str]:
        """The ids, findings and impression of the hypothesis :attr:`choose_report` picks
        (the most probable without one)."""
        if not beams:
            raise ModelError("beam search returned no hypothesis")
        texts = [self._ckpt.tokenizer.decode(list(h.ids)) for h in beams]
        index = 0
        if self.choose_report is not None and len(beams) > 1:
            index = self.choose_report(
                texts,
                [(le.class_name, le.box) for le in lesions],
                mapping.source_columns,
                mapping.source_rows,
            )
            if not 0 <= index < len(beams):
                raise ModelError(f"report chooser returned {index} of {len(beams)} hypotheses")
        return beams[index].ids, *texts[index]


@dataclass(frozen=True)
class _Ready:
    """One study's chosen image, letterboxed for the model: ``pixels`` ``(1,S,S)``."""

    uid: str
    pixels: torch.Tensor
    mapping: BoxMapping


__all__ = ["CHOICE_BEAM_SIZE", "Lesion", "Predictor", "ReportChooser", "StudyPrediction"]
