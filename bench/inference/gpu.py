"""GPU check of the D2R-Net inference backends (``paper`` preset); prints one Markdown table.

Runs from a copy of the repository with ``PYTHONPATH`` set (``bench/gpu_check.sh``) on a
machine with PyTorch and CUDA; needs no pydicom and installs nothing. The model is a
randomly initialised ``paper`` checkpoint (or ``--checkpoint``) and the input a synthetic
letterboxed image, so with random weights beam search usually runs to the full 100 tokens (the
worst case for latency).

Stages (``--stages``), each skipped (and said so) when the time budget (``--budget`` s) runs
short: torch CUDA fp32 eager and fp16 autocast (``eager``), ONNX export with onnxruntime parity
of the detector (``export``), TensorRT fp16 engines when ``tensorrt`` imports (``tensorrt``),
the worker's own path, ``Predictor.predict`` one study per call against
``Predictor.predict_batch`` with ``--batch`` studies per call (``batching``; needs pydicom),
torch.compile of the decoder step, the per-token loop, with CUDA graphs
(``mode="reduce-overhead"``) on a GPU (``compile``; compiling all three ``paper`` graphs took
over 5 minutes on an H100). ``--append`` adds rows to an earlier run's table in ``--out``, so
``bench/gpu_check.sh`` can run torch.compile in a process of its own."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - START


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)


def synthetic_images(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """Smooth chest-like phantoms in [0, 1], letterboxed square (no pydicom needed)."""
    g = torch.Generator().manual_seed(7)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for _ in range(batch):
        body = torch.exp(-(((xx / 0.8) ** 2 + (yy / 0.9) ** 2) ** 2))
        lungs = sum(
            torch.exp(-((((xx - cx) / 0.28) ** 2 + ((yy + 0.05) / 0.5) ** 2) ** 2))
            for cx in (-0.38, 0.38)
        )
        img = 0.3 + 0.6 * body - 0.35 * lungs + 0.03 * torch.randn(size, size, generator=g)
        images.append(img.clamp(0, 1))
    return torch.stack(images)[:, None].to(device)


def causes(e: BaseException, *, implicit: bool = False) -> list[BaseException]:
    """``e`` and the exceptions behind it, outermost first: its ``__cause__`` chain, and with
    ``implicit`` also ``__context__`` where no cause is set."""
    chain = [e]
    while True:
        last = chain[-1]
        nxt = last.__cause__ or (last.__context__ if implicit else None)
        if nxt is None or nxt in chain:
            return chain
        chain.append(nxt)


def failure(e: BaseException, out: str | None = None, stage: str = "") -> str:
    """One line: the exception and its innermost cause (the part that says what broke).

    With ``out``, the whole traceback also goes to ``out/<stage>.traceback.txt``.
    """
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        name = "".join(c if c.isalnum() else "_" for c in stage) or "stage"
        Path(out, f"{name}.traceback.txt").write_text("".join(traceback.format_exception(e)))
    root = causes(e)[-1]
    text = f"{type(e).__name__}" + (f" <- {type(root).__name__}: {root}" if root is not e else "")
    text = text if root is not e else f"{text}: {e}"
    return "FAILED: " + " ".join(text.split())[:400].replace("|", "/")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], iters: int, device: torch.device) -> tuple[float, Any]:
    out = fn()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    sync(device)
    return (time.perf_counter() - t0) / iters, out


def summary(dets: Any, beams: Any) -> dict[str, Any]:
    d = dets[0]
    ids = list(beams[0][0].ids)  # the most probable hypothesis
    return {
        "ids": ids,
        "labels": d.labels.tolist(),
        "boxes": d.boxes.float().cpu(),
        "tokens": len(ids),
    }


def parity(ref: dict[str, Any], got: dict[str, Any]) -> str:
    same_text = ref["ids"] == got["ids"]
    same_cls = ref["labels"] == got["labels"]
    if same_cls and ref["boxes"].shape == got["boxes"].shape and ref["boxes"].numel():
        diff = f"{(ref['boxes'] - got['boxes']).abs().max().item():.3f} px"
    else:
        diff = "n/a"
    text = "same" if same_text else "differs"
    classes = "same" if same_cls else "differ"
    return f"text {text}, classes {classes}, max box diff {diff}"


def synthetic_datasets(count: int, size: int) -> list[Any]:
    """``count`` in-memory DX datasets (12-bit MONOCHROME2) of :func:`synthetic_images`."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    out = []
    for image in synthetic_images(count, size, torch.device("cpu")):
        pixels = (image[0].numpy() * 4095).round().astype("uint16")
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = "DX"
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out


