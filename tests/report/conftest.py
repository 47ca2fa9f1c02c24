"""Fixtures for the SR builder tests: a real chest CR, a synthetic DX and validator runners."""

from __future__ import annotations

import datetime
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from report.build import AlgorithmInfo

DCIODVFY = Path("/usr/bin/dciodvfy")
DSRDUMP = Path("/usr/bin/dsrdump")

#: UTF-8 text that Latin-1 cannot hold: em dash, "≥", CJK.
UTF8_FINDINGS = "Heart size enlarged — cardiothoracic ratio ≥ 0.55. 心脏扩大。"
UTF8_IMPRESSION = "Cardiomegaly — 所见 ≥ moderate."


@pytest.fixture(autouse=True)
def strict_pydicom() -> Iterator[None]:
    """Raise on any value pydicom considers invalid while writing."""
    before = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.RAISE
    try:
        yield
    finally:
        config.settings.writing_validation_mode = before


@pytest.fixture(scope="session")
def rg1_path() -> Path:
    """The real chest CR from pydicom-data.

    MONOCHROME1, PixelSpacing 0\\0 and no ImagerPixelSpacing.
    """
    path = pydicom.data.get_testdata_file("RG1_UNCR.dcm")
    if path is None:
        pytest.fail("RG1_UNCR.dcm not found: install the 'pydicom-data' test dependency")
    return Path(str(path))


@pytest.fixture
def rg1_header(rg1_path: Path) -> Dataset:
    return pydicom.dcmread(rg1_path, stop_before_pixels=True)


def _synthetic_dx() -> Dataset:
    """A small, clean DX For Presentation chest image (validates with dciodvfy)."""
    rows, columns = 240, 200
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.ContentDate = "20260101"
    ds.ContentTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.PatientName = "Müller^Anna"
    ds.PatientID = "SYN-1"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = DicomSequence([_code("816094009", "SCT", "Chest")])
    ds.PositionerType = "COLUMN"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    pixels = np.random.default_rng(0).integers(0, 4096, size=(rows, columns), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


@pytest.fixture
def dx_path(tmp_path: Path) -> Path:
    path = tmp_path / "dx.dcm"
    _synthetic_dx().save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def dx_header(dx_path: Path) -> Dataset:
    return pydicom.dcmread(dx_path, stop_before_pixels=True)


@pytest.fixture
def algorithm() -> AlgorithmInfo:
    return AlgorithmInfo(name="d2r-net-demo", version="0.1.0", manufacturer="d2r")


@pytest.fixture
def fixed_time() -> datetime.datetime:
    return datetime.datetime(2026, 11, 27, 21, 0, 0)


def _require_tool(path: Path) -> None:
    if shutil.which(str(path)) is None:
        pytest.fail(f"{path} is required (Debian packages dicom3tools / dcmtk)")


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(
        [str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def _dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DSRDUMP), "-v", "+Pt", "+U8", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def dciodvfy_errors() -> Callable[[Path], list[str]]:
    """Return a function giving the ``Error`` lines dciodvfy prints for a file."""
    _require_tool(DCIODVFY)
    return _dciodvfy_errors


@pytest.fixture
def dsrdump() -> Callable[[Path], subprocess.CompletedProcess[str]]:
    """Return a function running ``dsrdump -v +Pt +U8`` (checks relationship constraints)."""
    _require_tool(DSRDUMP)
    return _dsrdump


@pytest.fixture
def utf8_texts() -> tuple[str, str]:
    """Findings and impression that Latin-1 cannot hold: em dash, "≥", CJK."""
    return UTF8_FINDINGS, UTF8_IMPRESSION
