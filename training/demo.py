"""Reproduce the bundled demo model ``models/d2r-demo-phantom`` (synthetic phantom, CPU).

::

    python -m training.demo --out models/d2r-demo-phantom [--work DIR] [--threads 2]

Stages (every seed fixed; the held-out seed is never used for training):

0. ``d2r synth``-equivalent data: ``TRAIN_STUDIES`` labelled phantom studies (seed
   ``TRAIN_SEED``, PNG only) and ``UNLABELED_STUDIES`` further studies (seed
   ``UNLABELED_SEED``) whose boxes are ignored, as the unlabelled set of the semi-supervised
   detector stage.
1. ``detector``: supervised burn-in, then the EMA teacher-student stage
   (:mod:`training.detector`).
2. ``generator``: :func:`training.train.train` with the stage-1 detector copied (frozen); the
   local branch reads that detector's boxes and class scores (as serving does) and the global
   branch keeps the detector's trained ResNet fixed.
3. ``finish``: ``EVAL_STUDIES`` new studies (seed ``EVAL_SEED``, DICOM) are scored with the same
   code as ``d2r evaluate --model --data``; the checkpoint, its metrics and ``MODEL_CARD.md`` go
   to ``--out``, after the input gate (stage 4) is fitted, so the held-out scores count the
   studies the gate declines (``abstain_rate``) and score the others.
4. ``gate``: the input gate's statistics (:mod:`model.calibrate`) from ``GATE_STUDIES`` new
   phantom studies of each of ``GATE_SEEDS``; ``--stage gate`` alone refits an existing ``--out``.

``--stage card`` alone re-scores an existing ``--out`` on the held-out studies and rewrites
``heldout_metrics.json`` and ``MODEL_CARD.md`` (after a change to serving, e.g. decoding).

Synthetic data, not for clinical use: the model reads phantoms only.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

TRAIN_SEED, UNLABELED_SEED, EVAL_SEED = 7, 8, 20261127
TRAIN_STUDIES, UNLABELED_STUDIES, EVAL_STUDIES = 600, 160, 200
#: support devices are drawn in more training studies than the phantom's default (0.13), so the
#: generator sees enough of them; the held-out set keeps the default
TRAIN_DEVICE_FRACTION = 0.3
#: further labelled studies (seed ``EXTRA_SEED``, all in the train split) that only the report
#: generator reads: with one copy of each finding per few dozen studies, 480 studies leave the
#: decoder short of examples of each combination; the detector trains on ``TRAIN_STUDIES`` alone
EXTRA_SEED, EXTRA_STUDIES = 9, 600
#: in-distribution phantom studies (DICOM) that fit the input gate's statistics: new draws of
#: the training distribution, never the held-out seed (see model.calibrate)
GATE_SEEDS, GATE_STUDIES = (10, 11), 300
MODEL_NAME = "d2r-demo-phantom"
MODEL_VERSION = "3.1.0"

#: detector stage of the demo (see training.detector.DetectorTrainConfig)
DETECTOR: dict[str, Any] = {
    "burn_in_steps": 600,
    "semi_steps": 30,
    "batch_size": 8,
    "unlabeled_batch_size": 8,
    "lr": 1e-3,
    "warmup_steps": 30,
    "threshold": 0.89,
    "keep_rate": 0.9996,
    "seed": 456789,
}

#: report-generator stage of the demo (see training.train.TrainConfig)
GENERATOR: dict[str, Any] = {
    "preset": "small",
    # the global branch takes the detector's ResNet; the phantom's reports are a function of
    # the findings, so the generator trains on the language-model loss alone and without
    # dropout on the visual tokens (see MODEL_CARD.md)
    "model": {
        "global_backbone": "resnet18_w32",
        "global_token": True,
        "visual_dropout": 0.0,
        "lab_weight": 0.0,
        "gab_weight": 0.0,
    },
    "init_global_from_detector": True,
    "freeze_global_trunk": 4,
    "generator_boxes": "detector",
    "observation_weight": 1.0,
    "half": True,
    "epochs": 60,
    "batch_size": 16,
    "lr": 1e-3,
    "min_frequency": 3,
    "patience": 20,
    "select_metric": "ce_f1",
    "val_beam_size": 1,
    "max_val": 0,  # every validation study: 30 left the best-epoch choice noisy
    "seed": 456789,
    "name": MODEL_NAME,
    "version": MODEL_VERSION,
    "progress": False,
}

STAGES = ("detector", "generator", "finish", "gate")
#: ``--stage card``: re-score a finished ``--out`` on the held-out studies and rewrite its card
CARD = "card"
#: the report the held-out evaluation scores among the beam's: the node's default
#: (``D2R_REPORT_CHOICE``)
REPORT_CHOICE = "consistent"

logger = logging.getLogger(__name__)


def _synth(
    out: Path,
    studies: int,
    seed: int,
    dicom_size: int,
    device_fraction: float | None = None,
    *,
    train_only: bool = False,
) -> Path:
    from training.phantom import DEVICE_FRACTION
    from training.phantom_output import PhantomConfig, generate

    if not (out / "annotation.json").is_file():
        config = PhantomConfig(
            studies=studies,
            seed=seed,
            size=512,
            dicom_size=dicom_size,
            device_fraction=DEVICE_FRACTION if device_fraction is None else device_fraction,
            **({"val_fraction": 0.0, "test_fraction": 0.0} if train_only else {}),
        )
        generate(config, out)
    return out


def _generator_data(work: Path, train_dir: Path) -> Path:
    """The generator's datasets config: the detector's studies plus ``EXTRA_STUDIES`` more."""
    if not EXTRA_STUDIES:
        return train_dir
    extra_dir = _synth(
        work / "phantom-train-extra",
        EXTRA_STUDIES,
        EXTRA_SEED,
        0,
        device_fraction=TRAIN_DEVICE_FRACTION,
        train_only=True,
    )
    config = work / "generator-data.json"
    datasets = [{"kind": "phantom", "root": d.name} for d in (train_dir, extra_dir)]
    config.write_text(json.dumps({"datasets": datasets}, indent=1) + "\n")
    return config


def _sources() -> str:
    if not EXTRA_STUDIES:
        return f"d2r synth --seed {TRAIN_SEED}"
    return (
        f"d2r synth --seed {TRAIN_SEED} ({TRAIN_STUDIES} studies) and --seed {EXTRA_SEED} "
        f"({EXTRA_STUDIES} more, train split only, read by the report generator alone)"
    )


def evaluate_checkpoint(model_dir: Path, data: Path, split: str | None = None) -> dict[str, Any]:
    """Run the checkpoint on a phantom folder's DICOM files and score it (NLG, CE, mAP@0.5,
    grounding), choosing each report among the beam as the node does by default."""
    from training.evaluation import evaluate_records
    from training.evaluation.predictions import predict_phantom_records

    records = predict_phantom_records(model_dir, data, split, report_choice=REPORT_CHOICE)
    return evaluate_records(records)


def run(
    out: Path, work: Path, *, threads: int = 2, stages: tuple[str, ...] = STAGES
) -> dict[str, Any] | None:
    """Run ``stages`` (all by default, in order); returns the held-out metrics after ``finish``.

    A finished stage is not run again (its output folder under ``work`` is kept); an
    interrupted generator stage resumes from its last state.
    """
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import get_preset
    from model.modeling import D2RNet
    from training.data import build_tokenizer, prepare_samples
    from training.detector import DetectorTrainConfig, train_detector
    from training.train import TrainConfig, describe_data, read_records, train

    torch.set_num_threads(threads)
    work.mkdir(parents=True, exist_ok=True)
    if stages == ("gate",):  # refit the gate of a finished checkpoint: no training data needed
        calibrate_gate(out, work)
        return None
    if stages == (CARD,):  # re-score a finished checkpoint: no training data needed
        return rewrite_card(out, work)
    t0 = time.perf_counter()
    train_dir = _synth(
        work / "phantom-train",
        TRAIN_STUDIES,
        TRAIN_SEED,
        0,
        device_fraction=TRAIN_DEVICE_FRACTION,
    )
    unl_dir = _synth(work / "phantom-unlabeled", UNLABELED_STUDIES, UNLABELED_SEED, 0)
    eval_dir = _synth(work / "phantom-heldout", EVAL_STUDIES, EVAL_SEED, 1024)
    generator_data = _generator_data(work, train_dir)
    logger.info("data ready (%.0f s)", time.perf_counter() - t0)
    records = read_records(train_dir)
    det_dir, gen_dir = work / "detector", work / "generator"
    unlabeled_note = f"unlabelled: {UNLABELED_STUDIES} phantom studies (seed {UNLABELED_SEED})"

    if "detector" in stages and not (det_dir / "model.json").is_file():
        tokenizer = build_tokenizer(records, min_frequency=int(GENERATOR["min_frequency"]))
        cfg = get_preset(str(GENERATOR["preset"])).replace(vocab_size=tokenizer.vocab_size)
        labeled = prepare_samples([r for r in records if r.split == "train"], cfg.image_size)
        unlabeled = [
            replace(s, boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
            for s in prepare_samples(read_records(unl_dir), cfg.image_size)
        ]
        torch.manual_seed(int(DETECTOR["seed"]))
        kept = train_detector(
            D2RNet(cfg),
            labeled,
            unlabeled,
            DetectorTrainConfig(**DETECTOR),
            metrics_csv=work / "detector_metrics.csv",
            log_every=25,
        )
        save_checkpoint(
            kept,
            tokenizer,
            det_dir,
            name=f"{MODEL_NAME}-detector",
            version=MODEL_VERSION,
            training_data=(
                f"{describe_data(f'd2r synth --seed {TRAIN_SEED}', records)}; {unlabeled_note}"
            ),
        )
        logger.info("detector ready (%.0f s)", time.perf_counter() - t0)

    if "generator" in stages and not (gen_dir / "model" / "model.json").is_file():
        config = TrainConfig(
            data=str(generator_data),
            out=str(gen_dir),
            init_detector=str(det_dir),
            **GENERATOR,
        )
        train(config, resume=(gen_dir / "state" / "last.pt").is_file())
        logger.info("generator ready (%.0f s)", time.perf_counter() - t0)

    if "finish" not in stages:
        return None
    return finish(out, work, eval_dir, read_records(generator_data), unlabeled_note, t0)


def calibrate_gate(out: Path, work: Path) -> None:
    """Fit the input gate of the checkpoint in ``out`` on ``GATE_STUDIES`` phantom studies of
    each of ``GATE_SEEDS`` (DICOM, rendered like the held-out studies)."""
    from model.calibrate import calibrate_checkpoint
    from model.gate import describe

    files: list[Path] = []
    for seed in GATE_SEEDS:
        folder = _synth(work / f"phantom-gate-{seed}", GATE_STUDIES, seed, 1024)
        files += sorted((folder / "dicom").rglob("*.dcm"))
    stats, skipped = calibrate_checkpoint(out, files)
    logger.info("input gate from %d images (%d skipped): %s", len(files), skipped, describe(stats))


def finish(
    out: Path,
    work: Path,
    eval_dir: Path,
    records: list[Any],
    unlabeled_note: str,
    t0: float,
) -> dict[str, Any]:
    """Generator checkpoint -> ``out``; held-out evaluation, metrics and model card."""
    from model.checkpoint import load_checkpoint, save_checkpoint
    from training.evaluation import write_outputs
    from training.train import describe_data

    generator = load_checkpoint(work / "generator" / "model")
    if out.exists():
        shutil.rmtree(out)
    save_checkpoint(
        generator.model,
        generator.tokenizer,
        out,
        name=MODEL_NAME,
        version=MODEL_VERSION,
        training_data=f"{describe_data(_sources(), records)}; detector also saw {unlabeled_note}",
        half=bool(GENERATOR.get("half", False)),
    )
    calibrate_gate(out, work)
    metrics = evaluate_checkpoint(out, eval_dir)
    write_outputs(metrics, work / "heldout" / "metrics.json")
    return write_card(out, metrics, round(time.perf_counter() - t0))


def write_card(out: Path, metrics: dict[str, Any], wall_time_s: int) -> dict[str, Any]:
    """``heldout_metrics.json`` and ``MODEL_CARD.md`` of the checkpoint in ``out`` from its
    held-out ``metrics`` (:func:`evaluate_checkpoint`); returns the summary."""
    summary = {
        k: metrics[k] for k in ("bleu_1", "bleu_4", "meteor", "rouge_l", "cider", "ce_f1", "map50")
    }
    present = [v["f1"] for v in metrics["ce"]["per_label"].values() if v["support"] > 0]
    summary.update(
        ce_f1_present=sum(present) / len(present) if present else None,
        ce_present_observations=len(present),
        grounding_precision=metrics["grounding_precision"],
        grounding_recall=metrics["grounding_recall"],
        contradictions=metrics["contradictions"],
        report_choice=REPORT_CHOICE,
        heldout_studies=EVAL_STUDIES,
        abstain_rate=metrics["abstain_rate"],
        heldout_seed=EVAL_SEED,
        train_seed=TRAIN_SEED,
        unlabeled_seed=UNLABELED_SEED,
        wall_time_s=wall_time_s,
    )
    (out / "heldout_metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(summary, metrics, out))
    logger.info("held-out metrics: %s", summary)
    return summary


def rewrite_card(out: Path, work: Path) -> dict[str, Any]:
    """Score the finished checkpoint in ``out`` on the held-out studies again and rewrite its
    metrics and card (after a change to serving, such as the report choice), keeping the
    training wall time of the last ``finish``."""
    from training.evaluation import write_outputs

    eval_dir = _synth(work / "phantom-heldout", EVAL_STUDIES, EVAL_SEED, 1024)
    metrics = evaluate_checkpoint(out, eval_dir)
    write_outputs(metrics, work / "heldout" / "metrics.json")
    prior = json.loads((out / "heldout_metrics.json").read_text())
    return write_card(out, metrics, int(prior["wall_time_s"]))


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def model_card(summary: dict[str, Any], metrics: dict[str, Any], out: Path) -> str:
    """``MODEL_CARD.md`` of the demo checkpoint, with the held-out phantom metrics."""
    info = json.loads((out / "model.json").read_text())
    config = json.loads((out / "config.json").read_text())
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    from model.predict import CHOICE_BEAM_SIZE
    from training.phantom import DEVICE_FRACTION, PHANTOM_CLASSES

    beam = max(int(config["beam_size"]), CHOICE_BEAM_SIZE)
    rate = summary.get("abstain_rate")
    accepted = (
        ""
        if rate is None
        else f"The input gate accepted {round((1 - rate) * summary['heldout_studies'])} of them "
        f"(abstain rate {rate:.3f}); every metric scores those."
    )
    grounding = (
        f"Grounded findings (`report.grounding`): grounding precision "
        f"{_fmt(summary['grounding_precision'])}, recall {_fmt(summary['grounding_recall'])}, "
        f"{summary['contradictions']} contradictions\n(a sentence is grounded correctly when one "
        'of its boxes has IoU >= 0.5 with its true box; `docs/model.md`, "Grounded findings").'
    )
    decoding = (
        f"beam search, {beam} hypotheses; the report is the one that agrees best with the "
        f"detected boxes (`D2R_REPORT_CHOICE={summary['report_choice']}`, `docs/model.md`)"
    )

    weak = ", ".join(
        f"{name} ({v['f1']:.3f})"
        for name, v in sorted(metrics["ce"]["per_label"].items(), key=lambda kv: kv[1]["f1"])
        if v["support"] and v["f1"] < 0.9
    )

    per_class = (metrics.get("detection") or {}).get("per_class", {})
    ce_rows = "\n".join(
        f"| {name} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | {_fmt(v['f1'])} "
        f"| {v['support']} |"
        for name, v in metrics["ce"]["per_label"].items()
    )
    det_rows = "\n".join(
        f"| {name} | {_fmt(v['ap'])} | {v['n_gt']} |" for name, v in per_class.items() if v["n_gt"]
    )
    arch = (
        f"D2R-Net, `small` preset ({config['image_size']} px; detector FCOS "
        f"`{config['detector_backbone']}`-FPN, global branch `{config['global_backbone']}` + "
        f"CPCA with a summary and an observation token, crop CNN with LERA, box geometry at "
        f"{config['geometry_frequencies']} octaves, memory-driven decoder d {config['d_model']})"
    )
    vocab = (
        f"{config['vocab_size']} ids (train split, minimum frequency {GENERATOR['min_frequency']})"
    )
    weights = "fp16 safetensors (upcast to fp32 on load)" if GENERATOR.get("half") else "fp32"
    extra = (
        f" Besides the detector's {TRAIN_STUDIES} studies, the generator reads {EXTRA_STUDIES}"
        f" more (seed {EXTRA_SEED}, all in the train split): the detector's studies alone gave"
        " the decoder too few examples of each combination of findings."
        if EXTRA_STUDIES
        else ""
    )
    repro = "`python -m training.demo --out models/d2r-demo-phantom` (seeds in `training/demo.py`)"
    keys = ("bleu_1", "bleu_4", "meteor", "rouge_l", "cider", "ce_f1", "ce_f1_present", "map50")
    scores = " | ".join(_fmt(summary[k]) for k in keys)
    n_present = summary["ce_present_observations"]
    return f"""# Model card: {info["name"]} {info["version"]}

