"""CPU benchmark: per-study latency and studies/s of torch eager vs onnxruntime.

Each (preset, backend) runs in its own process (``--child``), so peak RSS and thread pools
do not mix; the parent prepares a random checkpoint and its ONNX export per preset, then
prints one Markdown table. Input: the real RG1 chest CR (pydicom-data), end to end through
``Predictor.predict`` with the input gate off (preprocessing, dense graphs, NMS, beam search),
choosing the report as the node does by default (``--report-choice consistent``: five
hypotheses, the one most consistent with the boxes; ``probable``: the most probable of the
checkpoint's beam).

    .venv/bin/python bench/inference/run.py [--presets small paper] [--iters 3] [--threads 2]
    .venv/bin/python bench/inference/run.py --checkpoint models/d2r-demo-phantom

``--batch 1 8`` instead measures batched inference (``Predictor.predict_batch``, torch): the
same image N times per call, the input gate off so every study runs the whole model; one
table row per batch size, studies/s against batch 1, and whether each study's text equals
``predict`` alone.

    .venv/bin/python bench/inference/run.py --presets paper --batch 1 8
    .venv/bin/python bench/inference/run.py --checkpoint models/d2r-demo-phantom --batch 1 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _rg1_chest_cr() -> Path:
    """pydicom-data's adult PA chest CR, the image every row runs."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if not isinstance(path, str):
        raise SystemExit("pydicom-data's RG1_UNCR.dcm is missing: pip install pydicom-data")
    return Path(path)


def child(args: argparse.Namespace) -> None:
    import pydicom
    import torch

    torch.set_num_threads(args.threads)
    from model.predict import Predictor
    from report.grounding import report_chooser

    ds = pydicom.dcmread(_rg1_chest_cr())
    t0 = time.perf_counter()
    predictor = Predictor.from_checkpoint(
        Path(args.model),
        backend=args.child,
        engine_dir=Path(args.onnx) if args.child == "onnxruntime" else None,
        input_gate=False,  # the bundled model abstains on this real CR: measure the whole model
        choose_report=report_chooser(args.report_choice),
    )
    load_s = time.perf_counter() - t0
    first = predictor.predict([ds])  # warm-up
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        out = predictor.predict([ds])
        times.append(time.perf_counter() - t)
    assert out.findings == first.findings
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mean = sum(times) / len(times)
    print(
        json.dumps(
            {
                "load_s": load_s,
                "latency_s": mean,
                "min_s": min(times),
                "studies_per_s": 1 / mean,
                "peak_rss_mb": rss_mb,
                "tokens": len(first.findings.split()) + len(first.impression.split()),
                "text": first.findings + " / " + first.impression,
            }
        )
    )


def batch_child(args: argparse.Namespace) -> None:
    import pydicom
    import torch

    torch.set_num_threads(args.threads)
    from model.predict import Predictor, StudyPrediction
    from report.grounding import report_chooser

    ds = pydicom.dcmread(_rg1_chest_cr())
    predictor = Predictor.from_checkpoint(
        Path(args.model), input_gate=False, choose_report=report_chooser(args.report_choice)
    )
    alone = predictor.predict([ds])
    size = args.batch_child
    predictor.predict_batch([[ds]] * size)  # warm-up
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        out = predictor.predict_batch([[ds]] * size)
        times.append(time.perf_counter() - t)
    same = all(
        isinstance(p, StudyPrediction)
        and (p.findings, p.impression) == (alone.findings, alone.impression)
        for p in out
    )
    mean = sum(times) / len(times)
    print(
        json.dumps(
            {
                "batch": size,
                "batch_s": mean,
                "per_study_s": mean / size,
                "studies_per_s": size / mean,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "same_text": same,
            }
        )
    )


