"""``d2r init-model``: write a randomly initialised checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    parser.add_argument(
        "--preset",
        choices=("small", "paper"),
        default="small",
        help="architecture preset (default: small)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--name", default="d2r-net-random", help="model name in model.json")
    parser.add_argument("--version", default="0.0.0", help="model version in model.json")


def run(args: argparse.Namespace) -> int:
    from model.checkpoint import checkpoint_sha256, init_checkpoint
    from model.errors import ModelError

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"d2r init-model: {out} exists and is not empty", file=sys.stderr)
        return 2
    try:
        init_checkpoint(out, args.preset, seed=args.seed, name=args.name, version=args.version)
    except (ModelError, OSError) as e:
        print(f"d2r init-model: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.preset} checkpoint (random weights, not trained) to {out}")
    print(f"sha256 {checkpoint_sha256(out)}")
    return 0