**Synthetic phantom data only. Not for clinical use.** This model has never seen a real
radiograph. It exists so that the reporting node works out of the box (demos, CI, integration
tests); its name contains "demo" and "phantom", so every Structured Report it produces is
labelled "not for diagnostic use".

| | |
|---|---|
| Architecture | {arch} |
| Vocabulary | {vocab} |
| Decoding | {decoding} |
| Checkpoint | `model.checkpoint` format 1, {weights}, {size_mb:.1f} MB |
| Training data | {info["training_data"]} |
| Hardware | CPU only (2 cores shared with other work) |
| Reproduce | {repro} |

## Training

1. Detector: {DETECTOR["burn_in_steps"]} supervised burn-in steps (batch {DETECTOR["batch_size"]},
   AdamW lr {DETECTOR["lr"]:g}, strong augmentation), then {DETECTOR["semi_steps"]} EMA
   teacher-student steps on {UNLABELED_STUDIES} unlabelled phantom studies (seed
   {UNLABELED_SEED}; pseudo-box threshold {DETECTOR["threshold"]}, keep rate
   {DETECTOR["keep_rate"]}). The teacher is kept.
2. Report generator: `d2r train` with the detector copied and frozen and the global branch's
   ResNet (`{config["global_backbone"]}`, the detector's architecture) set to the detector's
   trained trunk and kept frozen; the local branch reads the detector's own boxes and class
   scores (top {config["num_boxes"]} class-agnostic boxes above
   {config["box_score_threshold"]:g}), exactly as serving feeds it. The observation head learns
   the 14 CheXpert labels of each training report (weight {GENERATOR["observation_weight"]:g}),
   and the decoder reads its probabilities. The training studies draw support devices
   with probability {TRAIN_DEVICE_FRACTION:g} (doubled with edema or consolidation; the
   phantom's default, which the held-out set keeps, is {DEVICE_FRACTION:g}).{extra}
   {GENERATOR["epochs"]} epochs
   at most (early stop after {GENERATOR["patience"]} without a gain), batch
   {GENERATOR["batch_size"]}, Adam (amsgrad) lr {GENERATOR["lr"]:g} with a cosine schedule,
   weight decay 5e-5, gradient clipping by value 0.1, best epoch by validation CE F1 (all
   validation studies, greedy decoding; the
   paper selects on BLEU-4, which the generic normal report scores well on phantom data).
   Departures from the paper's recipe, to fit a CPU budget on phantom data: the learning rate is
   10x the paper's 1e-4; the loss is the language-model loss plus the observation loss, without
   LAB and GAB (weights 0: on the phantom a report is a function of the drawn findings, which the
   region and observation tokens carry); no dropout on the visual tokens (`visual_dropout` 0).

## Held-out evaluation

{summary["heldout_studies"]} phantom studies from seed {summary["heldout_seed"]} (never used in
training; training used seeds {summary["train_seed"]} and {summary["unlabeled_seed"]}), read from
their DICOM files through the serving path (`model.predict.Predictor`) and scored by
`training.evaluation.evaluate_records` (the code behind `d2r evaluate --model --data`). Phantom
metrics are phantom metrics: they say nothing about clinical performance and must not be compared
with MIMIC-CXR results. {accepted}

| BLEU-1 | BLEU-4 | METEOR | ROUGE-L | CIDEr | CE F1 (14 obs.) | CE F1 (present obs.) | mAP@0.5 |
|---|---|---|---|---|---|---|---|
| {scores} |

{grounding}

CE is the rule-based CheXpert-style labeler of `d2r evaluate` (positive = label 1). The
headline `ce_f1` averages F1 over all 14 observations, with F1 = 0 for an observation that
neither the references nor the reports contain; {n_present} of the 14 occur in these
references. The next column averages over the observations present in the references only.
mAP@0.5 is the lesion detection mean AP at IoU 0.5 over the classes with ground truth.

| Observation | precision | recall | F1 | references with it |
|---|---|---|---|---|
{ce_rows}

| Lesion class | AP@0.5 | boxes |
|---|---|---|
{det_rows}

## Limits

- Only the {len(PHANTOM_CLASSES)} lesion classes the phantom draws can be found; the other
  {22 - len(PHANTOM_CLASSES)} VinDr-CXR classes were never seen.
- Observations below F1 0.9 on the held-out set: {weak}.
- Support devices are drawn without a box (they are not VinDr-CXR lesion classes), so only the
  global branch sees them: through its summary token of the whole grid and the observation
  token (see `docs/model.md`).
- The phantom names a consolidation pneumonia when it is lobar-size and never otherwise, so the
  Pneumonia label follows the consolidation's size; the two sizes are separated by a gap.
- Reports follow the phantom's templates; wording, anatomy and noise of real radiographs are
  out of distribution.
- Laterality follows the phantom's geometry (the patient's right on the image's left).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models") / MODEL_NAME)
    parser.add_argument("--work", type=Path, default=Path("var") / "demo-training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--stage",
        action="append",
        choices=(*STAGES, CARD),
        help="run only this stage (repeatable; default: all, in order); 'card' alone re-scores "
        "a finished --out on the held-out studies and rewrites its metrics and card",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stages = tuple(args.stage) if args.stage else STAGES
    summary = run(args.out, args.work, threads=args.threads, stages=stages)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
