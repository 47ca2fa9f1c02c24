"""A stand-in for the parts of the ``tensorrt`` API that d2r's engine build and TensorRT
backend use.

For unit tests on machines without TensorRT or a GPU. The stand-in builder parses an exported
ONNX graph with ``onnx`` and checks the optimisation profile against the graph's inputs. It
drives an INT8 calibrator as TensorRT does, and keeps a timing cache. Its "plan" holds the
graph's path.

The stand-in engine reports that graph's inputs and outputs (names, data types, modes), as an
engine parsed from it would, and runs it with onnxruntime on the CPU. It reads the inputs from
the raw addresses it was given, at execution time, and writes the outputs to theirs.

Like TensorRT, it refuses:
- profiles that leave a dynamic input out or contradict the graph's fixed dimensions;
- shapes that contradict the graph's fixed dimensions;
- null or misaligned addresses;
- running before every tensor has an address.
"""

from __future__ import annotations

import builtins
import ctypes
import enum
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

__version__ = "10.0.0.standin"
ALIGNMENT = 256
#: why the last build returned no plan (TensorRT writes these to its logger)
BUILD_ERRORS: list[str] = []


class DataType(enum.Enum):
    FLOAT = "tensor(float)"
    HALF = "tensor(float16)"
    INT32 = "tensor(int32)"
    INT64 = "tensor(int64)"
    BOOL = "tensor(bool)"
    INT8 = "tensor(int8)"


float32, float16, int32 = DataType.FLOAT, DataType.HALF, DataType.INT32
int64, bool, int8 = DataType.INT64, DataType.BOOL, DataType.INT8  # noqa: A001 (tensorrt's names)
NUMPY = {
    DataType.FLOAT: np.float32,
    DataType.HALF: np.float16,
    DataType.INT32: np.int32,
    DataType.INT64: np.int64,
    DataType.BOOL: np.bool_,
    DataType.INT8: np.int8,
}


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class Logger:
    WARNING = 2

    def __init__(self, severity: int = WARNING) -> None:
        self.severity = severity


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
        path = Path(plan.decode())
        return Engine(path) if path.is_file() else None


class Engine:
    def __init__(self, onnx_path: Path) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), opts, ["CPUExecutionProvider"])
        self.io: dict[str, tuple[TensorIOMode, DataType, list[Any]]] = {}
        for mode, values in (
            (TensorIOMode.INPUT, self.session.get_inputs()),
            (TensorIOMode.OUTPUT, self.session.get_outputs()),
        ):
            for v in values:
                self.io[v.name] = (mode, DataType(v.type), list(v.shape))
        self.names = list(self.io)

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.io[name][0]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.io[name][1]

    def create_execution_context(self) -> Context:
        return Context(self)


def _view(address: int, shape: tuple[int, ...], dtype: DataType) -> np.ndarray:
    """The host memory at ``address`` as an array (no copy)."""
    np_dtype = np.dtype(NUMPY[dtype])
    nbytes = int(np.prod(shape)) * np_dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, np_dtype)
    raw = (ctypes.c_uint8 * nbytes).from_address(address)
    return np.frombuffer(memoryview(raw).cast("B"), dtype=np_dtype).reshape(shape)


