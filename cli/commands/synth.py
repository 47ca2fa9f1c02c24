"""``d2r synth``: generate the synthetic chest phantom (PNG, DICOM, annotation.json).

Also writes ``studies.jsonl`` (DICOM paths, lesions in DICOM pixels, reference report).

Synthetic data for tests, demos and CI training; not for clinical use.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.phantom import DEVICE_FRACTION

    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--studies", type=int, required=True, metavar="N", help="number of studies")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="base seed (default 0)")
    parser.add_argument("--size", type=int, default=512, help="PNG side in pixels (default 512)")
    parser.add_argument(
        "--dicom-size",
        type=int,
        default=1024,
        help="DICOM side in pixels (default 1024; e.g. 2048 for full resolution; 0 = no DICOM)",
    )
    parser.add_argument(
        "--normal-fraction", type=float, default=0.3, help="share of normal studies (default 0.3)"
    )
    parser.add_argument(
        "--device-fraction",
        type=float,
        default=DEVICE_FRACTION,
        help=f"probability of support devices in a study, doubled with edema or consolidation "
        f"(default {DEVICE_FRACTION})",
    )


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from training.phantom_output import PhantomConfig, generate

    try:
        config = PhantomConfig(
            studies=args.studies,
            seed=args.seed,
            size=args.size,
            dicom_size=args.dicom_size,
            normal_fraction=args.normal_fraction,
            device_fraction=args.device_fraction,
        )
    except ValueError as exc:
        print(f"d2r synth: {exc}", file=sys.stderr)
        return 2
    summary = generate(config, Path(args.out))
    print(json.dumps(summary, sort_keys=True))
    return 0
