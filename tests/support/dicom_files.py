"""Synthetic chest radiographs for tests, and the real CR sample from ``pydicom-data``.

Every generated file is a small, ``dciodvfy``-clean instance with an obviously
synthetic patient (``SYNTHETIC^CHEST``, ID ``SYN-...``); pixels are body, lung, heart
and spine shapes plus Gaussian noise, reproducible from ``seed``.

>>> from pathlib import Path; import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     ds = make_dx(Path(d) / "a.dcm", rows=64, cols=48)
>>> ds.Modality, ds.Rows, ds.Columns
('DX', 64, 48)
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

__all__ = ["chest_pixels", "make_cr", "make_dx", "make_sc", "rg1_path"]

#: View Position -> (SNOMED CT code, meaning) of the View Code Sequence (CID 4010)
_VIEW_CODES = {
    "PA": ("272479007", "postero-anterior"),
    "AP": ("399348003", "antero-posterior"),
    "LL": ("399173006", "left lateral"),
    "RL": ("399198007", "right lateral"),
}
_PREFIX = "1.2.826.0.1.3680043.10.1077."  # a test UID root; UIDs are generated below it


def chest_pixels(rows: int, cols: int, *, bits_stored: int = 12, seed: int = 0) -> np.ndarray:
    """Return a ``rows x cols`` synthetic frontal chest image (MONOCHROME2, higher = brighter).

    The dtype is ``uint8`` for ``bits_stored <= 8`` and ``uint16`` otherwise.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    y /= max(rows - 1, 1)
    x /= max(cols - 1, 1)
    img = np.full((rows, cols), 0.05, np.float32)
    body = ((x - 0.5) / 0.42) ** 2 + ((y - 0.55) / 0.5) ** 2 < 1
    img[body] = 0.7
    for cx in (0.33, 0.67):
        lung = ((x - cx) / 0.14) ** 2 + ((y - 0.45) / 0.3) ** 2 < 1
        img[lung] = 0.3
    heart = ((x - 0.56) / 0.12) ** 2 + ((y - 0.6) / 0.12) ** 2 < 1
    img[heart] = 0.75
    img[np.abs(x - 0.5) < 0.03] = 0.9  # spine
    img += rng.normal(0.0, 0.03, img.shape).astype(np.float32)
    max_value = (1 << bits_stored) - 1
    out = np.clip(img, 0.0, 1.0) * max_value
    return out.astype(np.uint8 if bits_stored <= 8 else np.uint16)


def _base(
    sop_class: UID,
    *,
    study_uid: str | None,
    series_uid: str | None,
    sop_uid: str | None,
    modality: str,
    seed: int,
) -> Dataset:
    now = _dt.datetime(2026, 1, 2, 3, 4, 5)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid(_PREFIX)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = f"SYNACC{seed:04d}"
    ds.Modality = modality
    ds.Manufacturer = "d2r synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "SYNTHETIC CHEST"
    ds.SeriesDescription = "synthetic"
    ds.PatientName = "SYNTHETIC^CHEST"
    ds.PatientID = f"SYN-{seed:06d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or generate_uid(_PREFIX)
    ds.SeriesInstanceUID = series_uid or generate_uid(_PREFIX)
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    return ds


def _pixels(ds: Dataset, rows: int, cols: int, bits_stored: int, seed: int, mono: str) -> None:
    arr = chest_pixels(rows, cols, bits_stored=bits_stored, seed=seed)
    if mono == "MONOCHROME1":
        arr = ((1 << bits_stored) - 1 - arr).astype(arr.dtype)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = mono
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()


def make_dx(
    path: str | Path | None,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    rows: int = 256,
    cols: int = 208,
    bits_stored: int = 12,
    view_position: str = "PA",
    body_part: str = "CHEST",
    modality: str = "DX",
    sop_class: UID = DigitalXRayImageStorageForPresentation,
    seed: int = 0,
) -> Dataset:
    """Build (and write to ``path`` unless None) a synthetic DX chest radiograph."""
    ds = _base(
        sop_class,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        modality=modality,
        seed=seed,
    )
    for_processing = sop_class == DigitalXRayImageStorageForProcessing
    ds.PresentationIntentType = "FOR PROCESSING" if for_processing else "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.PatientOrientation = ["L", "F"] if view_position != "AP" else ["R", "F"]
    ds.ImageLaterality = "U"
    if view_position in _VIEW_CODES:
        view = Dataset()
        view.CodeValue, view.CodeMeaning = _VIEW_CODES[view_position]
        view.CodingSchemeDesignator = "SCT"
        view.ViewModifierCodeSequence = Sequence()
        ds.ViewCodeSequence = Sequence([view])
    ds.PositionerType = "COLUMN"
    ds.AcquisitionContextSequence = Sequence()
    region = Dataset()
    region.CodeValue = "816094009"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Chest"
    ds.AnatomicRegionSequence = Sequence([region])
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [0.15, 0.15]
    _pixels(ds, rows, cols, bits_stored, seed, "MONOCHROME2")
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    if not for_processing:
        ds.WindowCenter = (1 << bits_stored) // 2
        ds.WindowWidth = 1 << bits_stored
    if path is not None:
        ds.save_as(path, enforce_file_format=True)
    return ds


def make_cr(
    path: str | Path | None,
    *,
    study_uid: str | None = None,
    sop_uid: str | None = None,
    rows: int = 256,
    cols: int = 208,
    bits_stored: int = 12,
    view_position: str = "PA",
    body_part: str = "CHEST",
    seed: int = 0,
) -> Dataset:
    """Build (and write to ``path`` unless None) a synthetic CR chest radiograph."""
    ds = _base(
        ComputedRadiographyImageStorage,
        study_uid=study_uid,
        series_uid=None,
        sop_uid=sop_uid,
        modality="CR",
        seed=seed,
    )
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    _pixels(ds, rows, cols, bits_stored, seed, "MONOCHROME2")
    if path is not None:
        ds.save_as(path, enforce_file_format=True)
    return ds


def make_sc(
    path: str | Path | None,
    *,
    study_uid: str | None = None,
    sop_uid: str | None = None,
    rows: int = 128,
    cols: int = 128,
    modality: str = "OT",
    body_part: str = "",
    view_position: str = "",
    seed: int = 0,
) -> Dataset:
    """Build (and write to ``path`` unless None) a synthetic 8-bit Secondary Capture image."""
    ds = _base(
        SecondaryCaptureImageStorage,
        study_uid=study_uid,
        series_uid=None,
        sop_uid=sop_uid,
        modality=modality,
        seed=seed,
    )
    ds.ConversionType = "WSD"
    ds.Laterality = ""
    ds.PatientOrientation = ""
    if body_part:
        ds.BodyPartExamined = body_part
    if view_position:
        ds.ViewPosition = view_position
    _pixels(ds, rows, cols, 8, seed, "MONOCHROME2")
    if path is not None:
        ds.save_as(path, enforce_file_format=True)
    return ds


def rg1_path() -> Path:
    """Return the path of ``RG1_UNCR.dcm``, a real chest CR shipped by ``pydicom-data``."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCR.dcm")
    if path is None:  # pragma: no cover - pydicom-data missing
        raise FileNotFoundError("RG1_UNCR.dcm (install the pydicom-data package)")
    return Path(str(path))
