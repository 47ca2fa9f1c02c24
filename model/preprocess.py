"""DICOM pixels -> model input, the one preprocessing path of training and serving.

Small callable transforms compose into :class:`Preprocessor`::

    Dataset --DicomToFloat--> ImageSample --ScaleToUnit--> --Letterbox(size)--> ImageSample

Every :class:`ImageSample` carries a :class:`BoxMapping` from source pixels to
its current frame, so detector boxes map back to source columns/rows exactly
(and training boxes forward). Coordinates are continuous: ``(0, 0)`` is the
top-left corner of the first pixel, ``(Columns, Rows)`` the bottom-right
corner of the last one. The model itself applies the mean/std normalisation
(first layer of the graph), so its input is the ``[0, 1]`` letterboxed image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
import pydicom
import torch
import torch.nn.functional as F
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from model.errors import PreprocessError

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class BoxMapping:
    """Affine map ``frame = source * scale + offset`` per axis, plus the source size.

    Parameters
    ----------
    source_rows, source_columns : int
        Size of the source image (pixels).
    scale_x, scale_y : float
        Frame pixels per source pixel along columns (x) and rows (y).
    offset_x, offset_y : float
        Position of the source origin in the frame (letterbox padding).
    """

    source_rows: int
    source_columns: int
    scale_x: float = 1.0
    scale_y: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0

    def then(self, scale_x: float, scale_y: float, offset_x: float, offset_y: float) -> BoxMapping:
        """Compose with a further affine step applied in the current frame."""
        return replace(
            self,
            scale_x=self.scale_x * scale_x,
            scale_y=self.scale_y * scale_y,
            offset_x=self.offset_x * scale_x + offset_x,
            offset_y=self.offset_y * scale_y + offset_y,
        )

    def _coeffs(self) -> tuple[FloatArray, FloatArray]:
        scale = np.array([self.scale_x, self.scale_y] * 2, dtype=np.float64)
        offset = np.array([self.offset_x, self.offset_y] * 2, dtype=np.float64)
        return scale, offset  # type: ignore[return-value]

    def to_frame(self, boxes: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Source ``(N, 4)`` xyxy boxes -> frame coordinates."""
        scale, offset = self._coeffs()
        return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale + offset

    def to_source(self, boxes: npt.ArrayLike, *, clip: bool = False) -> npt.NDArray[np.float64]:
        """Frame ``(N, 4)`` xyxy boxes -> source pixels, optionally clipped to the image."""
        scale, offset = self._coeffs()
        out = (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) - offset) / scale
        if clip:
            out[:, 0::2] = out[:, 0::2].clip(0.0, float(self.source_columns))
            out[:, 1::2] = out[:, 1::2].clip(0.0, float(self.source_rows))
        return out


@dataclass(frozen=True)
class ImageSample:
    """A single-channel float image and the mapping from its source frame."""

    pixels: FloatArray  # (rows, columns) float32
    mapping: BoxMapping
    sop_instance_uid: str = ""
    value_range: tuple[float, float] | None = None  # exact (min, max) of pixels, when known


class Transform(Protocol):
    """A preprocessing step: pure ``__call__`` plus the box mapping it applies."""

    def __call__(self, sample: ImageSample) -> ImageSample: ...


