"""A stand-in for the part of the ``tensorrt`` runtime API that d2r's TensorRT backend uses.

For unit tests on machines without TensorRT or a GPU. A "plan" here is a file holding the path
of one exported ONNX graph. The stand-in engine reports that graph's inputs and outputs (names,
data types, modes), as an engine parsed from it would, and runs it with onnxruntime on the CPU.
It reads the inputs from the raw addresses it was given, at execution time, and writes the
outputs to theirs.

Like TensorRT, it refuses:
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
import onnxruntime as ort

__version__ = "0.standin"
ALIGNMENT = 256


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
