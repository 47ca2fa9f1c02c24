"""``d2r build-engine``: build TensorRT engines + manifest.json on this GPU (offline)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.offline import EXIT_FAILURE, EXIT_USAGE, checkpoint_problem, fail


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", metavar="DIR", help="checkpoint directory (default: environment D2R_MODEL)"
    )
    parser.add_argument("--out", metavar="DIR", required=True, help="engine directory")
    parser.add_argument(
        "--onnx", metavar="DIR", default=None, help="existing d2r export-onnx directory"
    )
    parser.add_argument("--fp16", action="store_true", help="allow FP16 kernels")
    parser.add_argument(
        "--int8", action="store_true", help="INT8 (detector, visual) with entropy calibration"
    )
    parser.add_argument("--calib", metavar="DIR", default=None, help="DICOM files for --int8")
    parser.add_argument(
        "--max-batch", type=int, default=4, metavar="N", help="largest batch (default 4)"
    )
    parser.add_argument(
        "--workspace-gib", type=float, default=4.0, metavar="G", help="builder workspace"
    )


def run(args: argparse.Namespace) -> int:
    from cli.runtime import environment
    from worker.settings import MODEL

    # D2R_MODEL from the config file under the environment, as every command reads it (no
    # bundled default here: an engine is built for a checkpoint named on purpose); the
    # checkpoint check below names what is wrong with it
    model_dir = args.model or environment(args).get(MODEL.name, "").strip() or None
    if problem := checkpoint_problem(model_dir):
        return fail("build-engine", problem, EXIT_USAGE)
    assert model_dir is not None  # checked above
    from trt_build.build import BuildOptions, build_engines
    from trt_build.errors import TrtBuildError

    try:
        options = BuildOptions(
            fp16=args.fp16,
            int8=args.int8,
            calib_dir=Path(args.calib) if args.calib else None,
            max_batch=args.max_batch,
            workspace_gib=args.workspace_gib,
        )
    except ValueError as e:
        return fail("build-engine", str(e), EXIT_USAGE)
    from model.errors import ModelError

    try:
        manifest = build_engines(
            Path(model_dir),
            Path(args.out),
            options,
            onnx_dir=Path(args.onnx) if args.onnx else None,
        )
    except (TrtBuildError, ModelError) as e:
        return fail("build-engine", str(e), EXIT_FAILURE)
    print(
        f"built {', '.join(manifest.engines.values())} ({manifest.precision}, "
        f"{manifest.gpu_name}, TensorRT {manifest.tensorrt_version}) in "
        f"{manifest.build_seconds:.1f} s to {args.out}"
    )
    return 0