class Context:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self._outputs: dict[str, np.ndarray] | None = None
        self.runs = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> builtins.bool:
        mode, _, dims = self.engine.io[name]
        if mode is not TensorIOMode.INPUT or len(shape) != len(dims):
            return False
        if any(isinstance(d, int) and d != s for d, s in zip(dims, shape, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        self._outputs = None
        return True

    def set_tensor_address(self, name: str, address: int) -> builtins.bool:
        if name not in self.engine.io or address == 0 or address % ALIGNMENT:
            return False
        self.addresses[name] = address
        return True

    def _inputs(self) -> dict[str, np.ndarray]:
        out = {}
        for name, (mode, dtype, _) in self.engine.io.items():
            if mode is TensorIOMode.INPUT:
                out[name] = _view(self.addresses[name], self.shapes[name], dtype).copy()
        return out

    def _run(self) -> dict[str, np.ndarray]:
        names = [n for n, io in self.engine.io.items() if io[0] is TensorIOMode.OUTPUT]
        return dict(zip(names, self.engine.session.run(names, self._inputs()), strict=True))

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.engine.io[name][0] is TensorIOMode.INPUT:
            return self.shapes[name]
        # the output shapes follow from the input shapes; running once is the simple way
        if self._outputs is None:
            self._outputs = self._run()
        return tuple(self._outputs[name].shape)

    def execute_async_v3(self, stream: int) -> builtins.bool:
        if set(self.addresses) != set(self.engine.io):
            return False
        outputs = self._run()  # reads the inputs' memory now, as the engine would
        for name, value in outputs.items():
            _view(self.addresses[name], value.shape, self.engine.io[name][1])[...] = value
        self.runs += 1
        return True


# --------------------------------------------------------------------------- builder


class NetworkDefinitionCreationFlag(enum.Enum):
    STRONGLY_TYPED = 1  # TensorRT 10 has no EXPLICIT_BATCH: every network is explicit-batch


class BuilderFlag(enum.Enum):
    FP16 = 0
    INT8 = 1


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class IInt8EntropyCalibrator2:
    """Base class of INT8 calibrators (the builder calls the subclass's methods)."""


class Network:
    def __init__(self) -> None:
        self.inputs: dict[str, list[int]] = {}  # -1 marks a dynamic dimension
        self.path: Path | None = None


class OnnxParser:
    def __init__(self, network: Network, logger: Logger) -> None:
        self.network = network
        self.errors: list[str] = []

    def parse_from_file(self, path: str) -> builtins.bool:
        try:  # loads the weights beside the graph too (``.onnx.data``), as TensorRT does
            model = onnx.load(path)
        except Exception as e:
            self.errors.append(f"{type(e).__name__}: {e}")
            return False
        for value in model.graph.input:
            dims = value.type.tensor_type.shape.dim
            self.network.inputs[value.name] = [
                d.dim_value if d.HasField("dim_value") else -1 for d in dims
            ]
        self.network.path = Path(path).resolve()
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> str:
        return self.errors[index]


class OptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class TimingCache:
    def __init__(self, data: bytes) -> None:
        self.entries = data.decode().split()

    def serialize(self) -> bytes:
        return " ".join(self.entries).encode()


class BuilderConfig:
    def __init__(self) -> None:
        self.flags: set[BuilderFlag] = set()
        self.profiles: list[OptimizationProfile] = []
        self.pools: dict[MemoryPoolType, int] = {}
        self.int8_calibrator: Any = None
        self.calibration_profile: OptimizationProfile | None = None
        self.timing_cache: TimingCache | None = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.pools[pool] = size

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def add_optimization_profile(self, profile: OptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_calibration_profile(self, profile: OptimizationProfile) -> builtins.bool:
        self.calibration_profile = profile
        return True

    def create_timing_cache(self, data: bytes) -> TimingCache:
        return TimingCache(bytes(data))

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: builtins.bool) -> builtins.bool:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> TimingCache | None:
        return self.timing_cache


def _profile_problems(network: Network, profiles: list[OptimizationProfile]) -> list[str]:
    if len(profiles) != 1:
        return [f"expected one optimisation profile, got {len(profiles)}"]
    shapes = profiles[0].shapes
    problems = [f"{n}: not a network input" for n in shapes if n not in network.inputs]
    for name, dims in network.inputs.items():
        if name not in shapes:
            if -1 in dims:
                problems.append(f"{name}: dynamic input without a profile shape")
            continue
        lo, opt, hi = shapes[name]
        if not len(lo) == len(opt) == len(hi) == len(dims):
            problems.append(f"{name}: profile rank {len(lo)}, network rank {len(dims)}")
            continue
        for i, (d, a, b, c) in enumerate(zip(dims, lo, opt, hi, strict=True)):
            if not a <= b <= c or a < 0 or (d != -1 and not a == b == c == d):
                problems.append(f"{name}: dimension {i} is {d}, profile {a}/{b}/{c}")
    return problems


def _calibrate(network: Network, config: BuilderConfig) -> None:
    """Feed the calibrator as TensorRT does: its cache first, else batches until None."""
    calibrator = config.int8_calibrator
    if calibrator.read_calibration_cache():
        return
    batches = 0
    while calibrator.get_batch(list(network.inputs)) is not None:
        batches += 1
    calibrator.write_calibration_cache(f"standin {batches} batches".encode())


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> Network:
        return Network()

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig()

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile()

    def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
        BUILD_ERRORS[:] = _profile_problems(network, config.profiles)
        if BUILD_ERRORS or network.path is None:
            return None
        if BuilderFlag.INT8 in config.flags:
            _calibrate(network, config)
        if config.timing_cache is not None:
            config.timing_cache.entries.append(network.path.name)
        return str(network.path).encode()
