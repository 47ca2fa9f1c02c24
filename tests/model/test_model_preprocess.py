from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from model.errors import PreprocessError
from model.preprocess import (
    BoxMapping,
    DicomToFloat,
    ImageSample,
    Letterbox,
    Preprocessor,
    ScaleToUnit,
)


def _data(name: str) -> str:
    path = get_testdata_file(name)
    assert isinstance(path, str)
    return path


def _found_box(pixels: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Continuous xyxy box of the pixels above ``threshold``."""
    rows, cols = np.nonzero(pixels > threshold)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float64)


def _with_pixels(ds: pydicom.Dataset, arr: np.ndarray) -> pydicom.Dataset:
    out = copy.deepcopy(ds)
    out.PixelData = arr.astype(np.uint16).tobytes()
    return out


def _mono1_windowed(rows: int = 300, cols: int = 500) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.WindowCenter, ds.WindowWidth = 2000, 1000
    arr = np.full((rows, cols), 3000, dtype=np.uint16)  # 5900 after rescale: above window -> black
    arr[57:201, 123:377] = 100  # 100: below window -> white after MONOCHROME1 inversion
    arr[230:280, 20:80] = 1050  # 2000 = window centre -> mid grey
    ds.PixelData = arr.tobytes()
    return ds


def test_box_mapping_inverse_is_exact() -> None:
    m = BoxMapping(1955, 1841).then(0.13, 0.131, 7.0, 0.0)
    boxes = np.array([[0.0, 0.0, 1841.0, 1955.0], [100.5, 200.25, 300.0, 400.0]])
    np.testing.assert_allclose(m.to_source(m.to_frame(boxes)), boxes, atol=1e-9)
    clipped = m.to_source([[-50.0, -5.0, 400.0, 300.0]], clip=True)
    assert clipped.min() >= 0 and clipped[0, 2] <= 1841 and clipped[0, 3] <= 1955


def test_letterbox_geometry_centres_content() -> None:
    assert Letterbox(256).geometry(1955, 1841) == (256, 241, 0, 7)
    assert Letterbox(256).geometry(300, 500) == (154, 256, 51, 0)


def test_mono1_windowed_round_trip() -> None:
    ds = _mono1_windowed()
    sample = Preprocessor(256).sample(ds)
    px, mapping = sample.pixels, sample.mapping
    assert px.shape == (256, 256) and px.min() == 0.0 and px.max() == pytest.approx(1.0)
    source_box = np.array([[123.0, 57.0, 377.0, 201.0]])
    expected = mapping.to_frame(source_box)[0]
    np.testing.assert_allclose(_found_box(px), expected, atol=1.0)
    np.testing.assert_allclose(
        mapping.to_source(_found_box(px)), source_box, atol=1.0 / mapping.scale_x
    )
    # window centre maps to mid grey (VOI applied), padding rows stay zero
    grey = mapping.to_frame([[20, 230, 80, 280]])[0].round().astype(int)
    assert px[grey[1] + 2 : grey[3] - 2, grey[0] + 2 : grey[2] - 2].mean() == pytest.approx(
        0.5, abs=0.05
    )
    assert px[:50].max() == 0.0 and px[-50:].max() == 0.0


def test_rg1_header_round_trip(rg1: pydicom.Dataset) -> None:
    assert (rg1.Rows, rg1.Columns, rg1.PhotometricInterpretation) == (1955, 1841, "MONOCHROME1")
    arr = np.full((rg1.Rows, rg1.Columns), 20000, dtype=np.uint16)
    arr[700:1100, 300:650] = 0
    ds = _with_pixels(rg1, arr)
    sample = Preprocessor(256).sample(ds)
    source_box = np.array([[300.0, 700.0, 650.0, 1100.0]])
    found = _found_box(sample.pixels)
    np.testing.assert_allclose(found, sample.mapping.to_frame(source_box)[0], atol=1.0)
    back = sample.mapping.to_source(found)
    assert np.abs(back - source_box).max() <= 1.0 / sample.mapping.scale_x


def test_rg1_real_pixels(rg1: pydicom.Dataset) -> None:
    image, mapping = Preprocessor(384)(rg1)
    assert tuple(image.shape) == (1, 384, 384)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert float(image[0, :, 12:370].std()) > 0.1
    assert float(image[0, :, :5].abs().max()) == 0.0  # left padding (10 columns)
    assert (mapping.source_rows, mapping.source_columns) == (1955, 1841)


@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "JPEG-LL.dcm"])
def test_compressed_transfer_syntaxes(rg1: pydicom.Dataset, name: str) -> None:
    ds = pydicom.dcmread(_data(name))
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    image, _ = Preprocessor(128)(ds)
    assert float(image.max()) > 0.5
    if name == "RG1_J2KR.dcm":  # lossless: identical to the uncompressed original
        assert np.array_equal(image.numpy(), Preprocessor(128)(rg1)[0].numpy())


def test_colour_scans_are_read_as_their_luminance() -> None:
    rgb = pydicom.dcmread(_data("SC_rgb.dcm"))
    expected = rgb.pixel_array.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    sample = DicomToFloat()(rgb)
    assert sample.pixels.shape == (rgb.Rows, rgb.Columns)
    np.testing.assert_allclose(sample.pixels, expected, atol=1e-3)
    ybr = pydicom.dcmread(_data("SC_rgb_dcmtk_+eb+cy+s2.dcm"))  # YBR_FULL_422 JPEG
    assert ybr.PhotometricInterpretation == "YBR_FULL_422"
    luma = DicomToFloat()(ybr).pixels
    assert luma.shape == (ybr.Rows, ybr.Columns) and 0 <= luma.min() < luma.max() <= 255


def test_unsupported_pixels_raise_preprocess_error() -> None:
    palette = pydicom.dcmread(_data("SC_rgb.dcm"))
    palette.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(PreprocessError, match="PhotometricInterpretation 'PALETTE COLOR'"):
        DicomToFloat()(palette)
    ds = _mono1_windowed()
    del ds.PixelData
    with pytest.raises(PreprocessError, match="no Pixel Data"):
        DicomToFloat()(ds)
    broken = _mono1_windowed()
    broken.PixelData = b"\x00\x01" * 10
    with pytest.raises(PreprocessError, match="cannot decode"):
        DicomToFloat()(broken)


def _reference_unit(ds: pydicom.Dataset) -> np.ndarray:
    """The float64 path of the standard: modality LUT, VOI, MONOCHROME1 inversion, min-max."""
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(ds.pixel_array, ds)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        values = apply_voi_lut(values, ds, index=0)
    values = np.asarray(values, dtype=np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = values.max() + values.min() - values
    unit: np.ndarray = (values - values.min()) / (values.max() - values.min())
    return unit


def _signed_ct_like() -> pydicom.Dataset:
    ds = _mono1_windowed(64, 80)
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 1
    arr = np.linspace(-900, 1500, 64 * 80).reshape(64, 80).astype(np.int16)
    ds.PixelData = arr.tobytes()
    return ds


def _voi_lut_not_monotonic() -> pydicom.Dataset:
    ds = _mono1_windowed(60, 90)
    del ds.WindowCenter, ds.WindowWidth
    del ds.RescaleSlope, ds.RescaleIntercept
    item = pydicom.Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.LUTData = [int(v) for v in 4000 + 3000 * np.sin(np.arange(256) / 20.0)]
    ds.VOILUTSequence = [item]
    arr = np.random.default_rng(1).integers(10, 240, size=(60, 90)).astype(np.uint16)
    ds.PixelData = arr.tobytes()
    return ds


@pytest.mark.parametrize("case", ["rg1", "mono1-window", "signed", "voi-lut-not-monotonic"])
def test_stored_value_table_matches_the_float_path(rg1: pydicom.Dataset, case: str) -> None:
    ds = {
        "rg1": lambda: rg1,
        "mono1-window": _mono1_windowed,
        "signed": _signed_ct_like,
        "voi-lut-not-monotonic": _voi_lut_not_monotonic,
    }[case]()
    decoded = DicomToFloat()(ds)
    assert decoded.value_range is not None
    assert decoded.value_range == pytest.approx(
        (float(decoded.pixels.min()), float(decoded.pixels.max())), rel=1e-6
    )
    unit = ScaleToUnit()(decoded).pixels
    np.testing.assert_allclose(unit, _reference_unit(ds), atol=2e-6)
    assert unit.min() == 0.0 and unit.max() == pytest.approx(1.0, abs=1e-6)


def test_pixel_data_over_the_limit_is_refused_before_decoding() -> None:
    """The same measure as the serving readers (bytes of pixel data), and a ceiling that
    ``D2R_MAX_PIXEL_BYTES`` cannot exceed: one limit, not two that disagree."""
    from dicom_node.settings import MAX_PIXEL_BYTES_CEILING
    from model.preprocess import MAX_PIXEL_BYTES

    assert MAX_PIXEL_BYTES == MAX_PIXEL_BYTES_CEILING
    ds = _mono1_windowed()
    size = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
    assert DicomToFloat(max_pixel_bytes=size)(ds).pixels.shape == (ds.Rows, ds.Columns)
    with pytest.raises(PreprocessError, match=f"{size} bytes of pixel data exceed the limit"):
        DicomToFloat(max_pixel_bytes=size - 1)(ds)
    rgb = pydicom.dcmread(_data("SC_rgb.dcm"))  # three samples per pixel count
    rgb_size = int(rgb.Rows) * int(rgb.Columns) * 3 * int(rgb.BitsAllocated) // 8
    with pytest.raises(PreprocessError, match=f"{rgb_size} bytes"):
        DicomToFloat(max_pixel_bytes=rgb_size - 1)(rgb)


def test_scaling_in_place_overwrites_only_when_asked() -> None:
    pixels = np.linspace(-5.0, 20.0, 6 * 4, dtype=np.float32).reshape(6, 4)
    sample = ImageSample(pixels.copy(), BoxMapping(6, 4), "1.2.3", (-5.0, 20.0))
    copied = ScaleToUnit()(sample)
    assert np.array_equal(sample.pixels, pixels)  # the input is kept by default
    scaled = ScaleToUnit()(sample, in_place=True)
    assert scaled.pixels is sample.pixels  # no full-size copy
    assert np.array_equal(scaled.pixels, copied.pixels)
    assert float(scaled.pixels.min()) == 0.0 and float(scaled.pixels.max()) == 1.0


def test_a_decoder_panic_is_a_preprocess_error(tmp_path: Path) -> None:
    """pylibjpeg-rle panics on an RLE segment shorter than the image (a Rust panic surfaces as
    pyo3's PanicException, a BaseException): the worker must see an unreadable image."""
    from fuzz import REGRESSIONS_DIR
    from fuzz.dicom_header import SYNTAXES, part10_prefix

    data = (REGRESSIONS_DIR / "dicom_header" / "preview-rle-segment-too-short-panics").read_bytes()
    path = tmp_path / "image.dcm"
    path.write_bytes(part10_prefix(SYNTAXES[data[0] % len(SYNTAXES)]) + data[1:])
    with pytest.raises(PreprocessError, match="cannot decode pixel data"):
        Preprocessor(64).sample(pydicom.dcmread(path))
