"""A corpus of real-world chest radiograph header variants, built from the real RG1 chest CR
(pydicom-data, downsampled) and from the synthetic phantom chest (:func:`chest_pixels`).

Each :class:`Variant` is one study; ``expect`` is the state it must end in and ``reason`` a word
the recorded reason must contain when it does not end ``done``. JPEG baseline objects are made by
dcmtk's ``dcmcjpeg`` (by absolute path), the way a film digitiser's output looks.
"""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    generate_uid,
)

from tests.support.dicom_files import chest_pixels, make_cr, make_dx, make_sc, rg1_path

DCMCJPEG = Path("/usr/bin/dcmcjpeg")
#: the attributes the ``sc-invalid-values`` variant carries with values their VR forbids
INVALID_VALUE_KEYWORDS = ("InstitutionName", "PatientAge", "PatientBirthDate")
MULTIFRAME_GRAYSCALE_BYTE_SC = UID("1.2.840.10008.5.1.4.1.1.7.2")


@dataclass(frozen=True)
class Variant:
    """One study of the corpus: its files, and how it must end."""

    name: str
    files: tuple[Path, ...]
    expect: str = "done"
    reason: str = ""
    #: send each instance on its own association (a study arriving in pieces)
    separate_associations: bool = False
    study_uid: str = field(default="")
    #: source attributes whose values their VR forbids: left out of every object d2r writes
    left_out: tuple[str, ...] = ()


def _rg1(step: int = 4) -> tuple[Dataset, np.ndarray]:
    """The real RG1 chest CR header and its pixels, downsampled by ``step`` (still 15 bit)."""
    ds = pydicom.dcmread(rg1_path())
    return ds, np.ascontiguousarray(ds.pixel_array[::step, ::step])


def _to_8bit(pixels: np.ndarray, *, invert: bool) -> np.ndarray:
    lo, hi = float(pixels.min()), float(pixels.max())
    out = (pixels.astype(np.float64) - lo) / max(hi - lo, 1.0) * 255.0
    if invert:
        out = 255.0 - out
    return out.astype(np.uint8)


def _set_pixels(ds: Dataset, arr: np.ndarray, photometric: str, *, signed: bool = False) -> None:
    ds.Rows, ds.Columns = int(arr.shape[0]), int(arr.shape[1])
    if arr.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
        ds.pop("PlanarConfiguration", None)
    bits = 8 if arr.dtype.itemsize == 1 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PhotometricInterpretation = photometric
    for kw in ("WindowCenter", "WindowWidth", "VOILUTSequence", "PresentationLUTShape"):
        ds.pop(kw, None)
    ds.PixelData = arr.tobytes()


def _sc(study_uid: str, modality: str, seed: int) -> Dataset:
    ds = make_sc(None, study_uid=study_uid, modality=modality, body_part="CHEST", seed=seed)
    ds.ViewPosition = "PA"
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def _jpeg_baseline(src: Path, dst: Path) -> Path:
    """JPEG baseline (process 1) with dcmtk; colour becomes YBR_FULL_422."""
    subprocess.run([str(DCMCJPEG), "+eb", str(src), str(dst)], check=True, capture_output=True)
    return dst