#: the most pixel data :class:`DicomToFloat` decodes; ``D2R_MAX_PIXEL_BYTES`` may not exceed it
MAX_PIXEL_BYTES: Final = 128 * 1024**2
#: colour photometric interpretations read as their luminance (colour scans of films)
COLOUR_PHOTOMETRICS: Final = ("RGB", "YBR_FULL", "YBR_FULL_422")
_BT601_LUMA: Final = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class DicomToFloat:
    """Decode pixels; apply the modality LUT, VOI LUT/window, MONOCHROME1 inversion (colour: luma).

    Parameters
    ----------
    apply_voi : bool
        Apply the dataset's VOI LUT or first window (default ``True``).
    frame : int
        Frame of a multi-frame image to use.
    max_pixel_bytes : int
        Refuse, before decoding, a header declaring more pixel data than this (Rows x Columns
        x frames x samples x Bits Allocated / 8): a hostile header (a "decompression bomb") must
        not make the decoder allocate gigabytes. Serving reads spooled files through
        :mod:`dicom_node.instance_file`, which refuses beyond ``D2R_MAX_PIXEL_BYTES`` (at most
        this default) before reading the pixels; this check guards every other caller.
    """

    apply_voi: bool = True
    frame: int = 0
    max_pixel_bytes: int = MAX_PIXEL_BYTES

    def _check_size(self, ds: pydicom.Dataset, uid: str) -> None:
        try:
            rows = int(ds.get("Rows", 0))
            columns = int(ds.get("Columns", 0))
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
            bits = int(ds.get("BitsAllocated", 16))
        except Exception as e:  # a lazily read value raises whatever its bytes make pydicom raise
            raise PreprocessError(f"unreadable image size (SOP Instance UID {uid})") from e
        if rows < 2 or columns < 2 or frames < 1 or samples < 1 or bits not in (1, 8, 16, 32):
            raise PreprocessError(
                f"implausible image header {rows}x{columns}, {frames} frame(s), "
                f"{bits} bits allocated (SOP Instance UID {uid})"
            )
        size = (rows * columns * frames * samples * bits + 7) // 8
        if size > self.max_pixel_bytes:
            raise PreprocessError(
                f"image of {rows}x{columns} x {frames} frame(s), {samples} sample(s) of {bits} "
                f"bits: {size} bytes of pixel data exceed the limit of {self.max_pixel_bytes} "
                f"bytes (SOP Instance UID {uid})"
            )

    def __call__(self, ds: pydicom.Dataset) -> ImageSample:
        uid = str(ds.get("SOPInstanceUID", ""))
        photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        if photometric not in ("MONOCHROME1", "MONOCHROME2", *COLOUR_PHOTOMETRICS):
            raise PreprocessError(
                f"PhotometricInterpretation {photometric or '(missing)'!r} is unsupported "
                f"(SOP Instance UID {uid}): expected MONOCHROME1, MONOCHROME2, RGB or YBR_FULL"
            )
        if "PixelData" not in ds:
            raise PreprocessError(f"no Pixel Data (SOP Instance UID {uid})")
        self._check_size(ds, uid)
        try:
            arr = ds.pixel_array
        except BaseException as e:  # decoder plugins raise many types, and a Rust one panics
            # (pyo3's PanicException derives from BaseException): both are a bad image
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
            raise PreprocessError(
                f"cannot decode pixel data (transfer syntax {tsuid}, SOP Instance UID {uid}): {e}"
            ) from e
        if photometric in COLOUR_PHOTOMETRICS:  # a colour scan of a film: its luminance
            return self._luminance(arr, uid)
        if arr.ndim == 3:
            if not 0 <= self.frame < arr.shape[0]:
                raise PreprocessError(f"frame {self.frame} out of range ({arr.shape[0]} frames)")
            arr = arr[self.frame]
        if arr.ndim != 2 or min(arr.shape) < 2:
            raise PreprocessError(
                f"unsupported pixel array shape {arr.shape} (SOP Instance UID {uid})"
            )
        rows, columns = arr.shape
        value_range = None
        if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
            pixels, value_range = self._integer_pixels(arr, ds, photometric)
        else:
            values = self._pointwise(arr, ds)
            if photometric == "MONOCHROME1":
                values = values.max() + values.min() - values
            pixels = values.astype(np.float32)
        return ImageSample(pixels, BoxMapping(int(rows), int(columns)), uid, value_range)

    def _luminance(self, arr: npt.NDArray[np.generic], uid: str) -> ImageSample:
        """ITU-R BT.601 luma of RGB pixels (pydicom returns YBR pixel data as RGB)."""
        if arr.ndim == 4:
            if not 0 <= self.frame < arr.shape[0]:
                raise PreprocessError(f"frame {self.frame} out of range ({arr.shape[0]} frames)")
            arr = arr[self.frame]
        if arr.ndim != 3 or arr.shape[-1] != 3 or min(arr.shape[:2]) < 2:
            raise PreprocessError(
                f"unsupported colour pixel array shape {arr.shape} (SOP Instance UID {uid})"
            )
        luma = np.asarray(arr, dtype=np.float32) @ np.array(_BT601_LUMA, dtype=np.float32)
        rows, columns = luma.shape
        return ImageSample(luma, BoxMapping(int(rows), int(columns)), uid, None)

    def _pointwise(self, arr: npt.NDArray[np.generic], ds: pydicom.Dataset) -> FloatArray:
        """Modality LUT, then VOI LUT/window: a per-value map, in float64."""
        # without a rescale the modality LUT keeps the stored integers, which is what a VOI
        # LUT Sequence indexes (pydicom warns on float input)
        values = apply_modality_lut(arr, ds)
        if "VOILUTSequence" in ds and values.dtype.kind == "f":
            # an identity rescale (slope 1, intercept 0) still returns floats; a VOI LUT
            # indexes stored integers, so give it integers when the values are whole
            whole = np.round(values)
            if np.array_equal(whole, values):
                values = whole.astype(np.int64)
        if self.apply_voi and ("VOILUTSequence" in ds or "WindowCenter" in ds):
            values = apply_voi_lut(values, ds, index=0)
        return np.asarray(values, dtype=np.float64)

    def _integer_pixels(
        self, arr: npt.NDArray[np.generic], ds: pydicom.Dataset, photometric: str
    ) -> tuple[FloatArray, tuple[float, float] | None]:
        """The same values as the float64 path, computed once per stored value.

        Every step is a function of the stored value alone, so it runs on the (at most
        65536) values up to the image's maximum and the pixels look the result up, instead
        of several float64 passes over a multi-megapixel radiograph. Returns the pixels and,
        when the map is monotonic (rescale and linear or sigmoid windows are), their exact
        range: the values of the image's lowest and highest stored value.
        """
        lo, hi = int(arr.min()), int(arr.max())
        # unsigned values index the table directly; signed ones are shifted to start at 0
        base = min(lo, 0)
        index = arr if base == 0 else np.subtract(arr, base, dtype=np.int32)
        table = self._pointwise(np.arange(base, hi + 1).astype(arr.dtype), ds)
        span = table[lo - base :]
        steps = np.diff(span)
        if bool((steps >= 0).all() or (steps <= 0).all()):
            t_min, t_max = sorted((float(span[0]), float(span[-1])))
        else:  # e.g. a VOI LUT that is not monotonic: the extremes of the values present
            present = table[np.bincount(index.ravel(), minlength=table.size) > 0]
            t_min, t_max = float(present.min()), float(present.max())
        if photometric == "MONOCHROME1":
            table = t_max + t_min - table
        pixels: FloatArray = table.astype(np.float32)[index]
        return pixels, (t_min, t_max)


