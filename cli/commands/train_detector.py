"""``d2r train-detector``: semi-supervised lesion detector (burn-in, then EMA teacher-student).

Labelled images come from ``--data`` (boxes in its records); ``--unlabeled`` adds images whose
boxes are ignored. The result is a ``model.checkpoint`` directory whose detector is the EMA
teacher (the report generator is untrained); ``d2r train --init-detector DIR`` and
``d2r pseudo-label --detector DIR`` use it.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        help="labelled data (synth folder, annotation.json or datasets config)",
    )
    parser.add_argument("--unlabeled", help="unlabelled images (same formats; boxes ignored)")
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory")
    parser.add_argument("--preset", default="small", help="model preset (default small)")
    parser.add_argument("--burn-in-steps", type=int, default=2000)
    parser.add_argument("--semi-steps", type=int, default=0, help="teacher-student steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--unlabeled-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threshold", type=float, default=0.89, help="pseudo-box score")
    parser.add_argument("--keep-rate", type=float, default=0.9996, help="teacher EMA keep rate")
    parser.add_argument("--unsup-weight", type=float, default=1.0)
    parser.add_argument("--min-frequency", type=int, default=10, help="vocabulary cut-off")
    parser.add_argument("--seed", type=int, default=456789)
    parser.add_argument("--name", default="d2r-detector")
    parser.add_argument("--version", default="0.1.0")


# Longer than a screen: the offline command's argument checks, training and checkpoint writing,
# read top to bottom
def run(args: argparse.Namespace) -> int:
    import dataclasses
    import logging
    import sys
    from pathlib import Path

    import torch

    from model.checkpoint import save_checkpoint
    from model.config import get_preset
    from model.errors import ModelConfigError
    from model.modeling import D2RNet
    from training.data import build_tokenizer, prepare_samples
    from training.detector import DetectorTrainConfig, train_detector
    from training.errors import TrainingError
    from training.train import describe_data, read_records

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = DetectorTrainConfig(
            burn_in_steps=args.burn_in_steps,
            semi_steps=args.semi_steps,
            batch_size=args.batch_size,
            unlabeled_batch_size=args.unlabeled_batch_size,
            lr=args.lr,
            threshold=args.threshold,
            keep_rate=args.keep_rate,
            unsup_weight=args.unsup_weight,
            seed=args.seed,
        )
        cfg = get_preset(args.preset)
    except (ValueError, ModelConfigError) as exc:
        print(f"d2r train-detector: {exc}", file=sys.stderr)
        return 2
    try:
        records = read_records(Path(args.data))
        tokenizer = build_tokenizer(records, min_frequency=args.min_frequency)
        cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
        labeled = prepare_samples(
            [r for r in records if r.split == "train" and r.boxes is not None], cfg.image_size
        )
        unlabeled = []
        if args.unlabeled:
            unlabeled = [
                dataclasses.replace(
                    s, boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long)
                )
                for s in prepare_samples(read_records(Path(args.unlabeled)), cfg.image_size)
            ]
        torch.manual_seed(args.seed)
        model = D2RNet(cfg)
        out = Path(args.out)
        kept = train_detector(
            model, labeled, unlabeled, config, metrics_csv=out / "detector_metrics.csv"
        )
    except (TrainingError, ValueError) as exc:
        print(f"d2r train-detector: {exc}", file=sys.stderr)
        return 1
    desc = describe_data(args.data, records)
    if args.unlabeled:
        desc += f"; unlabelled images from {args.unlabeled}"
    save_checkpoint(kept, tokenizer, out, name=args.name, version=args.version, training_data=desc)
    from training.gate import write_gate

    write_gate(kept, labeled, out)
    print(out)
    return 0
