"""GPU check of report-generator training: a few epochs of ``d2r train`` with mixed precision.

Runs from a copy of the repository with ``PYTHONPATH`` set (``bench/gpu_check.sh`` calls it) on
a machine with PyTorch and CUDA. Writes a small phantom training set (PNG, no DICOM), trains
each preset for ``--epochs`` epochs on CUDA with autocast fp16 + ``GradScaler`` (the default of
``d2r train`` on CUDA), and prints one Markdown table: time per optimisation step, peak GPU
memory, and the training loss of the first and last epoch (it should fall).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["paper", "small"])
    parser.add_argument("--studies", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda", help="cpu only to dry-run the logic")
    parser.add_argument(
        "--out", default=os.environ.get("OUT") or None, help="folder for gpu_train.md"
    )
    args = parser.parse_args()

    from training.phantom_output import PhantomConfig, generate
    from training.train import TrainConfig, train

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: nothing to check", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="d2r-gpu-train-"))
    data = work / "phantom"
    generate(
        PhantomConfig(
            studies=args.studies,
            seed=11,
            size=384,
            dicom_size=0,
            val_fraction=0.0,
            test_fraction=0.0,
        ),
        data,
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    rows: list[str] = []
    ok = True
    for preset in args.presets:
        out = work / preset
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            train(
                TrainConfig(
                    data=str(data),
                    out=str(out),
                    preset=preset,
                    epochs=args.epochs,
                    batch_size=args.batch,
                    lr=1e-4,
                    min_frequency=1,
                    device=args.device,
                    amp=True,
                    progress=False,
                    log_every=1000,
                )
            )
        except Exception as e:
            tb = "".join(traceback.format_exception(e))
            print(tb, file=sys.stderr)
            if args.out:
                Path(args.out, f"gpu_train_{preset}.traceback.txt").write_text(tb)
            rows.append(f"| {preset} | | | | | FAILED: {type(e).__name__}: {str(e)[:200]} |")
            ok = False
            continue
        wall = time.perf_counter() - t0
        with open(out / "metrics.csv", newline="") as f:
            epochs = [r for r in csv.DictReader(f) if r.get("train_loss")]
        steps = int(epochs[-1]["global_step"])
        step_s = float(epochs[-1]["elapsed_s"]) / max(1, steps)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
        first, last = float(epochs[0]["train_loss"]), float(epochs[-1]["train_loss"])
        ok = ok and last < first
        verdict = "falls" if last < first else "does NOT fall"
        rows.append(
            f"| {preset} | {steps} | {step_s * 1000:.0f} | {peak:.0f} | "
            f"{first:.3f} → {last:.3f} | loss {verdict}; run {wall:.0f} s incl. setup |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
    text = "\n".join(
        [
            f"Training check on {name}, torch {torch.__version__}: `d2r train` with autocast "
            f"fp16 + GradScaler, {args.studies} phantom studies, batch {args.batch}, "
            f"{args.epochs} epochs.",
            "",
            "| Preset | steps | ms / step | peak GPU MiB | train loss (epoch 1 → last) | notes |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(text, flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "gpu_train.md").write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
