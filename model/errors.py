"""Exceptions raised by the :mod:`model` package.

::

    ModelError
    ├── ModelConfigError     invalid ModelConfig field (names the field)
    ├── CheckpointError      missing/corrupt checkpoint file or field (names it)
    │   └── GateMissingError no input-gate statistics while the gate is on
    ├── TokenizerError       invalid vocabulary file or token ids
    ├── PreprocessError      pixel data that cannot be decoded or is unsupported
    ├── ExportError          an ONNX export directory is incomplete, invalid or of another model
    └── BackendError         an inference backend cannot start (names the setting)
        └── EngineMismatchError  export/engine made for another checkpoint, GPU or TensorRT
"""

from __future__ import annotations

from d2r_core.errors import D2RError


class ModelError(D2RError):
    """Base class of every error raised by :mod:`model`."""


class ModelConfigError(ModelError, ValueError):
    """A :class:`model.config.ModelConfig` field has a wrong type or value."""


class CheckpointError(ModelError):
    """A checkpoint directory is missing a file or holds an invalid value."""


class GateMissingError(CheckpointError):
    """The input gate is on and the checkpoint has no statistics (names the setting)."""


class TokenizerError(ModelError):
    """A vocabulary is invalid or token ids cannot be decoded."""


class PreprocessError(ModelError):
    """Pixel data cannot be decoded or its format is unsupported."""


class ExportError(ModelError):
    """An export directory is missing a file, fails ``onnx.checker`` or names another model."""


class BackendError(ModelError):
    """A backend cannot start; the message begins with the setting that chose it."""


class EngineMismatchError(BackendError):
    """An export or engine directory was made for another checkpoint, GPU or TensorRT."""


__all__ = [
    "BackendError",
    "CheckpointError",
    "ModelConfigError",
    "EngineMismatchError",
    "ExportError",
    "GateMissingError",
    "ModelError",
    "PreprocessError",
    "TokenizerError",
]
