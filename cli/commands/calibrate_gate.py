"""``d2r calibrate-gate``: fit a checkpoint's input-gate statistics from your own images."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.offline import EXIT_FAILURE, EXIT_USAGE, fail


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    parser.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="folder of in-distribution DICOM images (searched recursively for *.dcm)",
    )
    parser.add_argument(
        "--percentile",
        type=float,
        default=99.5,
        help="threshold: this percentile of held-out images' scores (default: 99.5)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def run(args: argparse.Namespace) -> int:
    from model.calibrate import calibrate_checkpoint
    from model.errors import ModelError
    from model.gate import GATE_FILE, describe

    data = Path(args.data)
    if not data.is_dir():
        return fail("calibrate-gate", f"{data}: not a directory", EXIT_USAGE)
    files = sorted(p for p in data.rglob("*.dcm") if p.is_file())
    try:
        stats, skipped = calibrate_checkpoint(
            Path(args.model), files, percentile=args.percentile, device=args.device
        )
    except (ModelError, ValueError, OSError) as e:
        return fail("calibrate-gate", str(e), EXIT_FAILURE)
    print(
        f"wrote {Path(args.model) / GATE_FILE} from {len(files) - skipped} images "
        f"({skipped} skipped)"
    )
    print(describe(stats))
    return 0