class OutOfTime(Exception):
    """The stage ran past the check's time budget."""


def auto_rows(
    ckpt_dir: Path, device: torch.device, batch: int, iters: int, work: Path, out: str | None
) -> list[list[str]]:
    """``D2R_BACKEND=auto`` as the worker opens it (``worker.predictor.open_predictor``): what it
    chose on this machine, and ``Predictor.predict`` at 1 and ``batch`` studies per call.

    The export cache is ``D2R_BACKEND_CACHE_DIR`` where set (a host whose workers already
    exported this checkpoint opens it from there), else a new one, so the opening time includes
    the export and its parity check."""
    cache = os.environ.get("D2R_BACKEND_CACHE_DIR")
    try:
        from worker.predictor import ModelOptions, open_predictor

        options = ModelOptions(
            ckpt_dir,
            device=str(device),
            backend="auto",
            cache_dir=Path(cache) if cache else work / "backend-cache",
            input_gate=False,
            report_choice="probable",
        )
        t0 = time.perf_counter()
        predictor = open_predictor(options)
        opened = time.perf_counter() - t0
        studies = synthetic_datasets(batch, predictor.config.image_size)
        reps = max(1, iters // 2)
        alone_t, alone = timed(lambda: [predictor.predict([ds]) for ds in studies], reps, device)
        batch_t, _ = timed(lambda: predictor.predict_batch([[ds] for ds in studies]), reps, device)
        tokens = str(len((alone[0].findings + " " + alone[0].impression).split()))
        chose = predictor.backend_choice.describe()
        return [
            [
                "D2R_BACKEND=auto, 1 study per call",
                f"{alone_t / batch * 1000:.0f}",
                f"{batch / alone_t:.2f}",
                tokens,
                f"chose {chose}; opened in {opened:.0f} s "
                + (
                    "(the cache of D2R_BACKEND_CACHE_DIR)"
                    if cache
                    else "(export and parity check included)"
                ),
            ],
            [
                f"D2R_BACKEND=auto, {batch} studies per call",
                f"{batch_t / batch * 1000:.0f}",
                f"{batch / batch_t:.2f}",
                tokens,
                "Predictor.predict_batch",
            ],
        ]
    except Exception as e:  # report, do not stop the check
        return [["D2R_BACKEND=auto", "", "", "", failure(e, out, "auto")]]


def _alarm(signum: int, frame: Any) -> None:
    raise OutOfTime("time budget spent")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="paper")
    parser.add_argument(
        "--checkpoint", default=None, help="a trained checkpoint dir instead of random weights"
    )
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="batch for throughput")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all stages")
    parser.add_argument("--out", default=os.environ.get("OUT") or None)
    parser.add_argument(
        "--stages",
        default="eager,batching,export,tensorrt,auto,compile",
        help="comma-separated subset of eager (fp32 + fp16), batching, export, tensorrt, auto "
        "(the worker's default backend policy), compile",
    )
    parser.add_argument(
        "--append", action="store_true", help="add to the rows already in OUT/gpu_check.json"
    )
    parser.add_argument("--device", default="cuda", help="cpu only to dry-run the logic")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    from model.backends import TorchBackend, run_graphs
    from model.checkpoint import init_checkpoint, load_checkpoint

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: nothing to check", file=sys.stderr)
        return 2
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        cc = "{}.{}".format(*torch.cuda.get_device_capability(device))
    else:
        gpu, cc = "CPU (dry run)", "n/a"
    try:
        import tensorrt as trt

        trt_version: str | None = str(trt.__version__)
    except ImportError as e:
        trt_version = None
        trt_reason = str(e)
    work = Path(tempfile.mkdtemp(prefix="d2r-gpu-"))
    if args.checkpoint:
        ckpt_dir = Path(args.checkpoint)
        weights = f"checkpoint {ckpt_dir.name}"
    else:
        ckpt_dir = init_checkpoint(work / "ckpt", args.preset, seed=0)
        weights = f"`{args.preset}` preset, random weights"
    ckpt = load_checkpoint(ckpt_dir, device=str(device))
    host, cfg = ckpt.model.eval(), ckpt.config
    log(f"{gpu} (cc {cc}), torch {torch.__version__}, CUDA {torch.version.cuda}, {weights}")
    one = synthetic_images(1, cfg.image_size, device)
    many = synthetic_images(args.batch, cfg.image_size, device)
    stages = set(args.stages.split(","))
    rows: list[list[str]] = []
    if args.append and args.out and Path(args.out, "gpu_check.json").is_file():
        rows = json.loads(Path(args.out, "gpu_check.json").read_text())
    results: dict[str, Any] = {}

    def render() -> str:
        head = (
            f"GPU check, {weights}: {gpu} (compute capability {cc}), torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}, TensorRT {trt_version or 'absent'}; "
            f"batch 1 latency over {args.iters} runs after a warm-up, "
            f"throughput at batch {args.batch}; "
            f"beam {cfg.beam_size}, up to {cfg.max_tokens} tokens; synthetic image."
        )
        table = [
            head,
            "",
            f"| Mode | ms / study (batch 1) | studies/s (batch {args.batch}) | tokens "
            "| parity vs torch fp32 / notes |",
            "|---|---|---|---|---|",
        ] + ["| " + " | ".join(r) + " |" for r in rows]
        text = "\n".join(table)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "gpu_check.md").write_text(text + "\n")
            (Path(args.out) / "gpu_check.json").write_text(json.dumps(rows, indent=1))
        return text

    def bench(
        label: str,
        backend: Any,
        ctx: Callable[[], AbstractContextManager[Any]] = nullcontext,
        note: str = "",
        row: bool = True,
    ) -> None:
        def run(images: torch.Tensor) -> Callable[[], Any]:
            def go() -> Any:
                with ctx():
                    return run_graphs(backend, host, images, lesion_score_threshold=0.0)

            return go

        lat, out = timed(run(one), args.iters, device)
        thr_t, _ = timed(run(many), max(1, args.iters // 2), device)
        s = summary(*out)
        ref = results.get("torch fp32")
        check = parity(ref, s) if ref is not None else "reference"
        results[label] = s
        if not row:
            return
        rows.append(
            [
                label,
                f"{lat * 1000:.0f}",
                f"{args.batch / thr_t:.2f}",
                f"{s['tokens']}",
                f"{check}{note}",
            ]
        )
        render()
        log(f"{label}: {lat * 1000:.0f} ms/study, {args.batch / thr_t:.2f} studies/s ({check})")

    fp32 = TorchBackend(host, device=str(device))
    bench("torch fp32", fp32, row="eager" in stages)  # the reference of every parity column
    if "eager" in stages:
        bench(
            "torch fp16 (autocast)",
            fp32,
            lambda: torch.autocast(device.type, dtype=torch.float16),
        )

    onnx_dir = work / "onnx"
    export_ok = False
    if not stages & {"export", "tensorrt"}:
        pass
    elif elapsed() < args.budget * 0.5:
        from model.export import export_checkpoint

        t0 = time.perf_counter()
        try:
            info = export_checkpoint(ckpt_dir, onnx_dir)
            export_ok = True
            secs = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in onnx_dir.iterdir()) / 1e6
            note = f"3 graphs, opset {info['opset']}, {size:.0f} MB (.onnx + .onnx.data)"
            try:
                import numpy as np
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                sess = ort.InferenceSession(
                    str(onnx_dir / "detector.onnx"), opts, providers=["CPUExecutionProvider"]
                )
                x = synthetic_images(2, cfg.image_size, torch.device("cpu"))
                got = sess.run(None, {"image": x.numpy()})[0]
                cpu_model = load_checkpoint(ckpt_dir).model.eval()
                with torch.no_grad():
                    ref = cpu_model.detector.dense(cpu_model.stem(x))[0].numpy()
                note += f"; ORT-CPU detector max diff {float(np.abs(got - ref).max()):.1e}"
            except Exception as e:  # report, do not stop the check
                note += f"; ORT parity not run ({type(e).__name__}: {e})"
            rows.append(["ONNX export", f"{secs * 1000:.0f} (export)", "", "", f"ok: {note}"])
        except Exception as e:
            rows.append(["ONNX export", "", "", "", failure(e, args.out, "onnx_export")])
        log(rows[-1][-1])
    else:
        rows.append(["ONNX export", "", "", "", "skipped (time budget)"])

    if "tensorrt" not in stages:
        pass
    elif trt_version is None:
        rows.append(
            ["TensorRT fp16", "", "", "", f"not run: tensorrt not importable ({trt_reason})"]
        )
    elif not export_ok:
        rows.append(["TensorRT fp16", "", "", "", "not run: no ONNX export"])
    elif elapsed() > args.budget - 120:
        rows.append(["TensorRT fp16", "", "", "", "skipped (time budget)"])
    else:
        from model.backends import TensorRTBackend
        from trt_build.build import BuildOptions, build_engines

        t0 = time.perf_counter()
        try:
            manifest = build_engines(
                ckpt_dir,
                work / "engine",
                BuildOptions(fp16=True, max_batch=args.batch),
                onnx_dir=onnx_dir,
            )
            build_s = time.perf_counter() - t0
            rows.append(
                [
                    "TensorRT engine build",
                    f"{build_s * 1000:.0f} (build)",
                    "",
                    "",
                    f"TensorRT {trt_version}, fp16",
                ]
            )
            backend = TensorRTBackend(work / "engine", checkpoint_sha256=manifest.checkpoint_sha256)
            bench("TensorRT fp16", backend)
        except Exception as e:
            rows.append(["TensorRT fp16", "", "", "", failure(e, args.out, "tensorrt")])

    if "batching" not in stages:
        pass
    elif importlib.util.find_spec("pydicom") is None:
        rows.append(["Predictor.predict_batch", "", "", "", "not run: pydicom absent"])
    elif elapsed() < args.budget - 30:
        try:
            from model.predict import Predictor

            predictor = Predictor.from_checkpoint(
                ckpt_dir, device=str(device), lesion_score_threshold=0.0, input_gate=False
            )
            studies = synthetic_datasets(args.batch, cfg.image_size)
            reps = max(1, args.iters // 2)

            def one_by_one() -> Any:
                return [predictor.predict([ds]) for ds in studies]

            alone_t, alone = timed(one_by_one, reps, device)
            batch_t, batched = timed(
                lambda: predictor.predict_batch([[ds] for ds in studies]), reps, device
            )
            same = all(
                (getattr(b, "findings", None), getattr(b, "impression", None))
                == (a.findings, a.impression)
                for a, b in zip(alone, batched, strict=True)
            )
            tokens = str(len((alone[0].findings + " " + alone[0].impression).split()))
            rows.append(
                [
                    "Predictor.predict, 1 study per call",
                    f"{alone_t / args.batch * 1000:.0f}",
                    f"{args.batch / alone_t:.2f}",
                    tokens,
                    "the worker's path: decode, letterbox, graphs, NMS, beam search (words)",
                ]
            )
            rows.append(
                [
                    f"Predictor.predict_batch, {args.batch} studies per call",
                    f"{batch_t / args.batch * 1000:.0f}",
                    f"{args.batch / batch_t:.2f}",
                    tokens,
                    f"text {'same' if same else 'differs'} as each study alone; "
                    f"{alone_t / batch_t:.2f}x the studies/s of 1 per call",
                ]
            )
            log(f"batching: {args.batch / alone_t:.2f} -> {args.batch / batch_t:.2f} studies/s")
        except Exception as e:
            rows.append(["Predictor.predict_batch", "", "", "", failure(e, args.out, "batching")])
        render()
    else:
        rows.append(["Predictor.predict_batch", "", "", "", "skipped (time budget)"])

    if "auto" in stages:
        rows.extend(auto_rows(ckpt_dir, device, args.batch, args.iters, work, args.out))
    render()
    label = "torch.compile decoder step" + (" + CUDA graphs" if device.type == "cuda" else "")
    if "compile" not in stages:
        pass
    elif elapsed() < args.budget - 60:
        # stands until the stage ends: a compile stopped from outside leaves it in the table
        rows.append([label, "", "", "", "stopped: did not finish in time"])
        render()
        rows.pop()
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(max(1, int(args.budget - elapsed())))
        try:
            t0 = time.perf_counter()
            compiled = TorchBackend(
                host,
                device=str(device),
                compile=True,
                compile_parts=("decoder_step",),
                compile_mode="reduce-overhead" if device.type == "cuda" else None,
            )
            run_graphs(compiled, host, one, lesion_score_threshold=0.0)
            note = f" (compile + first study {time.perf_counter() - t0:.0f} s)"
            bench(label, compiled, note=note)
        except Exception as e:  # the budget alarm may arrive wrapped in a compiler error
            chain = causes(e, implicit=True)
            if any(isinstance(c, OutOfTime) or "OutOfTime" in str(c) for c in chain):
                note = "stopped: compile ran past the budget"
            else:
                note = failure(e, args.out, "torch_compile")
            rows.append([label, "", "", "", note])
        finally:
            signal.alarm(0)
    else:
        rows.append([label, "", "", "", "skipped (time budget)"])

    signal.alarm(0)
    print(render(), flush=True)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
