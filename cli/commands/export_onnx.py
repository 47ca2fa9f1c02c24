"""``d2r export-onnx``: export a checkpoint's inference graphs to ONNX (with export.json)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILURE = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", metavar="DIR", help="checkpoint directory (default: environment D2R_MODEL)"
    )
    parser.add_argument(
        "--out", metavar="DIR", required=True, help="export directory (created if missing)"
    )


def _fail(message: str, code: int) -> int:
    print(f"d2r export-onnx: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    model_dir = args.model or os.environ.get("D2R_MODEL")
    if not model_dir:
        return _fail("no model: pass --model DIR or set D2R_MODEL", EXIT_USAGE)
    if not Path(model_dir).is_dir():
        return _fail(f"{model_dir}: not a checkpoint directory", EXIT_USAGE)
    from model.errors import ModelError
    from model.export import export_checkpoint

    try:
        info = export_checkpoint(Path(model_dir), Path(args.out))
    except ModelError as e:
        return _fail(str(e), EXIT_FAILURE)
    graphs = ", ".join(g["file"] for g in info["graphs"].values())
    print(
        f"exported {graphs} (opset {info['opset']}, checkpoint {info['checkpoint_sha256'][:12]}) "
        f"to {args.out} in {info['export_seconds']:.1f} s"
    )
    return 0
