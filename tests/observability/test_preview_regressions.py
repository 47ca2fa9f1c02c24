"""Images found by the fuzzing campaign (``fuzz/dicom_header.py``, inputs in
fuzz/regressions/dicom_header): an instance the node accepted (its routing header parses) whose
image is malformed gets no preview (None: the endpoint answers 404), never an exception, not
even the panic of a Rust decoder (``pyo3_runtime.PanicException``, a BaseException).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from fuzz import REGRESSIONS_DIR
from fuzz.dicom_header import SYNTAXES, part10_prefix
from observability.pages import StatusPages
from studydb.store import StudyStore
from tests.observability.conftest import record_for
from tests.support.dicom_files import make_dx


def _preview(store: StudyStore, ds: pydicom.Dataset, path: Path) -> bytes | None:
    store.record_instance(record_for(ds, path), outcome="stored")
    return StatusPages(store).preview(str(ds.StudyInstanceUID))


@pytest.mark.parametrize("keyword", ["PixelData", "PhotometricInterpretation"])
def test_preview_of_a_malformed_image(store: StudyStore, tmp_path: Path, keyword: str) -> None:
    path = tmp_path / "image.dcm"
    ds = make_dx(None, rows=8, cols=8)
    delattr(ds, keyword)
    ds.save_as(path, enforce_file_format=True)
    assert _preview(store, pydicom.dcmread(path), path) is None


def test_the_same_image_with_both_elements_previews(store: StudyStore, tmp_path: Path) -> None:
    path = tmp_path / "image.dcm"
    make_dx(path, rows=8, cols=8)
    png = _preview(store, pydicom.dcmread(path), path)
    assert png is not None and png.startswith(b"\x89PNG")


def test_preview_of_a_short_rle_segment(store: StudyStore, tmp_path: Path) -> None:
    """pylibjpeg-rle panics on an RLE segment shorter than the image."""
    data = (REGRESSIONS_DIR / "dicom_header" / "preview-rle-segment-too-short-panics").read_bytes()
    path = tmp_path / "image.dcm"
    path.write_bytes(part10_prefix(SYNTAXES[data[0] % len(SYNTAXES)]) + data[1:])
    assert _preview(store, pydicom.dcmread(path), path) is None
