"""Report-generator training (``d2r train``): LM + LAB + GAB on D2R-Net, resumable, DDP-ready.

Defaults follow D2R-Net (shared reference, section 4.6): Adam with amsgrad, lr 1e-4, weight
decay 5e-5, cosine annealing per epoch (``t_max`` = epochs, ``eta_min`` 0), gradient clipping by
value 0.1, loss weights LM:LAB:GAB 1:1:1 (from the model config), model selection and early
stopping on validation BLEU-4, seed 456789. ``select_metric: ce_f1`` selects and stops on the
validation CE F1 (rule-based labeler on the findings) instead; both are logged every epoch.

* **Alignment text encoder**: a ``transformers.BertModel`` read from a local directory
  (``text_encoder``; its own tokenizer encodes the cleaned report) or, when none is given, a
  small randomly initialised BERT (2 layers, ``text_hidden`` wide) over the d2r vocabulary.
  Only training uses it; it is not part of the checkpoint.
* **Detector**: ``init_detector`` copies the detector from a checkpoint (e.g. the output of
  ``d2r train-detector``); it is frozen (eval mode) unless ``train_detector`` adds its FCOS loss.
  ``generator_boxes`` chooses what the local branch reads during training: ``annotations``
  (default: the annotated or pseudo-boxes, top ``num_boxes`` by score, class score 1 or the
  pseudo-label score) or ``detector`` (the frozen detector's boxes and class scores on the
  augmented image, exactly what serving feeds the generator, misses and false positives
  included). Validation uses the detector's boxes when it is trained, as serving does.
* **Frozen global trunk**: ``freeze_global_trunk`` = n (1-4) keeps the stem and the first n
  ResNet stages of the global branch fixed (eval mode; typically started from the detector's
  trunk with ``init_global_from_detector``) and trains the rest. Without augmentation, what is
  frozen (those stages' features and, with ``generator_boxes: detector``, the detector's boxes)
  is computed once per image before the first step instead of at every step.
* **Precision / parallelism**: autocast fp16 + ``GradScaler`` on CUDA (off on CPU);
  ``DistributedDataParallel`` under ``torchrun`` (NCCL on CUDA, gloo on CPU) with a
  ``DistributedSampler``; rank 0 validates, logs and writes checkpoints.
* **Resume**: ``state/last.pt`` (written each epoch and when ``max_steps`` stops the run) holds
  the model, optimizer, scheduler, scaler, RNG states, epoch and step; ``resume`` continues
  exactly where it stopped, mid-epoch included (the epoch's sample order is a function of the
  seed and epoch).
* **Outputs** in ``out``: ``config.resolved.json``, ``vocab.json``, ``metrics.csv``,
  ``learning_curve.png``, TensorBoard events under ``tensorboard/`` (when the ``tensorboard``
  package is importable), ``best/`` and ``model/`` (``model.checkpoint`` directories).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model.checkpoint import load_detector_state, save_checkpoint
from model.config import ModelConfig, get_preset
from model.modeling import D2RNet
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID, Tokenizer, clean_report
from training.data import Sample, SampleDataset, build_tokenizer, collate_reports, prepare_samples
from training.datasets import StudyRecord, load_datasets, read_r2gen
from training.errors import DatasetError, TrainingError
from training.losses import AlignmentLosses, lm_loss

logger = logging.getLogger(__name__)

STATE_FILE = "last.pt"
#: where the local branch's boxes come from during training (see the module docstring)
GENERATOR_BOXES = ("annotations", "detector")
#: validation metrics that can choose the best epoch and stop early (on the findings)
SELECT_METRICS = ("bleu4", "ce_f1")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a report-generator run (written to ``config.resolved.json``).

    Parameters
    ----------
    data : str
        A ``d2r synth`` folder (``annotation.json`` + ``images/``), an R2Gen
        ``annotation.json`` (images beside it under ``images/``) or a datasets config JSON
        (:func:`training.datasets.load_datasets`).
    out : str
        Output folder.
    preset : str
        Model preset; ``model`` overrides single :class:`~model.config.ModelConfig` fields.
    """

    data: str
    out: str
    preset: str = "small"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_detector: str | None = None
    init_global_from_detector: bool = False
    train_detector: bool = False
    generator_boxes: str = "annotations"
    freeze_global_trunk: int = 0
    observation_weight: float = 0.0
    select_metric: str = "bleu4"
    text_encoder: str | None = None
    freeze_text_encoder: bool = False
    text_hidden: int = 64
    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 5e-5
    amsgrad: bool = True
    t_max: int | None = None
    eta_min: float = 0.0
    grad_clip_value: float = 0.1
    seed: int = 456789
    min_frequency: int = 10
    patience: int = 50
    val_beam_size: int | None = None
    max_val: int = 0
    max_steps: int = 0
    augment: bool = False
    amp: bool = True
    device: str = "auto"
    name: str = "d2r-net"
    version: str = "0.1.0"
    half: bool = False
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "min_frequency", "text_hidden", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("patience", "max_val", "max_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.observation_weight < 0:
            raise ValueError(f"observation_weight: must be >= 0, got {self.observation_weight}")
        if self.grad_clip_value < 0:
            raise ValueError(f"grad_clip_value: must be >= 0, got {self.grad_clip_value}")
        if self.text_hidden % 2:
            raise ValueError(f"text_hidden: must be even, got {self.text_hidden}")
        if not 0 <= self.freeze_global_trunk <= 4:
            raise ValueError(
                f"freeze_global_trunk: ResNet stages 0-4, got {self.freeze_global_trunk}"
            )
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(
                f"select_metric: expected one of {', '.join(SELECT_METRICS)}, "
                f"got {self.select_metric!r}"
            )
        if self.generator_boxes not in GENERATOR_BOXES:
            raise ValueError(
                f"generator_boxes: expected one of {', '.join(GENERATOR_BOXES)}, "
                f"got {self.generator_boxes!r}"
            )
        if self.generator_boxes == "detector" and (not self.init_detector or self.train_detector):
            raise ValueError(
                "generator_boxes: 'detector' needs a trained, frozen detector "
                "(init_detector set, train_detector off)"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable mapping of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; an unknown key raises ``ValueError`` naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown training setting")
        return cls(**data)


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a JSON or YAML training config (a mapping of :class:`TrainConfig` fields).

    Relative ``data``, ``out``, ``init_detector`` and ``text_encoder`` paths resolve against the
    current directory (so a repository-relative config works from the repository root).
    """
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of training settings")
    return data


# --------------------------------------------------------------------------- data


def read_records(data: Path) -> list[StudyRecord]:
    """Records of a phantom folder, an R2Gen annotation file or a datasets config."""
    if data.is_dir():
        if not (data / "annotation.json").is_file():
            raise DatasetError(str(data), [f"{data}: no annotation.json"])
        return read_r2gen(data / "annotation.json", data / "images", dataset="phantom")
    if not data.is_file():
        raise DatasetError(str(data), [f"{data}: missing"])
    head = json.loads(data.read_text(encoding="utf-8"))
    if isinstance(head, dict) and "datasets" in head:
        return load_datasets(data)
    return read_r2gen(data, data.parent / "images", dataset=data.parent.name or "r2gen")


def describe_data(data: str, records: Sequence[StudyRecord]) -> str:
    """One line for ``model.json``: datasets, split sizes, box counts, source path."""
    per: dict[str, dict[str, int]] = {}
    boxes = 0
    for r in records:
        per.setdefault(r.dataset, {}).setdefault(r.split, 0)
        per[r.dataset][r.split] += 1
        boxes += len(r.boxes)
    parts = [
        f"{name} ({', '.join(f'{n} {s}' for s, n in sorted(splits.items()))})"
        for name, splits in sorted(per.items())
    ]
    synthetic = " synthetic phantom data, not clinical;" if "phantom" in per else ""
    return f"{'; '.join(parts)};{synthetic} {boxes} boxes; from {data}"


# --------------------------------------------------------------------------- text side


class TextEncoding:
    """Report and sentence ids for the alignment text encoder.

    With ``hf_tokenizer`` (a local BERT's tokenizer) the cleaned report text is encoded;
    otherwise the d2r token ids are used directly (the random BERT's vocabulary).
    """

    def __init__(self, tokenizer: Tokenizer, hf_tokenizer: Any = None, max_len: int = 128):
        self.tokenizer = tokenizer
        self.hf = hf_tokenizer
        self.max_len = max_len
        self.period = tokenizer.token_to_id.get(".", -1)

    def __call__(
        self, tokens: Tensor, findings: Sequence[str], impressions: Sequence[str]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.hf is not None:
            return self._hf(findings, impressions)
        report = tokens.clone()
        mask = (report != PAD_ID).long()
        sentences: list[list[list[int]]] = []
        for row in tokens.tolist():
            current: list[int] = []
            found: list[list[int]] = []
            for t in row:
                if t in (PAD_ID, BOS_ID, EOS_ID, SEP_ID):
                    if t != BOS_ID and current:
                        found.append([BOS_ID, *current])
                        current = []
                    continue
                current.append(t)
                if t == self.period:
                    found.append([BOS_ID, *current])
                    current = []
            sentences.append(found or [[BOS_ID]])
        return (report, mask, *self._pad(sentences))

    def _pad(self, sentences: list[list[list[int]]]) -> tuple[Tensor, Tensor]:
        ns = max(len(s) for s in sentences)
        ls = max(len(x) for s in sentences for x in s)
        ids = torch.zeros(len(sentences), ns, ls, dtype=torch.long)
        for i, s in enumerate(sentences):
            for j, x in enumerate(s):
                ids[i, j, : len(x)] = torch.tensor(x)
        mask = (ids != 0).long()
        if self.hf is None:
            mask = torch.zeros_like(ids)
            for i, s in enumerate(sentences):
                for j, x in enumerate(s):
                    mask[i, j, : len(x)] = 1
        return ids, mask

    def _hf(
        self, findings: Sequence[str], impressions: Sequence[str]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        texts = [
            clean_report(f"{f} {i}".strip() or ".")
            for f, i in zip(findings, impressions, strict=True)
        ]
        enc = self.hf(
            texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt"
        )
        per: list[list[list[int]]] = []
        for t in texts:
            parts = [p.strip() + " ." for p in t.split(" . ") if p.strip(" .")] or ["."]
            per.append([self.hf(p, truncation=True, max_length=64)["input_ids"] for p in parts])
        ids, mask = self._pad(per)
        return enc["input_ids"], enc["attention_mask"], ids, mask


def build_alignment(
    cfg: ModelConfig, tokenizer: Tokenizer, config: TrainConfig
) -> tuple[AlignmentLosses, TextEncoding]:
    """The LAB/GAB module with its text encoder (local BERT or a small random one)."""
    if config.text_encoder:
        from transformers import AutoTokenizer

        align = AlignmentLosses.from_pretrained(
            cfg, Path(config.text_encoder), freeze=config.freeze_text_encoder
        )
        hf = AutoTokenizer.from_pretrained(config.text_encoder, local_files_only=True)
        return align, TextEncoding(tokenizer, hf)
    from transformers import BertConfig, BertModel

    h = config.text_hidden
    bert_cfg = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=h,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * h,
        max_position_embeddings=max(128, cfg.max_tokens + 8),
        pad_token_id=PAD_ID,
    )
    text = BertModel(bert_cfg, add_pooling_layer=False)
    if config.freeze_text_encoder:
        text.requires_grad_(False)
    return AlignmentLosses(cfg, text), TextEncoding(tokenizer)


def observation_labels(findings: Sequence[str]) -> Tensor:
    """``(N, 14)`` float targets of the observation head: 1 where the rule-based labeler of
    ``d2r evaluate`` finds the observation positive in the report's findings."""
    from training.evaluation.ce import binarise
    from training.evaluation.labeler import label_reports

    labels = binarise(label_reports(findings), uncertain_positive=False)
    return torch.from_numpy(labels).float()


class TrainModule(nn.Module):
    """D2R-Net plus the training-only losses; ``forward`` returns the loss terms.

    With ``observation_weight`` > 0 the global branch's observation head (``global_token``)
    learns the 14 CheXpert-style labels of each training report (``batch["observations"]``,
    see :func:`observation_labels`) with binary cross-entropy; the probabilities it reads from
    the image then reach the decoder as the observation token.
    """

    def __init__(
        self,
        model: D2RNet,
        align: AlignmentLosses | None,
        *,
        train_detector: bool,
        observation_weight: float = 0.0,
    ):
        super().__init__()
        if observation_weight and not model.config.global_token:
            raise TrainingError("observation_weight: needs the model's global_token")
        self.model = model
        self.align = align
        self.train_detector = train_detector
        self.observation_weight = observation_weight

    def forward(self, batch: dict[str, Any], text: tuple[Tensor, ...] | None) -> dict[str, Tensor]:
        m, cfg = self.model, self.model.config
        images, tokens = batch["images"], batch["tokens"]
        feats = m.visual_features(
            images,
            batch["boxes"],
            batch["box_mask"],
            batch["box_scores"],
            batch.get("trunk"),
            int(batch.get("trunk_stages", 4)),
        )
        enc = m.decoder.encode(feats.tokens, feats.mask)
        logp = m.decoder(enc, feats.mask, tokens[:, :-1])
        out = {"lm": lm_loss(logp.float(), tokens)}
        total = cfg.lm_weight * out["lm"]
        if self.align is not None and text is not None:
            al = self.align(feats, *text)
            out["lab"], out["gab"] = al["lab"].float(), al["gab"].float()
            total = total + cfg.lab_weight * out["lab"] + cfg.gab_weight * out["gab"]
        if self.observation_weight:
            logits = m.visual.global_branch.observations(feats.patches[:, 0]).float()
            out["obs"] = F.binary_cross_entropy_with_logits(logits, batch["observations"])
            total = total + self.observation_weight * out["obs"]
        if self.train_detector:
            det = m.detector.loss(m.stem(images), batch["targets"])
            out["det"] = sum(det.values(), torch.zeros((), device=images.device)).float()
            total = total + out["det"]
        out["loss"] = total
        return out


@dataclass(frozen=True)
class FrozenInputs:
    """What a frozen part of the model gives each training image, computed once."""

    boxes: tuple[Tensor, Tensor, Tensor] | None = None  # (N,K,4), (N,K), (N,K,C)
    trunk: Tensor | None = None  # (N,C,h,w) global-trunk features


@torch.no_grad()
def precompute_frozen(
    model: D2RNet,
    samples: Sequence[Sample],
    *,
    boxes: bool,
    trunk_stages: int,
    device: torch.device,
    batch_size: int = 32,
) -> FrozenInputs:
    """Detector boxes and/or the features of the first ``trunk_stages`` global-trunk stages
    of every (unaugmented) training image."""
    trunk = trunk_stages > 0
    if not (boxes or trunk):
        return FrozenInputs()
    model.detector.eval()
    branch = model.visual.global_branch.trunk_prefix(trunk_stages)
    was_training = branch.training
    branch.eval()
    parts: list[tuple[Tensor, ...]] = []
    started = time.perf_counter()
    for start in range(0, len(samples), batch_size):
        images = torch.stack([s.image for s in samples[start : start + batch_size]]).to(device)
        row: tuple[Tensor, ...] = ()
        if boxes:
            row += tuple(t.cpu() for t in model.generator_boxes(images))
        if trunk:
            row += (branch(model.stem(images)).cpu(),)
        parts.append(row)
    branch.train(was_training)
    columns = [torch.cat(c) for c in zip(*parts, strict=True)]
    logger.info(
        "precomputed %s for %d images (%.0f s)",
        " and ".join(n for n, on in (("detector boxes", boxes), ("trunk features", trunk)) if on),
        len(samples),
        time.perf_counter() - started,
    )
    return FrozenInputs(
        boxes=(columns[0], columns[1], columns[2]) if boxes else None,
        trunk=columns[-1] if trunk else None,
    )


# --------------------------------------------------------------------------- evaluation


def ce_f1(references: Sequence[str], generated: Sequence[str]) -> float:
    """Headline CE F1 (rule-based CheXpert-style labeler, positive = 1, macro over the 14
    observations, zero_division 0), as ``d2r evaluate`` scores it."""
    from training.evaluation.ce import compute_ce
    from training.evaluation.labeler import label_reports

    if not references:
        return 0.0
    ce = compute_ce(label_reports(references), label_reports(generated))
    return float(ce["pos_only"]["macro"]["f1"])


def bleu4(references: Sequence[str], generated: Sequence[str]) -> float:
    """Corpus BLEU-4 (pycocoevalcap) on R2Gen-normalised text, as ``d2r evaluate`` scores it."""
    from pycocoevalcap.bleu.bleu import Bleu

    from training.evaluation.normalise import r2gen_clean

    if not references:
        return 0.0
    gts = {str(i): [r2gen_clean(r)] for i, r in enumerate(references)}
    res = {str(i): [r2gen_clean(g) or "."] for i, g in enumerate(generated)}
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(scores[3])


@torch.no_grad()
def generate_reports(
    model: D2RNet,
    samples: Sequence[Sample],
    tokenizer: Tokenizer,
    *,
    detector_boxes: bool,
    beam_size: int | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> list[tuple[str, str]]:
    """``(findings, impression)`` per sample; boxes from the detector or the annotations."""
    from training.data import generator_boxes

    was_training = model.training
    model.eval()
    out: list[tuple[str, str]] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = torch.stack([s.image for s in chunk]).to(device)
        if detector_boxes:
            boxes, mask, scores = model.generator_boxes(images)
        else:
            gb = [generator_boxes(s, model.config.num_boxes) for s in chunk]
            boxes = torch.stack([g[0] for g in gb]).to(device)
            mask = torch.stack([g[1] for g in gb]).to(device)
            scores = torch.stack([g[2] for g in gb]).to(device)
        for ids in model.generate(images, boxes, mask, scores, beam_size=beam_size):
            out.append(tokenizer.decode(ids))
    model.train(was_training)
    return out


# --------------------------------------------------------------------------- run helpers


def _dist() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (1 process: 0, 1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(config.device)
    return torch.device(f"cuda:{local_rank}") if dev.type == "cuda" and dev.index is None else dev


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def draw_learning_curve(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """PNG of the mean training loss and validation BLEU-4 per epoch (matplotlib or Pillow)."""
    epochs = [r for r in rows if r.get("val_bleu4") is not None or r.get("train_loss")]
    if not epochs:
        return
    xs = [int(r["epoch"]) for r in epochs]
    loss = [float(r["train_loss"]) for r in epochs]
    bleu = [float(r["val_bleu4"]) if r.get("val_bleu4") is not None else math.nan for r in epochs]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(xs, loss, label="train loss")
        ax.set_xlabel("epoch")
        ax2 = ax.twinx()
        ax2.plot(xs, bleu, color="tab:orange", label="val BLEU-4")
        fig.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return
    except ImportError:
        pass
    from PIL import Image, ImageDraw

    w, h, m = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m // 2, w - m, h - m], outline="black")

    def series(values: list[float], color: str) -> None:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return
        lo, hi = min(finite), max(finite)
        span = hi - lo or 1.0
        x0, x1 = min(xs), max(xs)
        pts = [
            (
                m + (w - 2 * m) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.5),
                h - m - (h - 1.5 * m) * (v - lo) / span,
            )
            for x, v in zip(xs, values, strict=True)
            if math.isfinite(v)
        ]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for p in pts:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        d.text(
            (w - m - 150, m // 2 + (0 if color == "blue" else 14)),
            f"{'train loss' if color == 'blue' else 'val BLEU-4'} {lo:.3g}-{hi:.3g}",
            fill=color,
        )

    series(loss, "blue")
    series(bleu, "orange")
    d.text((m, h - m + 8), f"epoch {min(xs)}-{max(xs)}", fill="black")
    img.save(path)


def _tensorboard(out: Path) -> Any:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("tensorboard is not installed: no event files (metrics.csv has everything)")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False)


# --------------------------------------------------------------------------- training


def build_model(config: TrainConfig, tokenizer: Tokenizer) -> D2RNet:
    """The model of the run: preset + overrides + vocabulary; detector copied if requested."""
    cfg = get_preset(config.preset)
    if config.model:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), **config.model})
    cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    if config.init_global_from_detector and (
        not config.init_detector or cfg.global_backbone != cfg.detector_backbone
    ):
        raise TrainingError(
            "init_global_from_detector: needs init_detector and equal global_backbone and "
            f"detector_backbone (got {cfg.global_backbone} and {cfg.detector_backbone})"
        )
    torch.manual_seed(config.seed)
    model = D2RNet(cfg)
    if config.init_detector:
        source, detector = load_detector_state(Path(config.init_detector))
        if source.image_size != cfg.image_size:
            raise TrainingError(
                f"init_detector: image_size {source.image_size} differs from {cfg.image_size}"
            )
        try:
            model.detector.load_state_dict(detector)
        except RuntimeError as e:
            raise TrainingError(f"init_detector: {config.init_detector}: {e}") from e
    if config.init_global_from_detector:
        body = model.detector.fcos.backbone.body
        trunk = model.visual.global_branch.trunk  # conv1, bn1, relu, maxpool, layer1..4
        for index, name in (
            (0, "conv1"),
            (1, "bn1"),
            (4, "layer1"),
            (5, "layer2"),
            (6, "layer3"),
            (7, "layer4"),
        ):
            trunk[index].load_state_dict(getattr(body, name).state_dict())
    return model


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Run (or resume) a training run; returns the final checkpoint directory ``out/model``."""
    rank, world, local_rank = _dist()
    distributed = world > 1
    device = _device(config, local_rank)
    if distributed and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(config.out)
    main = rank == 0
    try:
        return _train(config, resume, rank, world, device, out, main)
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(
    config: TrainConfig,
    resume: bool,
    rank: int,
    world: int,
    device: torch.device,
    out: Path,
    main: bool,
) -> Path:
    run = _build_run(config, resume, rank, world, device, out, main)
    while run.progress["epoch"] < config.epochs:
        epoch = run.progress["epoch"]
        batches = _epoch_batches(run, epoch)
        sums, seen, stop = _train_epoch(run, epoch, batches)
        if stop and run.progress["step_in_epoch"] < len(batches):
            _save_state(run)  # stopped mid-epoch: resume continues from this batch
            break
        row = _epoch_row(run, epoch, sums, seen)
        if main:
            _select(run, epoch, row)
        if _end_epoch(run, epoch) or stop:
            break
    return _finish(run)


@dataclass
class _Run:
    """What the steps of one training run share, built once by :func:`_build_run`;
    ``progress`` (epoch, step, best score, history) is saved in ``state/last.pt``."""

    config: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    main: bool
    tokenizer: Tokenizer
    model: D2RNet
    train_samples: list[Sample]
    val_samples: list[Sample]
    dataset: SampleDataset
    align: AlignmentLosses | None
    text_enc: TextEncoding
    trunk: nn.Sequential  # stem + first freeze_global_trunk stages (frozen when > 0)
    frozen: FrozenInputs
    module: TrainModule
    observations: Tensor | None  # (N,14) report labels of the training images
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    sampler: torch.utils.data.DistributedSampler[int]
    progress: dict[str, Any]
    net: nn.Module  # ``module``, wrapped in DistributedDataParallel when distributed
    tb: Any
    data_desc: str
    started: float

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def use_amp(self) -> bool:
        return self.config.amp and self.device.type == "cuda"

    @property
    def state_path(self) -> Path:
        return self.out / "state" / STATE_FILE


def _build_run(
    config: TrainConfig,
    resume: bool,
    rank: int,
    world: int,
    device: torch.device,
    out: Path,
    main: bool,
) -> _Run:
    """Data, model, losses, optimizer and progress of a run, in the order that fixes its
    random draws; ``resume`` restores them from ``state/last.pt``."""
    records, tokenizer, model, train_samples, val_samples = _load_data(config, world, out, main)
    cfg = model.config
    from training.data import strong_augment

    dataset = SampleDataset(train_samples, strong_augment if config.augment else None, config.seed)
    built, text_enc = build_alignment(cfg, tokenizer, config)
    align = built if cfg.lab_weight or cfg.gab_weight else None
    trunk, frozen = _freeze(model, config, train_samples, device)
    module = TrainModule(
        model,
        align,
        train_detector=config.train_detector,
        observation_weight=config.observation_weight,
    ).to(device)
    # report labels, computed once per training image
    observations = (
        observation_labels([x.findings for x in train_samples])
        if config.observation_weight
        else None
    )
    params, opt, sched, scaler = _optimizer(module, config, device)
    sampler: torch.utils.data.DistributedSampler[int] = torch.utils.data.DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed
    )
    progress: dict[str, Any] = {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "best_score": -1.0,
        "best_epoch": -1,
        "bad_epochs": 0,
        "history": [],
    }
    if resume:
        _load_state(out / "state" / STATE_FILE, rank, module, opt, sched, scaler, progress)
    net = _parallel(module, world, device)
    tb = _tensorboard(out) if main else None
    return _Run(
        config=config, rank=rank, world=world, device=device, out=out, main=main,
        tokenizer=tokenizer, model=model, train_samples=train_samples, val_samples=val_samples,
        dataset=dataset, align=align, text_enc=text_enc, trunk=trunk, frozen=frozen,
        module=module, observations=observations, params=params, opt=opt, sched=sched,
        scaler=scaler, sampler=sampler, progress=progress, net=net, tb=tb,
        data_desc=describe_data(config.data, records), started=time.perf_counter(),
    )  # fmt: skip


def _load_data(
    config: TrainConfig, world: int, out: Path, main: bool
) -> tuple[list[StudyRecord], Tokenizer, D2RNet, list[Sample], list[Sample]]:
    """Records, vocabulary, model and the prepared training and validation samples; rank 0
    writes ``config.resolved.json`` and ``vocab.json``."""
    records = read_records(Path(config.data))
    tokenizer = build_tokenizer(records, min_frequency=config.min_frequency)
    model = build_model(config, tokenizer)
    cfg = model.config
    train_recs = [r for r in records if r.split == "train"]
    val_recs = [r for r in records if r.split == "val"]
    if config.max_val:
        val_recs = val_recs[: config.max_val]
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.resolved.json").write_text(
            json.dumps(
                {"train": config.to_dict(), "model": cfg.to_dict(), "world_size": world}, indent=1
            )
            + "\n"
        )
        tokenizer.save(out / "vocab.json")
    train_samples = prepare_samples(
        train_recs, cfg.image_size, tokenizer, max_tokens=cfg.max_tokens
    )
    val_samples = prepare_samples(val_recs, cfg.image_size, tokenizer, max_tokens=cfg.max_tokens)
    return records, tokenizer, model, train_samples, val_samples


def _freeze(
    model: D2RNet, config: TrainConfig, train_samples: Sequence[Sample], device: torch.device
) -> tuple[nn.Sequential, FrozenInputs]:
    """Freeze the detector (unless trained) and the first ``freeze_global_trunk`` stages of
    the global trunk; without augmentation, precompute what they give each training image."""
    if not config.train_detector:
        model.detector.requires_grad_(False)
    stages = config.freeze_global_trunk
    trunk = model.visual.global_branch.trunk_prefix(stages)
    if stages:
        trunk.requires_grad_(False)
    frozen = (
        precompute_frozen(
            model.to(device),
            train_samples,
            boxes=config.generator_boxes == "detector",
            trunk_stages=stages,
            device=device,
        )
        if not config.augment
        else FrozenInputs()
    )
    return trunk, frozen


def _optimizer(
    module: nn.Module, config: TrainConfig, device: torch.device
) -> tuple[
    list[nn.Parameter],
    torch.optim.Optimizer,
    torch.optim.lr_scheduler.LRScheduler,
    torch.amp.GradScaler,
]:
    """The trainable parameters, Adam, the cosine schedule and the fp16 gradient scaler."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(
        params, lr=config.lr, weight_decay=config.weight_decay, amsgrad=config.amsgrad
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=config.t_max or config.epochs, eta_min=config.eta_min
    )
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    return params, opt, sched, scaler


def _load_state(
    state_path: Path,
    rank: int,
    module: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    progress: dict[str, Any],
) -> None:
    """Restore a run from ``state/last.pt``: weights, optimizer, schedule, scaler, progress
    and this rank's RNG states."""
    if not state_path.is_file():
        raise TrainingError(f"resume: no training state at {state_path}")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["module"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    progress.update(state["progress"])
    _set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    logger.info("resumed at epoch %d step %d", progress["epoch"], progress["step_in_epoch"])


def _parallel(module: nn.Module, world: int, device: torch.device) -> nn.Module:
    """``module`` itself, or wrapped in ``DistributedDataParallel`` over ``world`` ranks."""
    if world <= 1:
        return module
    return nn.parallel.DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True,
    )


def _save_state(run: _Run) -> None:
    """Write ``state/last.pt`` (rank 0), with every rank's RNG states."""
    rng = [_rng_state()]
    if run.distributed:
        gathered: list[Any] = [None] * run.world
        torch.distributed.all_gather_object(gathered, rng[0])
        rng = gathered
    if not run.main:
        return
    run.state_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = run.state_path.with_suffix(".tmp")
    torch.save(
        {
            "module": run.module.state_dict(),
            "optimizer": run.opt.state_dict(),
            "scheduler": run.sched.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": rng,
            "progress": run.progress,
        },
        tmp,
    )
    tmp.replace(run.state_path)


def _epoch_batches(run: _Run, epoch: int) -> list[list[int]]:
    """This rank's sample indices of ``epoch`` (a function of the seed and epoch), batched."""
    run.sampler.set_epoch(epoch)
    run.dataset.set_epoch(epoch)
    order = list(run.sampler)
    size = run.config.batch_size
    return [order[i : i + size] for i in range(0, len(order), size)]


def _set_modes(run: _Run) -> None:
    """Training mode, except for the frozen detector and frozen trunk stages."""
    run.module.train()
    if not run.config.train_detector:
        run.model.detector.eval()
    if run.config.freeze_global_trunk:
        run.trunk.eval()


def _train_epoch(
    run: _Run, epoch: int, batches: Sequence[list[int]]
) -> tuple[dict[str, float], int, bool]:
    """Train on the epoch's batches from ``step_in_epoch`` on: the summed loss terms, the
    number of steps taken and whether ``max_steps`` stopped the run."""
    progress = run.progress
    _set_modes(run)
    sums: dict[str, float] = {}
    seen = 0
    stop = False
    bar = _progress(len(batches), f"epoch {epoch + 1}", run.config.progress and run.main)
    if bar is not None and progress["step_in_epoch"]:
        bar.update(progress["step_in_epoch"])
    for b in range(progress["step_in_epoch"], len(batches)):
        batch, text = _collate(run, batches[b])
        losses = _optimize(run, batch, text)
        progress["step_in_epoch"] = b + 1
        progress["global_step"] += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        seen += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(losses['loss'].detach()):.3f}")
        _log_step(run, epoch, losses)
        if run.config.max_steps and progress["global_step"] >= run.config.max_steps:
            stop = True
            break
    if bar is not None:
        bar.close()
    return sums, seen, stop


def _collate(run: _Run, indices: Sequence[int]) -> tuple[dict[str, Any], tuple[Tensor, ...] | None]:
    """One training batch on the run's device, with the local branch's boxes, the frozen
    trunk features and the observation labels, and the alignment text ids (or ``None``)."""
    config, device, model = run.config, run.device, run.model
    batch = collate_reports([run.dataset[i] for i in indices], model.config.num_boxes)
    text = None
    if run.align is not None:
        text = tuple(
            t.to(device)
            for t in run.text_enc(batch["tokens"], batch["findings"], batch["impressions"])
        )
    for key in ("images", "tokens", "boxes", "box_mask", "box_scores"):
        batch[key] = batch[key].to(device)
    index = batch["index"]
    if run.frozen.boxes is not None:
        batch["boxes"], batch["box_mask"], batch["box_scores"] = (
            t[index].to(device) for t in run.frozen.boxes
        )
    elif config.generator_boxes == "detector":
        batch["boxes"], batch["box_mask"], batch["box_scores"] = model.generator_boxes(
            batch["images"]
        )
    batch["trunk_stages"] = config.freeze_global_trunk
    if run.observations is not None:
        batch["observations"] = run.observations[index].to(device)
    if run.frozen.trunk is not None:
        batch["trunk"] = run.frozen.trunk[index].to(device)
    elif config.freeze_global_trunk:
        with torch.no_grad():
            batch["trunk"] = run.trunk(model.stem(batch["images"]))
    batch["targets"] = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    return batch, text


def _optimize(
    run: _Run, batch: dict[str, Any], text: tuple[Tensor, ...] | None
) -> dict[str, Tensor]:
    """One optimizer step (autocast, scaled backward, gradient clipping); the loss terms."""
    with torch.autocast(device_type=run.device.type, dtype=torch.float16, enabled=run.use_amp):
        losses: dict[str, Tensor] = run.net(batch, text)
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(losses["loss"]).backward()  # type: ignore[no-untyped-call]
    run.scaler.unscale_(run.opt)
    if run.config.grad_clip_value > 0:
        torch.nn.utils.clip_grad_value_(run.params, run.config.grad_clip_value)
    run.scaler.step(run.opt)
    run.scaler.update()
    return losses


def _log_step(run: _Run, epoch: int, losses: dict[str, Tensor]) -> None:
    """Every ``log_every`` steps (rank 0): the loss line and the TensorBoard scalars."""
    step = run.progress["global_step"]
    if not run.main or step % run.config.log_every:
        return
    logger.info(
        "epoch %d step %d loss %.4f (%.0f s)",
        epoch + 1,
        step,
        float(losses["loss"].detach()),
        time.perf_counter() - run.started,
    )
    if run.tb is not None:
        for k, v in losses.items():
            run.tb.add_scalar(f"train/{k}", float(v.detach()), step)


def _epoch_row(run: _Run, epoch: int, sums: dict[str, float], seen: int) -> dict[str, Any]:
    """Advance the learning-rate schedule; the epoch's ``metrics.csv`` row (no validation)."""
    run.sched.step()
    return {
        "epoch": epoch + 1,
        "global_step": run.progress["global_step"],
        "lr": float(run.opt.param_groups[0]["lr"]),
        "train_loss": sums.get("loss", 0.0) / max(1, seen),
        **{f"train_{k}": v / max(1, seen) for k, v in sums.items() if k != "loss"},
        "val_bleu4": None,
        "val_ce_f1": None,
        "elapsed_s": round(time.perf_counter() - run.started, 1),
    }


def _validate(run: _Run, row: dict[str, Any]) -> bool:
    """Fill ``row``'s validation BLEU-4 and CE F1; whether the selection metric improved
    (always, without validation samples)."""
    if not run.val_samples:
        return True
    gen = generate_reports(
        run.model,
        run.val_samples,
        run.tokenizer,
        detector_boxes=bool(run.config.init_detector) or run.config.train_detector,
        beam_size=run.config.val_beam_size,
        device=run.device,
    )
    refs, found = [s.findings for s in run.val_samples], [g[0] for g in gen]
    row["val_bleu4"] = bleu4(refs, found)
    row["val_ce_f1"] = ce_f1(refs, found)
    return bool(row[f"val_{run.config.select_metric}"] > run.progress["best_score"])


def _select(run: _Run, epoch: int, row: dict[str, Any]) -> None:
    """Rank 0 at the end of an epoch: validate, keep the best checkpoint in ``best/``, count
    epochs without gain, write ``metrics.csv`` and log the epoch."""
    config, progress = run.config, run.progress
    if _validate(run, row):
        score = row[f"val_{config.select_metric}"]
        progress["best_score"] = score if score is not None else -1.0
        progress["best_epoch"] = epoch + 1
        progress["bad_epochs"] = 0
        save_checkpoint(
            run.model,
            run.tokenizer,
            run.out / "best",
            name=config.name,
            version=config.version,
            training_data=run.data_desc,
            half=config.half,
        )
    else:
        progress["bad_epochs"] += 1
    progress["history"].append(row)
    _write_metrics(run.out, progress["history"])
    if run.tb is not None:
        for k, v in row.items():
            if isinstance(v, float) and k != "elapsed_s":
                run.tb.add_scalar(f"epoch/{k}", v, epoch + 1)
    logger.info(
        "epoch %d: train loss %.4f, val BLEU-4 %s, val CE F1 %s (best %s %.4f at %d)",
        epoch + 1,
        row["train_loss"],
        "n/a" if row["val_bleu4"] is None else f"{row['val_bleu4']:.4f}",
        "n/a" if row["val_ce_f1"] is None else f"{row['val_ce_f1']:.4f}",
        config.select_metric,
        progress["best_score"],
        progress["best_epoch"],
    )


def _end_epoch(run: _Run, epoch: int) -> bool:
    """Close the epoch: advance the progress, save the state; whether to stop early (rank 0
    decides, every rank follows)."""
    progress = run.progress
    progress["epoch"] = epoch + 1
    progress["step_in_epoch"] = 0
    early = bool(progress["bad_epochs"] >= run.config.patience > 0)
    if run.distributed:
        flag = torch.tensor([1 if early else 0], device=run.device)
        torch.distributed.broadcast(flag, src=0)
        early = bool(flag.item())
    _save_state(run)
    if early:
        logger.info(
            "early stop: no %s gain for %d epochs", run.config.select_metric, run.config.patience
        )
    return early


def _finish(run: _Run) -> Path:
    """Rank 0: copy ``best/`` (or, if no epoch ended, the current weights) to ``model/`` and
    fit its input gate; every rank waits for it."""
    final = run.out / "model"
    if run.main:
        if run.tb is not None:
            run.tb.close()
        best = run.out / "best"
        if not best.is_dir():  # stopped before any epoch ended: keep the current weights
            save_checkpoint(
                run.model,
                run.tokenizer,
                best,
                name=run.config.name,
                version=run.config.version,
                training_data=run.data_desc,
            )
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(best, final)
        from model.checkpoint import load_checkpoint
        from training.gate import write_gate

        write_gate(load_checkpoint(final).model, run.train_samples, final)
    if run.distributed:
        torch.distributed.barrier()
    return final


def _write_metrics(out: Path, history: Sequence[dict[str, Any]]) -> None:
    import csv

    keys: list[str] = []
    for r in history:
        keys += [k for k in r if k not in keys]
    with (out / "metrics.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in history:
            w.writerow({k: "" if r.get(k) is None else r.get(k) for k in keys})
    draw_learning_curve(history, out / "learning_curve.png")


__all__ = [
    "TextEncoding",
    "TrainConfig",
    "TrainModule",
    "bleu4",
    "build_alignment",
    "build_model",
    "describe_data",
    "draw_learning_curve",
    "generate_reports",
    "read_config_file",
    "read_records",
    "train",
]
