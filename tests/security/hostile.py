"""Hostile and malformed instances, written as Part 10 files whose data set bytes are sent raw.

pynetdicom's ``send_c_store(path)`` reads only the File Meta Information and streams the rest
of the file unparsed, so these bytes reach the listener exactly as crafted here.
"""

from __future__ import annotations

import io
from copy import deepcopy
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless

from tests.support.dicom_files import make_dx

PREAMBLE = b"\x00" * 128 + b"DICM"


def encode(ds: Dataset) -> bytes:
    """The data set in explicit VR little endian (also the framing of encapsulated syntaxes)."""
    buf = io.BytesIO()
    fp = DicomFileLike(buf)
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return buf.getvalue()


def write_raw(path: Path, meta_from: Dataset, data: bytes, transfer_syntax: str) -> Path:
    """A Part 10 file: File Meta Information naming ``meta_from``'s UIDs, then ``data`` as is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = meta_from.SOPClassUID
    meta.MediaStorageSOPInstanceUID = meta_from.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    buf = io.BytesIO()
    buf.write(PREAMBLE)
    write_file_meta_info(DicomFileLike(buf), meta, enforce_standard=True)
    buf.write(data)
    path.write_bytes(buf.getvalue())
    return path


def _dx(rows: int = 64, cols: int = 48) -> Dataset:
    ds = make_dx(None, rows=rows, cols=cols)
    del ds.file_meta
    return ds


def truncated_header(folder: Path) -> tuple[Path, Dataset]:
    """The data set ends inside the SOP Instance UID value."""
    ds = _dx()
    data = encode(ds)
    cut = data.index(b"\x08\x00\x18\x00UI") + 12
    return write_raw(folder / "truncated-header.dcm", ds, data[:cut], ExplicitVRLittleEndian), ds


def garbage(folder: Path) -> tuple[Path, Dataset]:
    ds = _dx()
    noise = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return write_raw(folder / "garbage.dcm", ds, noise, ExplicitVRLittleEndian), ds


def missing_sop_instance_uid(folder: Path) -> tuple[Path, Dataset]:
    ds = _dx()
    data = encode(_without(ds, "SOPInstanceUID"))
    return write_raw(folder / "no-sop-uid.dcm", ds, data, ExplicitVRLittleEndian), ds


def missing_study_uid(folder: Path) -> tuple[Path, Dataset]:
    ds = _dx()
    data = encode(_without(ds, "StudyInstanceUID"))
    return write_raw(folder / "no-study-uid.dcm", ds, data, ExplicitVRLittleEndian), ds


def wrong_vr(folder: Path) -> tuple[Path, Dataset]:
    """SOP Instance UID (0008,0018) re-labelled as a sequence: the header cannot be parsed."""
    ds = _dx()
    data = bytearray(encode(ds))
    at = data.index(b"\x08\x00\x18\x00UI")
    data[at + 4 : at + 6] = b"SQ"
    return write_raw(folder / "wrong-vr.dcm", ds, bytes(data), ExplicitVRLittleEndian), ds


def pixel_data_short(folder: Path) -> tuple[Path, Dataset]:
    """A well-formed Pixel Data element holding a tenth of the declared Rows x Columns."""
    ds = _dx(rows=64, cols=48)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 10]
    return write_raw(folder / "short-pixels.dcm", ds, encode(ds), ExplicitVRLittleEndian), ds


def pixel_data_truncated(folder: Path) -> tuple[Path, Dataset]:
    """The file ends inside Pixel Data: its length field promises more than arrives."""
    ds = _dx(rows=64, cols=48)
    data = encode(ds)
    return write_raw(folder / "cut-pixels.dcm", ds, data[:-3000], ExplicitVRLittleEndian), ds


def unsupported_photometric(folder: Path) -> tuple[Path, Dataset]:
    ds = _dx(rows=16, cols=16)
    ds.PhotometricInterpretation = "PALETTE COLOR"  # colour by lookup table: not a radiograph
    ds.SamplesPerPixel = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(16 * 16)
    return write_raw(folder / "palette.dcm", ds, encode(ds), ExplicitVRLittleEndian), ds


def decompression_bomb(folder: Path) -> tuple[Path, Dataset]:
    """A few kilobytes of RLE whose header declares 60000 x 60000 pixels (7.2 GB decoded)."""
    ds = make_dx(None, rows=64, cols=64)
    ds.compress(RLELossless)
    ds.Rows = ds.Columns = 60000
    del ds.file_meta
    return write_raw(folder / "bomb.dcm", ds, encode(ds), RLELossless), ds


def odd_text(folder: Path) -> tuple[Path, Dataset]:
    """An unknown character set and control characters in routing and free-text fields."""
    ds = _dx()
    ds.SpecificCharacterSet = "ISO_IR 999"
    ds.SeriesDescription = "PA\x1b$B\x07\x00 \xe9\u4e2d"
    ds.BodyPartExamined = "CHEST\x1b"
    ds.PatientName = "\x00\x01\x02^\x7f"
    data = encode(ds).replace("\u4e2d".encode(), b"\xff\xfe")
    return write_raw(folder / "odd-text.dcm", ds, data, ExplicitVRLittleEndian), ds


def non_image(folder: Path) -> tuple[Path, Dataset]:
    """A Basic Text SR: a storage class the node files but never sends to the model."""
    ds = _dx()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.Modality = "SR"
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
        delattr(ds, keyword)
    return write_raw(folder / "sr.dcm", ds, encode(ds), ExplicitVRLittleEndian), ds


def _without(ds: Dataset, keyword: str) -> Dataset:
    copy = deepcopy(ds)
    delattr(copy, keyword)
    return copy
