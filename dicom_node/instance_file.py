"""Read a stored instance (a Part 10 file in the spool) in bounded memory.

Every reader of a spooled or otherwise untrusted file goes through here:

* :func:`read_instance_header` returns the data set up to Pixel Data. A Deflated data set is
  inflated through a bounded decompressor only as far as the parser reads, at most
  :data:`MAX_HEADER_BYTES`.
* :func:`read_instance` returns the whole data set, after checking the pixel data its header
  declares (Rows x Columns x Number of Frames x Samples per Pixel x Bits Allocated) against a
  limit (``D2R_MAX_PIXEL_BYTES``, :attr:`dicom_node.settings.NodeSettings.max_pixel_bytes`),
  before any pixel byte is read or inflated; the inflation of a Deflated file is itself capped
  by that limit.

A few hundred kilobytes of Deflated zeros can declare gigabytes of pixels; pydicom's own reader
inflates a Deflated file whole before parsing it, so it is called here only on files in another
transfer syntax: for a header with ``stop_before_pixels`` and ``defer_size``, for a whole data set
once the file is known to be no larger than the limit plus a header (stored pixel data, native
or compressed, is never larger than the file).
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from os import PathLike
from pathlib import Path
from typing import Any, BinaryIO, Final

import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_node.errors import InstanceRejected, PixelDataTooLarge

__all__ = [
    "MAX_HEADER_BYTES",
    "check_pixel_data_size",
    "codestream_size",
    "declared_pixel_bytes",
    "read_instance",
    "read_instance_header",
]

logger = logging.getLogger(__name__)

#: the most a Deflated data set is inflated for the elements before Pixel Data (and for those
#: after it, on a full read): the header of a radiograph takes a few kilobytes
MAX_HEADER_BYTES: Final = 4 * 1024 * 1024
#: values longer than this are read when accessed, not while parsing (non-Deflated files)
_DEFER_SIZE: Final = 64 * 1024
_CHUNK: Final = 64 * 1024
_PIXEL_DATA_GROUP: Final = 0x7FE0
#: JPEG 2000 SOC and SIZ markers; SIZ gives Xsiz, Ysiz, XOsiz, YOsiz after Lsiz and Rsiz
_J2K_SOC_SIZ: Final = b"\xff\x4f\xff\x51"
#: JPEG (ISO/IEC 10918-1) SOF0-15 but DHT, JPG and DAC, and JPEG-LS SOF55: P, Y, X follow
_JPEG_SOF: Final = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})


class _BoundedInflater(io.RawIOBase):
    """A seekable, read-only view of a raw-deflated stream, inflated only as far as read.

    Inflating beyond ``limit`` bytes raises ``too_large``; the inflated bytes are kept, so the
    backward seeks the parser makes cost nothing.
    """

    def __init__(self, raw: BinaryIO, limit: int, too_large: type[InstanceRejected]) -> None:
        super().__init__()
        self._raw = raw
        self._limit = limit
        self._too_large = too_large
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._pos = 0
        self._pending = b""  # compressed input not yet inflated (max_length stopped)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def _fill(self, upto: int) -> None:
        """Inflate until ``upto`` bytes are held (or the stream ends)."""
        while len(self._buf) < upto and not self._inflater.eof:
            room = self._limit - len(self._buf)
            if room <= 0:
                raise self._too_large(f"inflated data set exceeds {self._limit} bytes")
            data = self._pending or self._raw.read(_CHUNK)
            out = self._inflater.decompress(data, min(room, max(upto - len(self._buf), _CHUNK)))
            self._pending = self._inflater.unconsumed_tail
            if not data and not out:
                return  # a truncated stream: the parser meets the end of the file
            self._buf += out

    def _fill_all(self) -> None:
        self._fill(self._limit + 1)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        else:
            self._fill_all()
            pos = len(self._buf) + offset
        self._pos = max(0, pos)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            self._fill_all()
            end = len(self._buf)
        else:
            end = self._pos + size
            self._fill(end)
        with memoryview(self._buf) as view:
            out = bytes(view[self._pos : end])
        self._pos += len(out)
        return out

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _before_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >> 16 == _PIXEL_DATA_GROUP


def _not_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >> 16 != 0x0002


def _open_part10(fp: BinaryIO) -> tuple[bytes | None, FileMetaDataset]:
    """Preamble and File Meta Information; ``fp`` is left at the start of the data set."""
    preamble = read_preamble(fp, False)
    meta = FileMetaDataset(
        read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_not_file_meta)
    )
    return preamble, meta


def _read_deflated(
    path: Path, *, limit: int, stop_before_pixels: bool, too_large: type[InstanceRejected]
) -> FileDataset:
    with path.open("rb") as fp:
        preamble, meta = _open_part10(fp)
        stream = _BoundedInflater(fp, limit, too_large)
        dataset = read_dataset(
            stream,  # type: ignore[arg-type]  # a binary file-like is all it reads from
            is_implicit_VR=False,
            is_little_endian=True,
            stop_when=_before_pixels if stop_before_pixels else None,
        )
        del stream
    ds = FileDataset(str(path), dataset, preamble, meta, is_implicit_VR=False)
    ds.set_original_encoding(False, True, dataset.original_character_set)
    return ds


def _is_deflated(path: Path) -> bool:
    meta = pydicom.filereader.read_file_meta_info(path)
    return bool(meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian)


def _unreadable(exc: Exception) -> InstanceRejected:
    logger.debug("unreadable instance: %s", type(exc).__name__)
    return InstanceRejected(f"unreadable file ({type(exc).__name__})")


def read_instance_header(path: str | PathLike[str]) -> Dataset:
    """The data set of a Part 10 file up to (not including) Pixel Data.

    A Deflated data set is inflated only as far as the elements before Pixel Data, at most
    :data:`MAX_HEADER_BYTES`; other files are read with pydicom's ``stop_before_pixels``.

    Raises
    ------
    InstanceRejected
        When the file cannot be parsed, or its inflated header exceeds :data:`MAX_HEADER_BYTES`.
    OSError
        When the file cannot be opened or read.
    """
    path = Path(path)
    try:
        if _is_deflated(path):
            return _read_deflated(
                path, limit=MAX_HEADER_BYTES, stop_before_pixels=True, too_large=InstanceRejected
            )
        return pydicom.dcmread(path, stop_before_pixels=True, defer_size=_DEFER_SIZE)
    except (InstanceRejected, OSError):
        raise
    except Exception as exc:  # any parse failure means the file is unusable
        raise _unreadable(exc) from exc


def declared_pixel_bytes(ds: Dataset) -> int:
    """Bytes of pixel data the header of ``ds`` declares (0 without Rows or Columns).

    Rows x Columns x Number of Frames x Samples per Pixel x Bits Allocated / 8, rounded up.

    >>> ds = Dataset(); ds.Rows, ds.Columns, ds.BitsAllocated = 4, 3, 16
    >>> declared_pixel_bytes(ds)
    24

    Raises
    ------
    InstanceRejected
        When one of these values is not a non-negative integer.
    """
    try:
        rows = int(ds.get("Rows") or 0)
        columns = int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 16)
    except Exception as exc:  # a lazily read value raises whatever its bytes make pydicom raise
        raise InstanceRejected(f"unreadable image size attributes ({type(exc).__name__})") from exc
    if min(rows, columns, frames, samples, bits) < 0:
        raise InstanceRejected("negative image size attribute")
    return (rows * columns * frames * samples * bits + 7) // 8


def check_pixel_data_size(ds: Dataset, max_pixel_bytes: int) -> int:
    """The declared pixel data size of ``ds``, if it is at most ``max_pixel_bytes``.

    Raises
    ------
    PixelDataTooLarge
        Naming the declared dimensions, the size and the limit (never patient data).
    """
    size = declared_pixel_bytes(ds)
    if size > max_pixel_bytes:
        frames = int(ds.get("NumberOfFrames") or 1)
        raise PixelDataTooLarge(
            f"image of {int(ds.Rows)} x {int(ds.Columns)} pixels, {frames} frame(s), "
            f"{int(ds.get('SamplesPerPixel') or 1)} sample(s) of "
            f"{int(ds.get('BitsAllocated') or 16)} bits: {size} bytes of pixel data exceed "
            f"the limit of {max_pixel_bytes} bytes (D2R_MAX_PIXEL_BYTES)"
        )
    return size


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` a JPEG, JPEG-LS or JPEG 2000 codestream declares, else None.

    >>> codestream_size(bytes.fromhex("ffd8fff7000b0c00400030010111"))
    (64, 48)
    """
    at = frame.find(_J2K_SOC_SIZ, 0, 4096)  # a JPEG 2000 codestream, or one in a JP2 box
    if at >= 0 and len(frame) >= at + 24:
        xsiz, ysiz, x0, y0 = struct.unpack(">IIII", frame[at + 8 : at + 24])
        return max(0, ysiz - y0), max(0, xsiz - x0)
    if not frame.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(frame) and frame[pos] == 0xFF:
        marker = frame[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker in _JPEG_SOF and pos + 9 <= len(frame):
            rows, columns = struct.unpack(">HH", frame[pos + 5 : pos + 9])
            return rows, columns
        if marker == 0xDA:  # a scan before any frame header
            return None
        pos += 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
    return None


def _check_codestreams(ds: Dataset) -> None:
    """Refuse an encapsulated frame whose codestream declares more pixels than the header: the
    decoder sizes its output from the codestream, which the header check did not see."""
    if "PixelData" not in ds or not UID(ds.file_meta.TransferSyntaxUID).is_encapsulated:
        return
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    frames = int(ds.get("NumberOfFrames") or 1)
    for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
        size = codestream_size(frame)
        if size is not None and (size[0] > rows or size[1] > columns):
            raise PixelDataTooLarge(
                f"frame {index + 1} declares {size[0]} x {size[1]} pixels in its codestream, "
                f"more than the {rows} x {columns} of the header"
            )


def _check_file_size(path: Path, max_pixel_bytes: int) -> None:
    """Refuse a file larger than the limit plus a header: its stored (native or compressed)
    pixel data would be, whatever its header declares."""
    size = path.stat().st_size
    if size > max_pixel_bytes + MAX_HEADER_BYTES:
        raise PixelDataTooLarge(
            f"file of {size} bytes exceeds the limit of {max_pixel_bytes} bytes of pixel data "
            f"and {MAX_HEADER_BYTES} bytes of header (D2R_MAX_PIXEL_BYTES)"
        )


def read_instance(path: str | PathLike[str], *, max_pixel_bytes: int) -> Dataset:
    """The whole data set of a Part 10 file, its pixel data checked against a limit first.

    The header is read as :func:`read_instance_header` does and its declared pixel data size
    checked before any pixel byte is read; a Deflated file is then inflated into a buffer of
    at most ``max_pixel_bytes`` + :data:`MAX_HEADER_BYTES`, and another file is read only when
    it is no larger than that; each compressed frame's codestream must declare no more rows and
    columns than the header. Pixel data is not decoded here.

    Raises
    ------
    PixelDataTooLarge
        When the declared size, the inflated size (Deflated) or the file size exceeds the
        limit, or a frame's codestream declares more pixels than the header.
    InstanceRejected
        When the file cannot be parsed.
    OSError
        When the file cannot be opened or read.
    """
    path = Path(path)
    header = read_instance_header(path)
    check_pixel_data_size(header, max_pixel_bytes)
    try:
        if header.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            return _read_deflated(
                path,
                limit=max_pixel_bytes + MAX_HEADER_BYTES,
                stop_before_pixels=False,
                too_large=PixelDataTooLarge,
            )
        _check_file_size(path, max_pixel_bytes)
        ds = pydicom.dcmread(path)
        _check_codestreams(ds)
        return ds
    except (InstanceRejected, OSError):
        raise
    except Exception as exc:
        raise _unreadable(exc) from exc
