"""INT8 entropy calibration over a folder of DICOM files.

Images go through :class:`model.preprocess.Preprocessor` (the serving preprocessing) and are
grouped into fixed-size batches; an incomplete last batch is dropped, because TensorRT
calibrates with one batch size. The calibrator class derives from TensorRT's
``IInt8EntropyCalibrator2``, looked up on the ``trt`` module passed in, so the batching and
caching logic is testable without TensorRT.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from trt_build.errors import CalibrationError

logger = logging.getLogger(__name__)

Array = npt.NDArray[Any]
#: graph inputs that calibration feeds (other graphs build without INT8 calibration)
CALIBRATED_PARTS = ("detector", "visual")


def find_dicom_files(folder: Path) -> list[Path]:
    """DICOM files under ``folder`` (recursive; by the ``DICM`` preamble), sorted."""
    found = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                head = f.read(132)
            if head[128:132] == b"DICM":
                found.append(path)
    return found


def load_images(files: Sequence[Path], image_size: int) -> list[Array]:
    """Preprocess each file to a ``(1,S,S)`` float32 array; undecodable files are skipped."""
    import pydicom

    from model.errors import PreprocessError
    from model.preprocess import Preprocessor

    pre = Preprocessor(image_size)
    images = []
    for path in files:
        try:
            pixels, _ = pre(pydicom.dcmread(path))
        except (PreprocessError, OSError, ValueError) as e:
            logger.warning("calibration: skipped %s (%s)", path.name, e)
            continue
        images.append(pixels.numpy().astype(np.float32))
    return images


def calibration_batches(images: Sequence[Array], batch_size: int) -> list[Array]:
    """Stack images into ``(batch_size,1,S,S)`` batches; the incomplete tail is dropped."""
    if batch_size < 1:
        raise CalibrationError(f"batch size must be at least 1, got {batch_size}")
    if len(images) < batch_size:
        raise CalibrationError(
            f"{len(images)} usable calibration image(s), need at least one batch of {batch_size}"
        )
    full = len(images) // batch_size * batch_size
    return [np.stack(images[i : i + batch_size]) for i in range(0, full, batch_size)]


BoxesFn = Callable[[Array], tuple[Array, Array, Array]]


def part_feeds(part: str, batch: Array, boxes_fn: BoxesFn | None = None) -> dict[str, Array]:
    """Inputs of ``part`` for one image batch (``visual`` also needs generator boxes)."""
    if part == "detector":
        return {"image": batch}
    if part == "visual":
        if boxes_fn is None:
            raise CalibrationError("visual calibration needs the generator boxes")
        boxes, mask, scores = boxes_fn(batch)
        return {
            "image": batch,
            "boxes": boxes.astype(np.float32),
            "box_mask": mask.astype(bool),
            "box_scores": scores.astype(np.float32),
        }
    raise CalibrationError(f"{part}: not calibrated (only {', '.join(CALIBRATED_PARTS)})")


class CalibrationStream:
    """Iterates the feeds of one graph batch by batch, copying them to device buffers.

    ``to_device`` turns an array into an object with ``data_ptr()`` (a CUDA tensor in a real
    build); references are kept until the next batch, as TensorRT reads them asynchronously.
    """

    def __init__(
        self,
        part: str,
        batches: Sequence[Array],
        to_device: Callable[[Array], Any],
        boxes_fn: BoxesFn | None = None,
    ) -> None:
        if not batches:
            raise CalibrationError("no calibration batches")
        self.part = part
        self.batch_size = int(batches[0].shape[0])
        self._batches: Iterator[Array] = iter(batches)
        self._to_device = to_device
        self._boxes_fn = boxes_fn
        self._held: dict[str, Any] = {}
        self.served = 0

    def next_pointers(self, names: Sequence[str]) -> list[int] | None:
        """Device pointers for ``names`` of the next batch, or None when exhausted."""
        batch = next(self._batches, None)
        if batch is None:
            self._held = {}
            return None
        feeds: Mapping[str, Array] = part_feeds(self.part, batch, self._boxes_fn)
        missing = [n for n in names if n not in feeds]
        if missing:
            raise CalibrationError(f"{self.part}: calibration has no input {missing[0]!r}")
        self._held = {n: self._to_device(feeds[n]) for n in names}
        self.served += 1
        return [int(self._held[n].data_ptr()) for n in names]


def make_calibrator(trt: Any, stream: CalibrationStream, cache_file: Path) -> Any:
    """An ``IInt8EntropyCalibrator2`` over ``stream``, caching its table in ``cache_file``."""
    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        raise CalibrationError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no IInt8EntropyCalibrator2: "
            "implicit INT8 calibration is unavailable; quantise the ONNX graph explicitly"
        )

    class EntropyCalibrator(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.stream = stream
            self.cache_file = Path(cache_file)

        def get_batch_size(self) -> int:
            return stream.batch_size

        def get_batch(self, names: Sequence[str]) -> list[int] | None:
            return stream.next_pointers(names)

        def read_calibration_cache(self) -> bytes | None:
            return self.cache_file.read_bytes() if self.cache_file.is_file() else None

        def write_calibration_cache(self, cache: bytes) -> None:
            self.cache_file.write_bytes(bytes(cache))

    return EntropyCalibrator()


__all__ = [
    "CALIBRATED_PARTS",
    "CalibrationStream",
    "calibration_batches",
    "find_dicom_files",
    "load_images",
    "make_calibrator",
    "part_feeds",
]
