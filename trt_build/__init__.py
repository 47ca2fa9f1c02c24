"""Offline TensorRT engine builder: checkpoint -> ONNX -> TensorRT plans + ``manifest.json``.

Runs on the target GPU (``d2r build-engine``); the serving side only loads the result
(:class:`model.backends.TensorRTBackend`). ``tensorrt`` is imported lazily, so every module
here imports on machines without it.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
