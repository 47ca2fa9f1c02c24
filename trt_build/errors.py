"""Exceptions raised by :mod:`trt_build`.

::

    TrtBuildError
    ├── TensorRTUnavailable   the tensorrt package or CUDA is missing on this machine
    ├── ProfileError          an input dimension the optimisation profiles cannot cover
    ├── CalibrationError      no usable calibration images, or no INT8 calibrator API
    └── EngineBuildError      the ONNX parser or the builder failed (names the graph)
"""

from __future__ import annotations

from d2r_core.errors import D2RError


class TrtBuildError(D2RError):
    """Base class of every error raised by :mod:`trt_build`."""


class TensorRTUnavailable(TrtBuildError):
    """``import tensorrt`` failed or no CUDA device is visible."""


class ProfileError(TrtBuildError, ValueError):
    """A dynamic dimension is unknown or a batch limit is out of range."""


class CalibrationError(TrtBuildError):
    """The calibration folder holds no usable image, or INT8 calibration is unsupported."""


class EngineBuildError(TrtBuildError):
    """Parsing or building one graph failed."""


__all__ = [
    "CalibrationError",
    "EngineBuildError",
    "ProfileError",
    "TensorRTUnavailable",
    "TrtBuildError",
]
