"""``d2r train``: train the D2R-Net report generator (LM + LAB + GAB), resumable, DDP-ready.

Settings come from ``--config FILE`` (JSON or YAML, :class:`training.train.TrainConfig` fields)
and are overridden by flags; every run writes ``config.resolved.json``. Under
``torchrun --nproc-per-node N -m cli.main train ...`` it trains with DistributedDataParallel.
"""

from __future__ import annotations

import argparse

#: flag -> (type, help); each maps to the TrainConfig field of the same name
_FLAGS: dict[str, tuple[type, str]] = {
    "data": (str, "d2r synth folder, R2Gen annotation.json or datasets config JSON"),
    "out": (str, "output folder (checkpoints, metrics, resolved config)"),
    "preset": (str, "model preset: small or paper"),
    "init_detector": (str, "checkpoint whose detector is copied (and frozen)"),
    "generator_boxes": (str, "local-branch boxes in training: annotations (default) or detector"),
    "select_metric": (str, "validation metric for best epoch and early stop: bleu4 or ce_f1"),
    "freeze_global_trunk": (int, "keep the global ResNet's stem + first N stages fixed (0-4)"),
    "observation_weight": (
        float,
        "weight of the report-label loss on the global token (needs global_token; default 0)",
    ),
    "text_encoder": (str, "local transformers BERT directory for LAB/GAB"),
    "text_hidden": (int, "width of the random BERT used without --text-encoder"),
    "epochs": (int, "epochs (default 50)"),
    "batch_size": (int, "images per step and process (default 16)"),
    "lr": (float, "Adam learning rate (default 1e-4)"),
    "weight_decay": (float, "weight decay (default 5e-5)"),
    "t_max": (int, "cosine schedule period in epochs (default: epochs)"),
    "eta_min": (float, "cosine schedule floor (default 0)"),
    "grad_clip_value": (float, "gradient clipping by value (default 0.1)"),
    "seed": (int, "seed (default 456789)"),
    "min_frequency": (int, "vocabulary minimum word frequency in the train split (default 10)"),
    "patience": (int, "early stopping: epochs without a val BLEU-4 gain (0 = off)"),
    "val_beam_size": (int, "beam width of validation decoding (default: the model's)"),
    "max_val": (int, "validate on at most N val images (0 = all)"),
    "max_steps": (int, "stop after N optimizer steps in total (0 = no limit)"),
    "device": (str, "auto, cpu, cuda or cuda:N"),
    "name": (str, "model name written to model.json"),
    "version": (str, "model version written to model.json"),
}
_SWITCHES = {
    "train_detector": "also train the detector (FCOS loss added)",
    "init_global_from_detector": "start the global ResNet from the detector's (same backbone)",
    "half": "store checkpoint weights as fp16",
    "freeze_text_encoder": "freeze the alignment text encoder",
    "augment": "photometric + small affine augmentation (boxes moved, never flipped)",
    "no_amp": "disable mixed precision on CUDA",
    "no_progress": "no progress bars",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", dest="train_config", metavar="FILE", help="JSON/YAML settings")
    for name, (kind, text) in _FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=text)
    for name, text in _SWITCHES.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, action="store_true", default=None, help=text
        )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/state/last.pt")


def resolve(args: argparse.Namespace) -> dict[str, object]:
    """Config-file settings overridden by the flags that were given."""
    from pathlib import Path

    from training.train import read_config_file

    values: dict[str, object] = {}
    if args.train_config:
        values.update(read_config_file(Path(args.train_config)))
    for name in _FLAGS:
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    for name in (
        "train_detector",
        "init_global_from_detector",
        "half",
        "freeze_text_encoder",
        "augment",
    ):
        if getattr(args, name, None):
            values[name] = True
    if args.no_amp:
        values["amp"] = False
    if args.no_progress:
        values["progress"] = False
    return values


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from training.errors import TrainingError
    from training.train import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        values = resolve(args)
        for needed in ("data", "out"):
            if needed not in values:
                print(
                    f"d2r train: --{needed} (or '{needed}' in --config) is required",
                    file=sys.stderr,
                )
                return 2
        config = TrainConfig.from_dict(values)
    except (ValueError, OSError) as exc:
        print(f"d2r train: {exc}", file=sys.stderr)
        return 2
    try:
        final = train(config, resume=args.resume)
    except TrainingError as exc:
        print(f"d2r train: {exc}", file=sys.stderr)
        return 1
    print(final)
    return 0
