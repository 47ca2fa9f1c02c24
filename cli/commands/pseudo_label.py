"""``d2r pseudo-label``: run a trained detector over report images and write pseudo-boxes.

Writes the R2Gen ``annotation.json`` with the D2R-Net box fields (``boxes`` COCO ``[x, y, w,
h]`` in source pixels, ``labels``, ``scores``, ``height``, ``width``) and, with ``--coco``, the
detections as a COCO object (images, categories, annotations with ``score``).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--detector", required=True, metavar="DIR", help="checkpoint directory")
    parser.add_argument("--annotation", required=True, help="R2Gen annotation.json to label")
    parser.add_argument("--image-root", help="image folder (default: images/ beside it)")
    parser.add_argument("--out", required=True, help="annotation.json to write")
    parser.add_argument("--coco", help="also write the detections as COCO JSON")
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="minimum pseudo-box score (default 0.5)"
    )


def run(args: argparse.Namespace) -> int:
    import json
    import logging
    import sys
    from pathlib import Path

    from model.checkpoint import load_checkpoint
    from model.errors import CheckpointError
    from training.data import prepare_samples
    from training.datasets import read_r2gen
    from training.detector import annotate_entries, coco_results, pseudo_label
    from training.errors import TrainingError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not 0.0 <= args.threshold <= 1.0:
        print("d2r pseudo-label: --threshold must be in [0, 1]", file=sys.stderr)
        return 2
    annotation = Path(args.annotation)
    root = Path(args.image_root) if args.image_root else annotation.parent / "images"
    try:
        ckpt = load_checkpoint(Path(args.detector))
        records = read_r2gen(annotation, root, dataset="pseudo-label")
        samples = prepare_samples(records, ckpt.config.image_size)
    except (CheckpointError, TrainingError, OSError) as exc:
        print(f"d2r pseudo-label: {exc}", file=sys.stderr)
        return 1
    detections = pseudo_label(ckpt.model, samples, threshold=args.threshold)
    sizes = {s.id: (s.mapping.source_rows, s.mapping.source_columns) for s in samples if s.mapping}
    data = json.loads(annotation.read_text(encoding="utf-8"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(annotate_entries(data, detections, sizes), indent=1) + "\n")
    if args.coco:
        Path(args.coco).write_text(json.dumps(coco_results(detections, samples), indent=1) + "\n")
    n = sum(len(v) for v in detections.values())
    print(f"{n} pseudo-boxes on {len(samples)} images -> {out}")
    return 0
