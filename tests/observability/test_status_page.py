"""The status page HTML (escaping, PHI off by default) and the preview with the boxes."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from observability.pages import StatusPages
from observability.status_page import (
    BOX_COLOUR,
    PatientLabel,
    read_sr_boxes,
    render_index,
    render_preview,
    render_study,
    window_to_uint8,
)
from studydb.records import DONE, Event, StudyView
from studydb.store import StudyStore
from tests.observability.conftest import build_srs, record_for

EVIL = '<script>alert("x")</script>'


def _view(**kw: object) -> StudyView:
    base = StudyView(
        study_instance_uid="1.2.3.4",
        state=DONE,
        reason=None,
        generation=1,
        first_received_at=1000.0,
        last_received_at=1001.0,
        queued_at=1011.0,
        processed_at=1015.0,
        finished_at=1016.5,
        model_name="d2r-net",
        model_version="1.0",
        findings="clear",
        impression="normal",
        lesion_count=0,
        result_paths=(),
        instance_count=1,
        deliveries=(),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_index_escapes_every_value_and_shows_timings() -> None:
    page = render_index([_view(reason=EVIL, impression=EVIL, state="failed")])
    assert EVIL not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert 'href="studies/1.2.3.4"' in page
    view = _view()
    page = render_index([view])
    assert view.finished_at is not None
    assert f"{view.finished_at - view.first_received_at:.1f}" in page  # end-to-end 16.5 s


def test_phi_only_when_given() -> None:
    view = _view()
    assert "Patient" not in render_index([view])
    label = PatientLabel(name=EVIL, patient_id="PID-77")
    page = render_index([view], patients={view.study_instance_uid: label})
    assert "PID-77" in page and EVIL not in page
    page = render_study(view, [Event(at=1000.0, kind="received", detail=EVIL)])
    assert EVIL not in page and "&lt;script&gt;" in page and "PID-77" not in page


@pytest.mark.parametrize("encoding", ["tid1410", "tid1501"])
def test_sr_boxes_are_read_back_from_the_tid1500_sr(
    dx: tuple[pydicom.Dataset, Path], tmp_path: Path, encoding: str
) -> None:
    """Each box once, from the group's SCOORD (TID 1410) or its NUM's (TID 1501)."""
    image, _ = dx
    wanted = [(20.0, 30.0, 120.0, 90.0), (40.5, 150.0, 180.0, 240.0)]
    boxes = read_sr_boxes(build_srs(image, wanted, tmp_path / "sr", encoding))
    assert [tuple(round(v, 1) for v in b.bounds) for b in boxes] == wanted
    assert all(b.sop_instance_uid == image.SOPInstanceUID for b in boxes)
    assert all(b.label == "Cardiomegaly" for b in boxes)


def test_preview_draws_boxes_at_scaled_coordinates(
    dx: tuple[pydicom.Dataset, Path], tmp_path: Path
) -> None:
    image, path = dx
    box = (20.0, 30.0, 120.0, 90.0)
    boxes = read_sr_boxes(build_srs(image, [box], tmp_path / "sr"))
    max_size = 128  # the 256x208 image shrinks by 0.5
    png = render_preview(pydicom.dcmread(path), boxes, max_size=max_size)
    shown = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    scale = max_size / 256
    assert shown.shape == (128, round(208 * scale), 3)
    x0, y0, x1, y1 = (round(v * scale) for v in box)
    colour = np.array(BOX_COLOUR)
    for x, y in [
        (x0, (y0 + y1) // 2),
        (x1, (y0 + y1) // 2),
        ((x0 + x1) // 2, y0),
        ((x0 + x1) // 2, y1),
    ]:
        assert (shown[y, x] == colour).all(), (x, y, shown[y, x])
    # inside and outside the box: the grey image, never the box colour
    for x, y in [((x0 + x1) // 2, (y0 + y1) // 2), (x1 + 10, y1 + 10)]:
        assert not (shown[y, x] == colour).all()
    # no boxes: no box colour anywhere
    plain = np.asarray(Image.open(io.BytesIO(render_preview(image, []))).convert("RGB"))
    assert not (plain == colour).all(axis=-1).any()


def test_window_inverts_monochrome1(dx: tuple[pydicom.Dataset, Path]) -> None:
    image, _ = dx
    image.pop("WindowCenter", None)
    image.pop("WindowWidth", None)
    grey = window_to_uint8(image)
    image.PhotometricInterpretation = "MONOCHROME1"
    inverted = window_to_uint8(image)
    assert grey.dtype == np.uint8 and grey.max() > 200 and grey.min() < 50
    assert (inverted.astype(int) + grey.astype(int) == 255).all()


@pytest.mark.parametrize("bad", ["../etc", "1.2.3"])
def test_study_page_escapes_uid(bad: str) -> None:
    page = render_study(_view(study_instance_uid=bad + EVIL), [], has_preview=True)
    assert EVIL not in page
    assert "preview.png" in page


def _window_reference(ds: pydicom.Dataset) -> np.ndarray:
    """The window in float over every pixel (what the lookup table must reproduce)."""
    pixels = np.asarray(ds.pixel_array, dtype=np.float64)
    if pixels.ndim == 3:
        pixels = pixels[0]
    pixels = pixels * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0))
    if "WindowCenter" in ds:
        low = float(ds.WindowCenter) - float(ds.WindowWidth) / 2
        high = float(ds.WindowCenter) + float(ds.WindowWidth) / 2
    else:
        low, high = (float(v) for v in np.percentile(pixels, [0.5, 99.5]))
    scaled = np.clip((pixels - low) / max(high - low, 1e-6), 0.0, 1.0) * 255.0
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 255.0 - scaled
    return np.round(scaled).astype(np.uint8)


@pytest.mark.parametrize(
    ("bits", "signed", "photometric", "frames", "window"),
    [
        (16, False, "MONOCHROME2", 1, False),
        (16, True, "MONOCHROME1", 1, False),
        (16, True, "MONOCHROME2", 1, True),
        (8, False, "MONOCHROME2", 1, False),
        (8, False, "MONOCHROME1", 3, False),
    ],
)
def test_window_table_matches_the_float_window(
    bits: int, signed: bool, photometric: str, frames: int, window: bool
) -> None:
    """Signed, 8-bit (SC), MONOCHROME1 and multi-frame images, rescaled, with and without a
    window in the header: the table lookup gives what windowing every pixel gives."""
    rng = np.random.default_rng(bits + frames)
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    info = np.iinfo(dtype)
    arr = rng.integers(max(info.min, -2000), min(info.max, 3000), (frames, 40, 30), dtype=dtype)
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 40, 30, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    ds.PhotometricInterpretation = photometric
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    if window:
        ds.WindowCenter, ds.WindowWidth = 500, 1500
    ds.PixelData = (arr if frames > 1 else arr[0]).tobytes()
    grey = window_to_uint8(ds)
    assert grey.shape == (40, 30) and grey.dtype == np.uint8
    assert np.array_equal(grey, _window_reference(ds))
    assert grey.min() < 20 and grey.max() > 235


def test_preview_over_the_pixel_limit_is_not_rendered(
    store: StudyStore, dx: tuple[pydicom.Dataset, Path]
) -> None:
    """No preview (None: the endpoint answers 404) for an image whose pixel data exceeds
    ``max_pixel_bytes``; the page still renders, and the same image within the limit previews."""
    image, path = dx
    store.record_instance(record_for(image, path), outcome="stored")
    size = 256 * 208 * 2
    uid = str(image.StudyInstanceUID)
    small = StatusPages(store, show_phi=True, max_pixel_bytes=size - 1)
    assert small.preview(uid) is None
    assert str(image.PatientID) in small.index()
    assert "preview.png" in (small.study(uid) or "")
    png = StatusPages(store, max_pixel_bytes=size).preview(uid)
    assert png is not None and Image.open(io.BytesIO(png)).size == (208, 256)