@dataclass(frozen=True)
class ScaleToUnit:
    """Linear intensity scaling to ``[0, 1]`` between two percentiles (identity box map).

    Parameters
    ----------
    low_percentile, high_percentile : float
        Percentiles mapped to 0 and 1; values outside are clipped.
    """

    low_percentile: float = 0.0
    high_percentile: float = 100.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.low_percentile < self.high_percentile <= 100.0:
            raise ValueError("low_percentile/high_percentile: need 0 <= low < high <= 100")

    def __call__(self, sample: ImageSample, *, in_place: bool = False) -> ImageSample:
        """The scaled sample; with ``in_place`` a float32 ``sample.pixels`` is overwritten
        instead of copied (for a caller that owns the decoded sample: a full-size copy less)."""
        px = sample.pixels
        if self.low_percentile == 0.0 and self.high_percentile == 100.0:
            # what those percentiles are: the known range, or a pass for each, but no sort
            lo, hi = sample.value_range or (float(px.min()), float(px.max()))
        else:
            qs = [self.low_percentile, self.high_percentile]
            lo, hi = (float(v) for v in np.percentile(px, qs))
        if not np.isfinite([lo, hi]).all():
            raise PreprocessError("pixel values are not finite")
        if hi <= lo:
            return replace(sample, pixels=np.zeros_like(px, dtype=np.float32), value_range=None)
        own = in_place and px.dtype == np.float32 and px.flags.writeable
        out = np.subtract(px, np.float32(lo), dtype=np.float32, out=px if own else None)
        out *= np.float32(1.0 / (hi - lo))
        np.clip(out, 0.0, 1.0, out=out)
        return replace(sample, pixels=out, value_range=None)


@dataclass(frozen=True)
class Letterbox:
    """Aspect-preserving resize (antialiased bilinear) and centred zero padding to a square.

    Parameters
    ----------
    size : int
        Side of the output square.
    """

    size: int

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"size: must be > 0, got {self.size}")

    def geometry(self, rows: int, columns: int) -> tuple[int, int, int, int]:
        """``(new_rows, new_columns, pad_top, pad_left)`` for a source of that size."""
        factor = self.size / max(rows, columns)
        new_rows = min(self.size, max(1, round(rows * factor)))
        new_columns = min(self.size, max(1, round(columns * factor)))
        return new_rows, new_columns, (self.size - new_rows) // 2, (self.size - new_columns) // 2

    def __call__(self, sample: ImageSample) -> ImageSample:
        rows, columns = sample.pixels.shape
        new_rows, new_columns, top, left = self.geometry(rows, columns)
        src = torch.from_numpy(np.ascontiguousarray(sample.pixels))[None, None]
        resized = F.interpolate(
            src, size=(new_rows, new_columns), mode="bilinear", align_corners=False, antialias=True
        )[0, 0]
        out = np.zeros((self.size, self.size), dtype=np.float32)
        out[top : top + new_rows, left : left + new_columns] = resized.numpy()
        mapping = sample.mapping.then(
            new_columns / columns, new_rows / rows, float(left), float(top)
        )
        return replace(sample, pixels=out, mapping=mapping)


@dataclass(frozen=True)
class Preprocessor:
    """DICOM dataset -> ``(1, size, size)`` float tensor in ``[0, 1]`` and its box mapping.

    Parameters
    ----------
    size : int
        Model input size (``ModelConfig.image_size``).
    """

    size: int
    decode: DicomToFloat = DicomToFloat()
    intensity: ScaleToUnit = ScaleToUnit()

    def sample(self, ds: pydicom.Dataset) -> ImageSample:
        """Run every step and return the letterboxed sample."""
        return self.finish(self.decode(ds), in_place=True)

    def finish(self, decoded: ImageSample, *, in_place: bool = False) -> ImageSample:
        """The steps after decoding: intensity scaling (over ``decoded``'s pixels with
        ``in_place``) and letterbox."""
        return Letterbox(self.size)(self.intensity(decoded, in_place=in_place))

    def __call__(self, ds: pydicom.Dataset) -> tuple[torch.Tensor, BoxMapping]:
        s = self.sample(ds)
        return torch.from_numpy(s.pixels)[None], s.mapping


__all__ = [
    "BoxMapping",
    "DicomToFloat",
    "ImageSample",
    "Letterbox",
    "MAX_PIXEL_BYTES",
    "Preprocessor",
    "ScaleToUnit",
    "Transform",
]
