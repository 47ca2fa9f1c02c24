"""Build TensorRT plans from an ONNX export and write ``manifest.json``.

One plan per graph (``detector.plan``, ``visual.plan``, ``decoder_step.plan``), each with one
optimisation profile over its dynamic dimensions (:mod:`trt_build.profiles`), a shared
timing cache (``timing.cache``), FP16 and/or INT8 (entropy calibration over DICOM files)
when asked. The manifest binds the plans to the checkpoint hash, the TensorRT and CUDA
versions and the GPU (name, compute capability); :class:`model.backends.TensorRTBackend`
refuses any mismatch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trt_build.errors import CalibrationError, EngineBuildError, TensorRTUnavailable

logger = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"
GIB = 1 << 30


@dataclass(frozen=True)
class BuildOptions:
    """What ``d2r build-engine`` builds.

    Parameters
    ----------
    fp16, int8 : bool
        Allow FP16 / INT8 kernels (INT8 needs ``calib_dir``; it applies to the detector
        and the visual graph, the decoder step stays FP16 or FP32).
    calib_dir : Path or None
        Folder of DICOM files for INT8 calibration.
    max_batch : int
        Largest number of images per call (the decoder step gets ``max_batch * beam``).
    workspace_gib : float
        Builder workspace memory pool limit.
    """

    fp16: bool = False
    int8: bool = False
    calib_dir: Path | None = None
    max_batch: int = 4
    workspace_gib: float = 4.0
    calib_batch: int = 4

    def __post_init__(self) -> None:
        if self.int8 and self.calib_dir is None:
            raise ValueError("calib_dir: --int8 needs --calib DIR (a folder of DICOM files)")
        if self.max_batch < 1:
            raise ValueError(f"max_batch: must be at least 1, got {self.max_batch}")
        if self.workspace_gib <= 0:
            raise ValueError(f"workspace_gib: must be positive, got {self.workspace_gib}")

    @property
    def precision(self) -> str:
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"


def import_tensorrt() -> Any:
    """``import tensorrt`` or :class:`TensorRTUnavailable` with the reason."""
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTUnavailable(f"the tensorrt package is not importable ({e})") from e
    return tensorrt


def build_plan(
    trt: Any,
    onnx_path: Path,
    profile: dict[str, dict[str, list[int]]],
    options: BuildOptions,
    *,
    timing_cache: Path,
    calibrator: Any = None,
) -> bytes:
    """Parse one ONNX graph and build its serialised plan."""
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    flags = 0
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if explicit is not None and int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(explicit)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path.name}: ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * GIB))
    if options.fp16 or options.int8:
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    for name, shapes in profile.items():
        opt_profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(opt_profile)
    if calibrator is not None:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(opt_profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{onnx_path.name}: TensorRT builder returned no engine")
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def build_engines(
    model_dir: Path,
    out_dir: Path,
    options: BuildOptions,
    *,
    onnx_dir: Path | None = None,
    trt: Any = None,
) -> Any:
    """Export (unless ``onnx_dir`` is given), build every plan and write ``manifest.json``.

    Returns the :class:`model.backends.EngineManifest` written.
    """
    import numpy as np
    import torch

    from model.backends import EngineManifest, cuda_runtime_info, utc_now
    from model.checkpoint import load_checkpoint
    from model.export import PARTS, export_checkpoint, read_export
    from trt_build.calibration import (
        CALIBRATED_PARTS,
        CalibrationStream,
        calibration_batches,
        find_dicom_files,
        load_images,
        make_calibrator,
    )
    from trt_build.profiles import compute_profiles

    trt = trt or import_tensorrt()
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("no CUDA device is visible to PyTorch")
    device = torch.device("cuda")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(Path(model_dir))
    if onnx_dir is None:
        onnx_dir = out_dir / "onnx"
        export_checkpoint(Path(model_dir), onnx_dir)
    info = read_export(onnx_dir, checkpoint_sha256=ckpt.sha256)
    cfg = ckpt.config
    profiles = compute_profiles(
        info["graphs"],
        max_batch=options.max_batch,
        beam_size=cfg.beam_size,
        max_tokens=cfg.max_tokens,
    )
    batches: list[Any] = []
    host = ckpt.model.to(device).eval()
    if options.int8:
        assert options.calib_dir is not None
        files = find_dicom_files(options.calib_dir)
        if not files:
            raise CalibrationError(f"{options.calib_dir}: no DICOM files")
        batches = calibration_batches(load_images(files, cfg.image_size), options.calib_batch)

    def boxes_fn(batch: Any) -> tuple[Any, Any, Any]:
        with torch.inference_mode():
            boxes, mask, scores = host.generator_boxes(torch.from_numpy(batch).to(device))
        return boxes.cpu().numpy(), mask.cpu().numpy(), scores.cpu().numpy()

    def to_device(array: Any) -> Any:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    started = time.perf_counter()
    cache = out_dir / TIMING_CACHE
    engines = {}
    for part in PARTS:
        calibrator = None
        if options.int8 and part in CALIBRATED_PARTS:
            stream = CalibrationStream(part, batches, to_device, boxes_fn)
            calibrator = make_calibrator(trt, stream, out_dir / f"{part}.calib")
        t0 = time.perf_counter()
        plan = build_plan(
            trt,
            onnx_dir / info["graphs"][part]["file"],
            profiles[part],
            options,
            timing_cache=cache,
            calibrator=calibrator,
        )
        name = f"{part}.plan"
        (out_dir / name).write_bytes(plan)
        engines[part] = name
        logger.info("built %s in %.1f s (%d bytes)", name, time.perf_counter() - t0, len(plan))
    runtime = cuda_runtime_info(trt, device)
    manifest = EngineManifest(
        checkpoint_sha256=ckpt.sha256,
        tensorrt_version=runtime.tensorrt_version,
        cuda_version=str(torch.version.cuda),
        gpu_name=runtime.gpu_name,
        compute_capability=runtime.compute_capability,
        precision=options.precision,
        max_batch=options.max_batch,
        profiles=profiles,
        engines=engines,
        created=utc_now(),
        build_seconds=round(time.perf_counter() - started, 1),
    )
    manifest.write(out_dir)
    return manifest


__all__ = ["TIMING_CACHE", "BuildOptions", "build_engines", "build_plan", "import_tensorrt"]
