"""``d2r export-onnx``: export a checkpoint's inference graphs to ONNX (with export.json)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cli.offline import EXIT_FAILURE, EXIT_USAGE, checkpoint_problem, fail


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", metavar="DIR", help="checkpoint directory (default: environment D2R_MODEL)"
    )
    parser.add_argument(
        "--out", metavar="DIR", required=True, help="export directory (created if missing)"
    )


def run(args: argparse.Namespace) -> int:
    model_dir = args.model or os.environ.get("D2R_MODEL")
    if problem := checkpoint_problem(model_dir):
        return fail("export-onnx", problem, EXIT_USAGE)
    assert model_dir is not None  # checked above
    from model.errors import ModelError
    from model.export import export_checkpoint

    try:
        info = export_checkpoint(Path(model_dir), Path(args.out))
    except ModelError as e:
        return fail("export-onnx", str(e), EXIT_FAILURE)
    graphs = ", ".join(g["file"] for g in info["graphs"].values())
    print(
        f"exported {graphs} (opset {info['opset']}, checkpoint {info['checkpoint_sha256'][:12]}) "
        f"to {args.out} in {info['export_seconds']:.1f} s"
    )
    return 0