def build_corpus(folder: Path) -> list[Variant]:
    """Write every variant under ``folder``; returns them in a stable order."""
    folder.mkdir(parents=True, exist_ok=True)
    rg1, rg1_px = _rg1()
    rg1_8 = _to_8bit(rg1_px, invert=True)  # RG1 is MONOCHROME1: bright bone after inversion
    variants: list[Variant] = []

    def add(name: str, build: Callable[[str, Path], list[Path]], **kw: object) -> None:
        study = str(generate_uid())
        sub = folder / name
        sub.mkdir()
        files = build(study, sub)
        variants.append(Variant(name, tuple(files), study_uid=study, **kw))  # type: ignore[arg-type]

    def sc_cr_jpeg(study: str, sub: Path) -> list[Path]:
        ds = _sc(study, "CR", 1)
        _set_pixels(ds, rg1_8, "MONOCHROME2")
        return [_jpeg_baseline(_save(ds, sub / "native.dcm"), sub / "sc-cr-jpeg.dcm")]

    def sc_dx(study: str, sub: Path) -> list[Path]:
        ds = _sc(study, "DX", 2)
        _set_pixels(ds, chest_pixels(384, 320, bits_stored=8, seed=2), "MONOCHROME2")
        return [_save(ds, sub / "sc-dx.dcm")]

    def sc_rgb(study: str, sub: Path) -> list[Path]:
        ds = _sc(study, "CR", 3)
        _set_pixels(ds, np.stack([rg1_8, rg1_8, rg1_8], axis=-1), "RGB")
        return [_save(ds, sub / "sc-rgb.dcm")]

    def sc_ybr_jpeg(study: str, sub: Path) -> list[Path]:
        ds = _sc(study, "CR", 4)
        tint = np.stack([rg1_8, (rg1_8 * 0.95).astype(np.uint8), rg1_8 // 2 + 100], axis=-1)
        _set_pixels(ds, tint.astype(np.uint8), "RGB")
        return [_jpeg_baseline(_save(ds, sub / "rgb.dcm"), sub / "sc-ybr422.dcm")]

    def mono1_8bit(study: str, sub: Path) -> list[Path]:
        ds = make_cr(None, study_uid=study, seed=5)
        _set_pixels(ds, 255 - rg1_8, "MONOCHROME1")
        return [_save(ds, sub / "cr-mono1-8.dcm")]

    def dx_for_processing(study: str, sub: Path) -> list[Path]:
        ds = make_dx(
            None, study_uid=study, rows=320, cols=272, seed=6,
            sop_class=DigitalXRayImageStorageForProcessing,
        )  # fmt: skip
        return [_save(ds, sub / "dx-processing.dcm")]

    def orientation_only(study: str, sub: Path) -> list[Path]:
        ds = make_dx(None, study_uid=study, rows=320, cols=272, seed=7)
        del ds.ViewPosition
        ds.pop("ViewCodeSequence", None)
        ds.PatientOrientation = ["L", "F"]
        return [_save(ds, sub / "no-view.dcm")]

    def body_part_empty(study: str, sub: Path) -> list[Path]:
        ds = make_dx(None, study_uid=study, rows=320, cols=272, seed=8)
        ds.BodyPartExamined = ""
        return [_save(ds, sub / "bpe-empty.dcm")]

    def body_part_missing(study: str, sub: Path) -> list[Path]:
        ds = make_dx(None, study_uid=study, rows=320, cols=272, seed=9)
        del ds.BodyPartExamined
        return [_save(ds, sub / "bpe-missing.dcm")]

    def imager_spacing_only(study: str, sub: Path) -> list[Path]:
        ds = make_dx(None, study_uid=study, rows=320, cols=272, seed=10)
        assert "ImagerPixelSpacing" in ds and "PixelSpacing" not in ds
        return [_save(ds, sub / "imager-spacing.dcm")]

    def no_spacing(study: str, sub: Path) -> list[Path]:
        ds = make_cr(None, study_uid=study, seed=11)
        _set_pixels(ds, rg1_px.astype(np.uint16), "MONOCHROME1")
        ds.BitsStored, ds.HighBit = 15, 14
        ds.pop("PixelSpacing", None)
        ds.pop("ImagerPixelSpacing", None)
        return [_save(ds, sub / "rg1-no-spacing.dcm")]

    def rescale(study: str, sub: Path) -> list[Path]:
        ds = make_cr(None, study_uid=study, rows=320, cols=272, seed=12)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "2", "-100", "US"
        return [_save(ds, sub / "rescale.dcm")]

    def voi_lut_sequence(study: str, sub: Path) -> list[Path]:
        ds = make_dx(None, study_uid=study, rows=320, cols=272, seed=13)
        ds.pop("WindowCenter", None)
        ds.pop("WindowWidth", None)
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        ramp = (np.sqrt(np.arange(4096) / 4095.0) * 65535).astype(np.uint16)
        item.add_new("LUTData", "US", ramp.tolist())
        item.LUTExplanation = "square root"
        ds.VOILUTSequence = Sequence([item])
        return [_save(ds, sub / "voi-lut.dcm")]

    def odd_size(study: str, sub: Path) -> list[Path]:
        return [_save(make_dx(None, study_uid=study, rows=301, cols=257, seed=14), sub / "o.dcm")]

    def signed_16(study: str, sub: Path) -> list[Path]:
        ds = make_cr(None, study_uid=study, seed=15)
        signed = (rg1_px.astype(np.int32) - 12000).clip(-32768, 32767).astype(np.int16)
        _set_pixels(ds, signed, "MONOCHROME1", signed=True)
        return [_save(ds, sub / "signed16.dcm")]

    def frontal_and_lateral(study: str, sub: Path) -> list[Path]:
        pa = make_dx(None, study_uid=study, rows=320, cols=272, seed=16)
        ll = make_dx(None, study_uid=study, rows=320, cols=272, view_position="LL", seed=17)
        return [_save(pa, sub / "pa.dcm"), _save(ll, sub / "ll.dcm")]

    def two_frontals(study: str, sub: Path) -> list[Path]:
        pa = make_dx(None, study_uid=study, rows=320, cols=272, seed=18)
        ap = make_dx(None, study_uid=study, rows=320, cols=272, view_position="AP", seed=19)
        return [_save(pa, sub / "pa.dcm"), _save(ap, sub / "ap.dcm")]

    def multi_frame(study: str, sub: Path) -> list[Path]:
        ds = _sc(study, "CR", 20)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MULTIFRAME_GRAYSCALE_BYTE_SC
        frames = np.stack([rg1_8, rg1_8[::-1]])
        _set_pixels(ds, frames[0], "MONOCHROME2")
        ds.NumberOfFrames = 2
        ds.PixelData = frames.tobytes()
        return [_save(ds, sub / "multiframe.dcm")]

    def invalid_values(study: str, sub: Path) -> list[Path]:
        ds = _sc(study, "CR", 24)
        _set_pixels(ds, chest_pixels(384, 320, bits_stored=8, seed=24), "MONOCHROME2")
        with warnings.catch_warnings():  # values their VR forbids, as some sources send them
            warnings.simplefilter("ignore")
            ds.PatientAge = "51"  # no unit: days, weeks, months or years?
            ds.PatientBirthDate = "1975-03-01"
            ds.InstitutionName = "Department of radiology of a hospital with a rather long name, W7"
        return [_save(ds, sub / "sc-invalid-values.dcm")]

    def several_associations(study: str, sub: Path) -> list[Path]:
        parts = [
            make_cr(None, study_uid=study, rows=320, cols=272, seed=21),
            make_cr(None, study_uid=study, rows=320, cols=272, view_position="LL", seed=22),
            make_cr(None, study_uid=study, rows=320, cols=272, view_position="AP", seed=23),
        ]
        return [_save(ds, sub / f"part{n}.dcm") for n, ds in enumerate(parts)]

    add("sc-cr-jpeg-baseline", sc_cr_jpeg)
    add("sc-invalid-values", invalid_values, left_out=INVALID_VALUE_KEYWORDS)
    add("sc-dx", sc_dx)
    add("sc-rgb", sc_rgb)
    add("sc-ybr-full-422-jpeg", sc_ybr_jpeg)
    add("cr-monochrome1-8bit", mono1_8bit)
    add("dx-for-processing", dx_for_processing)
    add("orientation-no-view", orientation_only)
    add("body-part-empty", body_part_empty)
    add("body-part-missing", body_part_missing)
    add("imager-pixel-spacing-only", imager_spacing_only)
    add("no-pixel-spacing-rg1", no_spacing)
    add("rescale-slope-intercept", rescale)
    add("voi-lut-sequence", voi_lut_sequence)
    add("odd-rows-columns", odd_size)
    add("signed-16-bit", signed_16)
    add("frontal-and-lateral", frontal_and_lateral)
    add("two-frontals", two_frontals)
    add("multi-frame-sc", multi_frame, expect="skipped", reason=MULTIFRAME_GRAYSCALE_BYTE_SC)
    add("several-associations", several_associations, separate_associations=True)
    assert rg1.SOPClassUID == ComputedRadiographyImageStorage
    return variants
