"""Inference backends: the three dense D2R-Net graphs behind one interface.

Every backend runs the same three graphs (see :mod:`model.export`): the detector's dense
head, the visual encoder (global + local branch + transformer encoder) and one decoder
step with its relational-memory state. Everything else stays on the host and is shared:
preprocessing, box decoding and NMS, generator-box selection and beam search
(:func:`run_graphs`), so the backends can only differ in the dense arithmetic.

::

    InferenceBackend (protocol: detector, visual, decoder_step)
    ├── TorchBackend         eager PyTorch on CPU or CUDA, optionally torch.compile
    ├── OnnxRuntimeBackend   an ONNX export directory (export.json) on the CPU or CUDA provider
    └── TensorRTBackend      TensorRT plans + manifest.json on CUDA; loads, never builds

Exceptions::

    ModelError
    └── BackendError             backend unavailable or misconfigured (names the setting)
        └── EngineMismatchError  export/engine made for another checkpoint, GPU or TensorRT

There is no fallback: a backend that cannot start raises, naming the setting that chose it.
``tensorrt`` and ``onnxruntime`` are imported lazily, only by the backend that needs them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import Tensor, nn

from model.decoder import ReportDecoder
from model.decoding import Hypothesis, beam_hypotheses
from model.detector import Detections, select_boxes
from model.errors import BackendError, EngineMismatchError, ModelError
from model.modeling import D2RNet

logger = logging.getLogger(__name__)

TORCH = "torch"
ONNXRUNTIME = "onnxruntime"
TENSORRT = "tensorrt"
#: backend names accepted by ``D2R_BACKEND`` and ``d2r predict --backend``
BACKEND_NAMES = (TORCH, ONNXRUNTIME, TENSORRT)
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "d2r-trt-engine/2"
PRECISIONS = ("fp32", "fp16", "int8")


class InferenceBackend(Protocol):
    """The three dense graphs; tensors in and out live on :attr:`device`."""

    name: str
    device: torch.device

    def detector(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Image ``(B,1,S,S)`` -> ``cls_logits (B,A,C)``, ``bbox_regression (B,A,4)``,
        ``bbox_ctrness (B,A,1)``."""
        ...

    def visual(
        self, image: Tensor, boxes: Tensor, box_mask: Tensor, box_scores: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Image, boxes ``(B,K,4)``, mask ``(B,K)``, class scores ``(B,K,C)`` -> ``context
        (B,1,d)``, ``cross (B,2N,L,d)``, ``enc_mask (B,L)`` (see
        :meth:`model.modeling.D2RNet.decoding_inputs`)."""
        ...

    def decoder_step(
        self,
        tokens: Tensor,
        memory: Tensor,
        cache: Tensor,
        context: Tensor,
        cross: Tensor,
        enc_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Newest ids ``(B,1)``, memory ``(B,M,d)``, cache ``(B,2N,P,d)`` and the image ->
        ``logprobs (B,V)``, ``memory_out (B,M,d)``, ``cache_out (B,2N,1,d)`` (see
        :meth:`model.decoder.ReportDecoder.step`)."""
        ...


# --------------------------------------------------------------------------- host side


class _StepDecoder:
    """What :func:`model.decoding.beam_hypotheses` needs of a decoder, over a backend: the
    backend's dense step and the host decoder's parameter-free ``initial_state()``."""

    def __init__(self, backend: InferenceBackend, host: ReportDecoder) -> None:
        self.step = backend.decoder_step
        self.initial_state = host.initial_state


@torch.inference_mode()
def run_graphs(
    backend: InferenceBackend,
    host: D2RNet,
    image: Tensor,
    *,
    lesion_score_threshold: float,
    beam_size: int | None = None,
) -> tuple[list[Detections], list[list[Hypothesis]]]:
    """Lesions and the beam's report hypotheses (best log-probability first) for letterboxed
    images ``(B,1,S,S)``.

    ``host`` supplies the host-side pieces only (config, anchors, box coder, initial
    memory); the dense graphs run on ``backend``. Lesion boxes are in the model frame.
    """
    cfg = host.config
    dense = backend.detector(image)
    lesions = host.detector.postprocess(
        *dense,
        score_threshold=lesion_score_threshold,
        iou_threshold=cfg.lesion_nms_iou,
        max_detections=cfg.max_lesions,
        class_agnostic=False,
    )
    box_dets = host.detector.postprocess(
        *dense,
        score_threshold=cfg.box_score_threshold,
        iou_threshold=cfg.box_nms_iou,
        max_detections=cfg.num_boxes,
        class_agnostic=True,
    )
    boxes, box_mask, box_scores = select_boxes(
        box_dets, cfg.num_boxes, cfg.num_classes, image.device
    )
    context, cross, enc_mask = backend.visual(image, boxes, box_mask, box_scores)
    decoder = _StepDecoder(backend, host.decoder)
    beams = beam_hypotheses(
        cast(ReportDecoder, decoder),  # duck-typed: step() and initial_state()
        context,
        cross,
        enc_mask,
        beam_size=beam_size or cfg.beam_size,
        max_tokens=cfg.max_tokens,
        no_repeat_trigram=cfg.no_repeat_trigram,
    )
    return lesions, beams


# --------------------------------------------------------------------------- named graphs


class _NamedGraphs:
    """The three graphs over a runner of named graphs with named inputs (torch modules,
    ONNX Runtime sessions, TensorRT engines); subclasses provide :meth:`_run`."""

    device: torch.device
    #: the most images one call takes (None: any number)
    max_batch: int | None = None

    def _run(self, part: str, feeds: Mapping[str, Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def detector(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cls, reg, ctr = self._run("detector", {"image": image})
        return cls, reg, ctr

    def visual(
        self, image: Tensor, boxes: Tensor, box_mask: Tensor, box_scores: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        feeds = {"image": image, "boxes": boxes, "box_mask": box_mask, "box_scores": box_scores}
        context, cross, mask = self._run("visual", feeds)
        return context, cross, mask

    def decoder_step(
        self,
        tokens: Tensor,
        memory: Tensor,
        cache: Tensor,
        context: Tensor,
        cross: Tensor,
        enc_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        feeds = {
            "tokens": tokens,
            "memory": memory,
            "cache": cache,
            "context": context,
            "cross": cross,
            "enc_mask": enc_mask,
        }
        logp, mem, entries = self._run("decoder_step", feeds)
        return logp, mem, entries


# --------------------------------------------------------------------------- torch


class TorchBackend(_NamedGraphs):
    """The graphs as PyTorch modules (eager, or ``torch.compile`` when ``compile``).

    ``compile_parts`` limits compiling to some graphs (None: all; the decoder step alone
    compiles in a fraction of the time) and ``compile_mode`` is ``torch.compile``'s ``mode``
    (``"reduce-overhead"`` adds CUDA graphs on a GPU).
    """

    name = TORCH

    def __init__(
        self,
        model: D2RNet,
        *,
        device: str = "cpu",
        compile: bool = False,
        compile_parts: Collection[str] | None = None,
        compile_mode: str | None = None,
    ) -> None:
        from model.export import DecoderStepGraph, DetectorGraph, VisualGraph

        self.device = torch.device(device)
        model = model.to(self.device).eval()
        graphs: dict[str, nn.Module] = {
            "detector": DetectorGraph(model),
            "visual": VisualGraph(model),
            "decoder_step": DecoderStepGraph(model),
        }
        parts = set(graphs if compile_parts is None else compile_parts)
        if parts - set(graphs):
            raise ValueError(f"compile_parts: unknown graph(s) {sorted(parts - set(graphs))}")
        self.compiled: tuple[str, ...] = tuple(p for p in graphs if compile and p in parts)
        for part in self.compiled:
            compiled = torch.compile(graphs[part], dynamic=True, mode=compile_mode)
            graphs[part] = cast(nn.Module, compiled)
        self._graphs = graphs

    def _run(self, part: str, feeds: Mapping[str, Tensor]) -> list[Tensor]:
        # the graphs' forward arguments carry the exported input names
        return list(self._graphs[part](**feeds))


# --------------------------------------------------------------------------- onnxruntime


def _cuda_index(device: torch.device) -> int:
    return 0 if device.index is None else int(device.index)


class OnnxRuntimeBackend(_NamedGraphs):
    """The graphs of an ONNX export directory (``d2r export-onnx``) in ONNX Runtime.

    Parameters
    ----------
    export_dir : Path
        Holds ``export.json`` and the three ``.onnx`` + ``.onnx.data`` files.
    checkpoint_sha256 : str
        Hash of the loaded checkpoint; an export of another checkpoint is refused.
    device : str
        ``cpu`` (CPU execution provider, no spin-waiting) or ``cuda[:N]`` (CUDA provider).
    threads : int or None
        Intra-op threads of the CPU provider for every graph (None: as many as torch is set
        to use when the backend starts).
    host_threads : int or None
        torch intra-op threads for the host side (preprocessing, NMS, beam search) once this
        backend runs the graphs, set process-wide (None: leave torch's setting alone). Default
        1: the host side then works on small tensors, and torch's spinning OpenMP pool beside
        ONNX Runtime's pools made it several times slower on a 2-core machine.
    setting : str
        The setting that chose this backend, named in errors.
    """

    name = ONNXRUNTIME

    # Longer than a screen: the onnxruntime session options, providers and the export's checks, in
    # the order the session needs them
    def __init__(
        self,
        export_dir: Path,
        *,
        checkpoint_sha256: str,
        device: str = "cpu",
        threads: int | None = None,
        host_threads: int | None = 1,
        setting: str = "D2R_BACKEND",
    ) -> None:
        from model.export import PARTS, ExportError, read_export

        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError(f"{setting}=onnxruntime: onnxruntime is not installed ({e})") from e
        self.device = torch.device(device)
        try:
            info = read_export(Path(export_dir))
        except ExportError as e:
            raise BackendError(f"{setting}=onnxruntime: {e}") from e
        found = str(info.get("checkpoint_sha256"))
        if found != checkpoint_sha256:
            raise EngineMismatchError(
                f"{setting}=onnxruntime: {export_dir} was exported from checkpoint "
                f"{found[:12]}, the loaded checkpoint is {checkpoint_sha256[:12]}; "
                "re-export it with d2r export-onnx"
            )
        options: dict[str, Any] = {}
        providers: list[Any]
        if self.device.type == "cpu":
            dense_threads = threads if threads is not None else torch.get_num_threads()
            for part in PARTS:
                opts = ort.SessionOptions()
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
                opts.intra_op_num_threads = dense_threads
                opts.inter_op_num_threads = 1
                options[part] = opts
            providers = ["CPUExecutionProvider"]
        elif self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError(
                    f"{setting}=onnxruntime on {device}: this onnxruntime has no "
                    "CUDAExecutionProvider (install onnxruntime-gpu)"
                )
            providers = [("CUDAExecutionProvider", {"device_id": _cuda_index(self.device)})]
            options = {part: ort.SessionOptions() for part in PARTS}
        else:
            raise BackendError(f"{setting}=onnxruntime: unsupported device {device!r}")
        self._sessions: dict[str, Any] = {}
        for part in PARTS:
            path = Path(export_dir) / info["graphs"][part]["file"]
            session = ort.InferenceSession(str(path), options[part], providers=providers)
            wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
            if session.get_providers()[0] != wanted:
                raise BackendError(
                    f"{setting}=onnxruntime: {part} runs on {session.get_providers()[0]}, "
                    f"not {wanted}"
                )
            self._sessions[part] = session
        self.export_info = info
        if self.device.type == "cpu" and host_threads is not None:
            torch.set_num_threads(host_threads)
        logger.info(
            "onnxruntime %s backend ready (export of checkpoint %s)",
            providers[0] if isinstance(providers[0], str) else providers[0][0],
            found[:12],
        )

    def _run(self, part: str, feeds: Mapping[str, Tensor]) -> list[Tensor]:
        arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in feeds.items()}
        outputs = self._sessions[part].run(None, arrays)
        return [torch.from_numpy(np.asarray(o)).to(self.device) for o in outputs]


# --------------------------------------------------------------------------- TensorRT manifest


@dataclass(frozen=True)
class RuntimeInfo:
    """What an engine is bound to: the GPU, its compute capability and TensorRT."""

    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "9.0"
    tensorrt_version: str


@dataclass(frozen=True)
class EngineManifest:
    """``manifest.json`` of an engine directory (written by ``d2r build-engine``).

    ``profiles`` maps graph -> input -> ``{"min", "opt", "max"}`` shapes; ``engines``
    maps graph -> plan file name.
    """

    checkpoint_sha256: str
    tensorrt_version: str
    cuda_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    max_batch: int
    profiles: dict[str, dict[str, dict[str, list[int]]]]
    engines: dict[str, str]
    created: str
    build_seconds: float = 0.0
    format: str = MANIFEST_FORMAT

    def __post_init__(self) -> None:
        if self.format != MANIFEST_FORMAT:
            raise ValueError(f"format: expected {MANIFEST_FORMAT!r}, got {self.format!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch: must be at least 1, got {self.max_batch}")
        for part, inputs in self.profiles.items():
            for name, shapes in inputs.items():
                lo, opt, hi = shapes["min"], shapes["opt"], shapes["max"]
                if not len(lo) == len(opt) == len(hi) or any(
                    not a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)
                ):
                    raise ValueError(f"profiles.{part}.{name}: need min <= opt <= max")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> EngineManifest:
        """Parse a decoded ``manifest.json``; ``ValueError`` names the field."""
        if not isinstance(data, dict):
            raise ValueError("manifest: expected a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{missing[0]}: missing")
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown field")
        try:
            return cls(**data)
        except (TypeError, KeyError) as e:
            raise ValueError(f"manifest: {e}") from e

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> EngineManifest:
        """Read ``manifest.json`` from an engine directory (``BackendError`` if unusable)."""
        path = Path(directory) / MANIFEST_FILE
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise BackendError(f"{path}: missing (not a TensorRT engine directory)") from None
        except (OSError, ValueError) as e:
            raise BackendError(f"{path}: {e}") from e


def manifest_mismatches(
    manifest: EngineManifest, *, checkpoint_sha256: str, runtime: RuntimeInfo
) -> list[str]:
    """What differs between an engine's manifest and this process (empty: usable)."""
    problems = []
    if manifest.checkpoint_sha256 != checkpoint_sha256:
        problems.append(
            f"checkpoint {manifest.checkpoint_sha256[:12]} != loaded {checkpoint_sha256[:12]}"
        )
    if manifest.gpu_name != runtime.gpu_name:
        problems.append(f"GPU {manifest.gpu_name!r} != {runtime.gpu_name!r}")
    if manifest.compute_capability != runtime.compute_capability:
        problems.append(
            f"compute capability {manifest.compute_capability} != {runtime.compute_capability}"
        )
    if manifest.tensorrt_version != runtime.tensorrt_version:
        problems.append(f"TensorRT {manifest.tensorrt_version} != {runtime.tensorrt_version}")
    return problems


def check_manifest(
    manifest: EngineManifest,
    *,
    checkpoint_sha256: str,
    runtime: RuntimeInfo,
    setting: str = "D2R_BACKEND",
) -> None:
    """Raise :class:`EngineMismatchError` (one line) unless the engine fits this process."""
    problems = manifest_mismatches(manifest, checkpoint_sha256=checkpoint_sha256, runtime=runtime)
    if problems:
        raise EngineMismatchError(
            f"{setting}=tensorrt: engine does not match ({'; '.join(problems)}); "
            "rebuild it on this machine with d2r build-engine"
        )


def cuda_runtime_info(trt: Any, device: torch.device) -> RuntimeInfo:
    """The running GPU and TensorRT, as recorded in a manifest."""
    major, minor = torch.cuda.get_device_capability(device)
    return RuntimeInfo(
        gpu_name=torch.cuda.get_device_name(device),
        compute_capability=f"{major}.{minor}",
        tensorrt_version=str(trt.__version__),
    )


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- TensorRT runtime


def _import_tensorrt(setting: str) -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise BackendError(
            f"{setting}=tensorrt: the tensorrt package is not importable ({e})"
        ) from e
    return tensorrt


_TRT_DTYPES = (
    ("float32", torch.float32),
    ("float16", torch.float16),
    ("bfloat16", torch.bfloat16),
    ("int32", torch.int32),
    ("int64", torch.int64),
    ("bool", torch.bool),
    ("int8", torch.int8),
    ("uint8", torch.uint8),
)


def _dtype_table(trt: Any) -> dict[Any, torch.dtype]:
    """TensorRT data types -> torch; types this TensorRT lacks (int64 before 10) are left out."""
    return {getattr(trt, name): dtype for name, dtype in _TRT_DTYPES if hasattr(trt, name)}


#: TensorRT binds every I/O tensor at a non-null device address aligned to this many bytes
TRT_ALIGNMENT = 256


def _aligned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor whose data starts at a :data:`TRT_ALIGNMENT`-aligned address."""
    size = torch.Size(shape)
    item = dtype.itemsize
    buf = torch.empty(size.numel() + TRT_ALIGNMENT // item, dtype=dtype, device=device)
    start = (-buf.data_ptr() % TRT_ALIGNMENT) // item
    return buf[start : start + size.numel()].view(size)


def _bindable(t: Tensor) -> Tensor:
    """``t`` if TensorRT can bind it as it is (contiguous and aligned, or empty), else an
    aligned copy."""
    if t.numel() == 0 or (t.is_contiguous() and t.data_ptr() % TRT_ALIGNMENT == 0):
        return t
    return _aligned_empty(tuple(t.shape), t.dtype, t.device).copy_(t)


class _Engine:
    """One deserialised plan with its execution context and its own CUDA stream."""

    def __init__(self, trt: Any, runtime: Any, path: Path, device: torch.device) -> None:
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(f"{path}: TensorRT could not deserialise this plan")
        self.engine, self.device, self.name = engine, device, path.name
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) != mode]
        table = _dtype_table(trt)
        self.dtypes = {}
        for n in names:
            found = engine.get_tensor_dtype(n)
            if found not in table:
                raise BackendError(f"{path}: tensor {n} has unsupported data type {found}")
            self.dtypes[n] = table[found]
        # enqueueing on the default stream makes TensorRT synchronise the whole device
        self._stream: torch.cuda.Stream | None = None
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        # an empty tensor (the decoder's cache at the first step) has no address of its
        # own, and TensorRT wants a non-null one for every input and output
        self._placeholder = _aligned_empty((TRT_ALIGNMENT,), torch.uint8, device)

    def _bind(self, name: str, t: Tensor) -> None:
        address = t.data_ptr() if t.numel() else self._placeholder.data_ptr()
        if not self.context.set_tensor_address(name, address):
            raise ModelError(f"{self.name}: TensorRT refused the address of {name}")

    def __call__(self, feeds: Mapping[str, Tensor]) -> list[Tensor]:
        keep = []  # inputs stay alive until the engine has run
        for name in self.inputs:
            t = _bindable(feeds[name].to(self.device, self.dtypes[name]))
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ModelError(
                    f"{self.name}: input {name} of shape {tuple(t.shape)} is outside the "
                    "engine's optimisation profile (rebuild with a larger --max-batch)"
                )
            self._bind(name, t)
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ModelError(f"{self.name}: output {name} has an unresolved shape {shape}")
            out = _aligned_empty(shape, self.dtypes[name], self.device)
            self._bind(name, out)
            outs.append(out)
        if self._stream is None:  # only a stand-in runtime runs on the CPU
            ran = self.context.execute_async_v3(0)
        else:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            ran = self.context.execute_async_v3(self._stream.cuda_stream)
            self._stream.synchronize()
        if not ran:
            raise ModelError(f"{self.name}: TensorRT execution failed")
        return [o.float() if o.dtype == torch.float16 else o for o in outs]


class TensorRTBackend(_NamedGraphs):
    """Serialised TensorRT plans (``d2r build-engine``) checked against ``manifest.json``.

    Refuses to start unless the manifest names the loaded checkpoint, this GPU (name and
    compute capability) and this TensorRT version. Never builds an engine.
    """

    name = TENSORRT

    def __init__(
        self,
        engine_dir: Path,
        *,
        checkpoint_sha256: str,
        device: str = "cuda",
        setting: str = "D2R_BACKEND",
    ) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise BackendError(f"{setting}=tensorrt needs a CUDA device, got {device!r}")
        trt = _import_tensorrt(setting)
        if not torch.cuda.is_available():
            raise BackendError(f"{setting}=tensorrt: CUDA is not available to PyTorch")
        manifest = EngineManifest.read(Path(engine_dir))
        check_manifest(
            manifest,
            checkpoint_sha256=checkpoint_sha256,
            runtime=cuda_runtime_info(trt, self.device),
            setting=setting,
        )
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self._engines = {
            part: _Engine(trt, runtime, Path(engine_dir) / plan, self.device)
            for part, plan in manifest.engines.items()
        }
        self.manifest = manifest
        self.max_batch = manifest.max_batch  # the engines' optimisation profile
        logger.info(
            "tensorrt %s backend ready (%s, checkpoint %s)",
            manifest.precision,
            manifest.gpu_name,
            manifest.checkpoint_sha256[:12],
        )

    def _run(self, part: str, feeds: Mapping[str, Tensor]) -> list[Tensor]:
        return self._engines[part](feeds)


# --------------------------------------------------------------------------- selection


def create_backend(
    name: str,
    model: D2RNet,
    *,
    checkpoint_sha256: str,
    device: str = "cpu",
    engine_dir: Path | None = None,
    torch_compile: bool = False,
    setting: str = "D2R_BACKEND",
    engine_setting: str = "D2R_ENGINE_DIR",
) -> InferenceBackend:
    """The backend called ``name``; :class:`BackendError` naming ``setting`` otherwise.

    ``onnxruntime`` needs ``engine_dir`` (an ONNX export directory) and ``tensorrt`` an
    engine directory; both must come from the checkpoint whose hash is given.
    """
    if name not in BACKEND_NAMES:
        raise BackendError(
            f"{setting}: unknown backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}"
        )
    if torch_compile and name != TORCH:
        raise BackendError(f"{setting}={name}: torch.compile applies only to the torch backend")
    if name == TORCH:
        return TorchBackend(model, device=device, compile=torch_compile)
    if engine_dir is None:
        kind = "an ONNX export" if name == ONNXRUNTIME else "a TensorRT engine"
        raise BackendError(f"{setting}={name} needs {kind} directory: set {engine_setting}")
    if not Path(engine_dir).is_dir():
        raise BackendError(f"{engine_setting}: {engine_dir} is not a directory")
    if name == ONNXRUNTIME:
        return OnnxRuntimeBackend(
            Path(engine_dir), checkpoint_sha256=checkpoint_sha256, device=device, setting=setting
        )
    return TensorRTBackend(
        Path(engine_dir), checkpoint_sha256=checkpoint_sha256, device=device, setting=setting
    )


__all__ = [
    "BACKEND_NAMES",
    "MANIFEST_FILE",
    "BackendError",
    "EngineManifest",
    "EngineMismatchError",
    "InferenceBackend",
    "OnnxRuntimeBackend",
    "RuntimeInfo",
    "TensorRTBackend",
    "TorchBackend",
    "check_manifest",
    "create_backend",
    "manifest_mismatches",
    "run_graphs",
]