def batch_table(args: argparse.Namespace, env: dict[str, str], work: Path) -> int:
    d2r = [sys.executable, "-m", "cli.main"]
    rows = []
    for preset in [args.checkpoint.name] if args.checkpoint else args.presets:
        model = work / preset / "model"
        if args.checkpoint:
            model = args.checkpoint.resolve()
        else:
            subprocess.run([*d2r, "init-model", "--out", str(model), "--preset", preset],
                           env=env, check=True, capture_output=True, cwd=REPO)  # fmt: skip
        base = None
        for size in args.batch:
            out = subprocess.run(
                [sys.executable, __file__, "--batch-child", str(size), "--model", str(model),
                 "--iters", str(args.iters), "--threads", str(args.threads),
                 "--report-choice", args.report_choice],
                env=env, capture_output=True, text=True, cwd=REPO,
            )  # fmt: skip
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{preset} batch {size}: {r}", file=sys.stderr, flush=True)
            base = base or r
            rows.append(
                f"| {preset} | {size} | {r['per_study_s'] * 1000:.0f} | {r['studies_per_s']:.2f} "
                f"| {r['studies_per_s'] / base['studies_per_s']:.2f}x | {r['peak_rss_mb']:.0f} "
                f"| {'same' if r['same_text'] else 'differs'} |"
            )
    print(
        f"Batched inference (torch, CPU): RG1 chest CR N times per call, input gate off, "
        f"{args.iters} calls after a warm-up, {args.threads} threads, one process per row, "
        f"{'weights of ' + str(args.checkpoint) if args.checkpoint else 'random weights'}.\n"
    )
    print("| preset | batch | ms / study | studies/s | vs batch 1 | peak RSS MB | text vs alone |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


def main() -> int:
    from report.grounding import REPORT_CHOICES

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["small", "paper"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=("torch", "onnxruntime"))
    parser.add_argument("--model")
    parser.add_argument(
        "--checkpoint", type=Path, help="benchmark this trained checkpoint instead of presets"
    )
    parser.add_argument("--onnx")
    parser.add_argument(
        "--batch", type=int, nargs="+", help="measure predict_batch at these batch sizes"
    )
    parser.add_argument("--batch-child", type=int)
    parser.add_argument(
        "--report-choice",
        choices=REPORT_CHOICES,
        default="consistent",
        help="D2R_REPORT_CHOICE: consistent (the node's default, 5 hypotheses) or probable",
    )
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    if args.batch_child:
        batch_child(args)
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    work = Path(tempfile.mkdtemp(prefix="d2r-bench-"))
    if args.batch:
        return batch_table(args, env, work)
    rows = []
    d2r = [sys.executable, "-m", "cli.main"]
    for preset in [args.checkpoint.name] if args.checkpoint else args.presets:
        model, onnx = work / preset / "model", work / preset / "onnx"
        if args.checkpoint:
            model = args.checkpoint.resolve()
        else:
            subprocess.run([*d2r, "init-model", "--out", str(model), "--preset", preset],
                           env=env, check=True, capture_output=True, cwd=REPO)  # fmt: skip
        t = time.perf_counter()
        res = subprocess.run([*d2r, "export-onnx", "--model", str(model), "--out", str(onnx)],
                             env=env, capture_output=True, text=True, cwd=REPO)  # fmt: skip
        export_s = time.perf_counter() - t
        print(f"{preset}: export {'ok' if res.returncode == 0 else 'FAILED'} in {export_s:.0f} s",
              file=sys.stderr, flush=True)  # fmt: skip
        results = {}
        for backend in ("torch", "onnxruntime"):
            if backend == "onnxruntime" and res.returncode != 0:
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--child", backend, "--model", str(model),
                 "--onnx", str(onnx), "--iters", str(args.iters), "--threads", str(args.threads),
                 "--report-choice", args.report_choice],
                env=env, capture_output=True, text=True, cwd=REPO,
            )  # fmt: skip
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[backend]
            print(f"{preset} {backend}: {r}", file=sys.stderr, flush=True)
        base = results.get("torch")
        for backend, r in results.items():
            speed = f"{base['latency_s'] / r['latency_s']:.2f}x" if base else "n/a"
            same = "same" if base and r["text"] == base["text"] else "differs"
            rows.append(
                f"| {preset} | {backend} | {r['latency_s'] * 1000:.0f} | {r['studies_per_s']:.2f} "
                f"| {speed} | {r['peak_rss_mb']:.0f} | {r['load_s']:.1f} | {same} |"
            )
    print(
        f"CPU benchmark: RG1 chest CR end to end, {args.iters} runs after a warm-up, "
        f"{args.threads} threads per process, one process per row, "
        f"{'weights of ' + str(args.checkpoint) if args.checkpoint else 'random weights'}.\n"
    )
    print("| preset | backend | ms / study | studies/s | vs torch | peak RSS MB | load s | text |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
