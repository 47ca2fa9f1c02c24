"""Bounded memory wherever d2r reads a stored instance (:mod:`dicom_node.instance_file`).

A Deflated data set of zeros declaring 8192 x 8192 16-bit pixels is 128 KiB on disk and 128 MiB
inflated; pydicom's own reader inflates it whole (and decoding it costs as much again). The
reader refuses it from the header before inflating the pixels, the status page shows its patient
label and no preview, the worker fails its study with the sizes in the reason, and the peak
resident memory of a process doing each of these grows by a few megabytes at most.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless

from d2r_core.errors import ConfigError
from dicom_node.errors import InstanceRejected, PixelDataTooLarge
from dicom_node.instance_file import (
    MAX_HEADER_BYTES,
    check_pixel_data_size,
    declared_pixel_bytes,
    read_instance,
    read_instance_header,
)
from dicom_node.settings import DEFAULT_MAX_PIXEL_BYTES, MAX_PIXEL_BYTES_CEILING, NodeSettings
from studydb.store import StudyStore
from tests.observability.conftest import record_for
from tests.support.dicom_files import make_dx, make_sc, rg1_path
from tests.support.header_variants import build_corpus

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
BOMB_SIDE = 8192  # 8192 x 8192 x 16 bits: 128 MiB of pixel data


# ----------------------------------------------------------------------------- crafting
def write_deflated(
    path: Path,
    ds: Dataset,
    *,
    pixel_bytes: int,
    before_pixels: tuple[int, int] | None = None,
) -> Path:
    """A Deflated Part 10 file of ``ds`` followed by ``pixel_bytes`` zero bytes of Pixel Data
    (OW), streamed through the compressor so the zeros never sit in memory; ``before_pixels``
    ``(tag, length)`` adds a zero-filled OB element just before Pixel Data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = io.BytesIO()
    fp = DicomFileLike(body)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = io.BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(DicomFileLike(out), meta, enforce_standard=True)
    out.write(compressor.compress(body.getvalue()))

    def zeros(tag: int, vr: bytes, length: int) -> None:
        out.write(
            compressor.compress(struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, length))
        )
        chunk = bytes(MIB)
        for start in range(0, length, MIB):
            out.write(compressor.compress(chunk[: min(MIB, length - start)]))

    if before_pixels is not None:
        zeros(before_pixels[0], b"OB", before_pixels[1])
    zeros(0x7FE00010, b"OW", pixel_bytes)
    out.write(compressor.flush())
    path.write_bytes(out.getvalue())
    return path


def _header(rows: int, cols: int) -> Dataset:
    """A DX header (no Pixel Data) declaring ``rows`` x ``cols`` 16-bit pixels."""
    ds = make_dx(None, rows=16, cols=16)
    del ds.PixelData
    del ds.file_meta
    ds.Rows, ds.Columns = rows, cols
    return ds


def deflate_bomb(folder: Path) -> tuple[Path, Dataset]:
    """128 KiB on disk: 8192 x 8192 16-bit zeros, Deflated."""
    ds = _header(BOMB_SIDE, BOMB_SIDE)
    path = write_deflated(folder / "deflate-bomb.dcm", ds, pixel_bytes=BOMB_SIDE * BOMB_SIDE * 2)
    return path, ds


def deflated_copy(src: Path, dst: Path) -> Path:
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    return deflate_bomb(tmp_path_factory.mktemp("bomb"))


def _traced_peak(func: Any) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        try:
            result: Any = func()
        except Exception as exc:  # returned, to be asserted on
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ----------------------------------------------------------------------------- reader
def test_bomb_is_refused_from_its_header_before_inflating(bomb: tuple[Path, Dataset]) -> None:
    path, ds = bomb
    assert path.stat().st_size < 256 * 1024
    refused, peak = _traced_peak(
        lambda: read_instance(path, max_pixel_bytes=DEFAULT_MAX_PIXEL_BYTES)
    )
    assert isinstance(refused, PixelDataTooLarge), refused
    message = str(refused)
    assert f"{BOMB_SIDE} x {BOMB_SIDE}" in message and str(BOMB_SIDE * BOMB_SIDE * 2) in message
    assert str(DEFAULT_MAX_PIXEL_BYTES) in message and "D2R_MAX_PIXEL_BYTES" in message
    for phi in (str(ds.PatientName), str(ds.PatientID), "SYNTHETIC"):
        assert phi not in message
    assert peak < 4 * MIB, f"{peak / MIB:.1f} MiB allocated before refusing"


def test_header_of_the_bomb_is_read_without_inflating_its_pixels(
    bomb: tuple[Path, Dataset],
) -> None:
    path, ds = bomb
    header, peak = _traced_peak(lambda: read_instance_header(path))
    assert isinstance(header, Dataset), header
    assert "PixelData" not in header
    assert (header.PatientName, header.PatientID) == (ds.PatientName, ds.PatientID)
    assert header.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert peak < 4 * MIB, f"{peak / MIB:.1f} MiB allocated for a header"
    # what pydicom's own reader costs for the same header: the whole file inflated
    _, unbounded = _traced_peak(lambda: pydicom.dcmread(path, stop_before_pixels=True))
    assert unbounded > 100 * MIB


def test_a_header_that_understates_deflated_pixel_data_is_refused_by_the_inflation_cap(
    tmp_path: Path,
) -> None:
    """Declares 64 x 64 pixels (8 KiB) but holds 64 MiB: inflation stops at the limit."""
    path = write_deflated(tmp_path / "liar.dcm", _header(64, 64), pixel_bytes=64 * MIB)
    limit = MIB
    refused, peak = _traced_peak(lambda: read_instance(path, max_pixel_bytes=limit))
    assert isinstance(refused, PixelDataTooLarge), refused
    assert str(limit + MAX_HEADER_BYTES) in str(refused)
    assert peak < 3 * (limit + MAX_HEADER_BYTES), f"{peak / MIB:.1f} MiB"


def test_a_deflated_header_larger_than_the_header_cap_is_refused(tmp_path: Path) -> None:
    """64 MiB of a private element before Pixel Data: not a header worth inflating."""
    ds = _header(64, 64)
    ds.add_new(0x00090010, "LO", "HOSTILE")
    path = write_deflated(
        tmp_path / "fat-header.dcm",
        ds,
        pixel_bytes=64 * 64 * 2,
        before_pixels=(0x00091000, 64 * MIB),
    )
    refused, peak = _traced_peak(lambda: read_instance_header(path))
    assert isinstance(refused, InstanceRejected), refused
    assert str(MAX_HEADER_BYTES) in str(refused)
    assert peak < 3 * MAX_HEADER_BYTES


def test_a_native_file_larger_than_the_limit_is_refused_unread(tmp_path: Path) -> None:
    """Uncompressed Pixel Data longer than its header says (and than the limit)."""
    ds = make_dx(None, rows=64, cols=64)
    ds.PixelData = bytes(8 * MIB)
    path = tmp_path / "long-pixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    refused, peak = _traced_peak(lambda: read_instance(path, max_pixel_bytes=MIB))
    assert isinstance(refused, PixelDataTooLarge), refused
    assert "file of" in str(refused)
    assert peak < 2 * MIB


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless])
def test_a_codestream_larger_than_its_header_is_refused_before_decoding(
    syntax: UID, tmp_path: Path
) -> None:
    """The decoder sizes its output from the codestream: a 16 x 16 header over a 64 x 48
    codestream (a 60000 x 60000 one would cost gigabytes) is refused; the true header passes."""
    ds = make_dx(None, rows=64, cols=48)
    ds.compress(syntax)
    honest = tmp_path / "honest.dcm"
    ds.save_as(honest, enforce_file_format=True)
    read = read_instance(honest, max_pixel_bytes=DEFAULT_MAX_PIXEL_BYTES)
    assert read.pixel_array.shape == (64, 48)
    ds.Rows = ds.Columns = 16
    liar = tmp_path / "liar.dcm"
    ds.save_as(liar, enforce_file_format=True)
    with pytest.raises(
        PixelDataTooLarge, match="frame 1 declares 64 x 48 pixels in its codestream"
    ):
        read_instance(liar, max_pixel_bytes=DEFAULT_MAX_PIXEL_BYTES)


def test_real_and_variant_images_read_as_pydicom_reads_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real RG1 chest CR (MONOCHROME1), native and Deflated, and the header-variant corpus
    (SC, RGB, YBR JPEG, multi-frame, signed): the same elements and pixels as pydicom."""
    # the corpus holds values invalid for their VR on purpose (a Patient's Age "51"): comparing
    # elements reads them, which must not warn here
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    files = [rg1_path(), deflated_copy(rg1_path(), tmp_path / "rg1-deflated.dcm")]
    for variant in build_corpus(tmp_path / "corpus"):
        files.extend(variant.files)
    sc = make_sc(tmp_path / "sc.dcm")
    files.append(deflated_copy(tmp_path / "sc.dcm", tmp_path / "sc-deflated.dcm"))
    assert sc.Modality == "OT"
    photometrics, frames = set(), set()
    for path in files:
        expected = pydicom.dcmread(path)
        got = read_instance(path, max_pixel_bytes=DEFAULT_MAX_PIXEL_BYTES)
        assert got == expected, path.name
        assert got.file_meta.TransferSyntaxUID == expected.file_meta.TransferSyntaxUID
        if "PixelData" in expected:
            assert np.array_equal(got.pixel_array, expected.pixel_array), path.name
            assert declared_pixel_bytes(got) == check_pixel_data_size(got, DEFAULT_MAX_PIXEL_BYTES)
        header = read_instance_header(path)
        assert "PixelData" not in header
        assert header == pydicom.dcmread(path, stop_before_pixels=True), path.name
        photometrics.add(str(expected.get("PhotometricInterpretation", "")))
        frames.add(int(expected.get("NumberOfFrames") or 1))
    assert {"MONOCHROME1", "MONOCHROME2", "RGB"} <= photometrics
    assert max(frames) > 1
    rg1 = read_instance(rg1_path(), max_pixel_bytes=DEFAULT_MAX_PIXEL_BYTES)
    assert declared_pixel_bytes(rg1) == 1955 * 1841 * 2


def test_declared_size_counts_frames_samples_and_bits() -> None:
    ds = Dataset()
    ds.Rows, ds.Columns, ds.BitsAllocated = 100, 80, 16
    assert declared_pixel_bytes(ds) == 100 * 80 * 2
    ds.NumberOfFrames = 3
    ds.SamplesPerPixel = 3
    ds.BitsAllocated = 8
    assert declared_pixel_bytes(ds) == 100 * 80 * 3 * 3
    assert check_pixel_data_size(ds, 100 * 80 * 9) == 100 * 80 * 9
    with pytest.raises(PixelDataTooLarge, match="3 frame\\(s\\), 3 sample\\(s\\) of 8 bits"):
        check_pixel_data_size(ds, 100 * 80 * 9 - 1)
    ds.BitsAllocated = 1
    ds.NumberOfFrames, ds.SamplesPerPixel = 1, 1
    assert declared_pixel_bytes(ds) == 100 * 80 // 8
    assert declared_pixel_bytes(Dataset()) == 0  # no image: nothing to bound
    ds.add_new(0x00280008, "LO", "many")  # Number of Frames, under a VR that lets it say so
    with pytest.raises(InstanceRejected, match="image size"):
        declared_pixel_bytes(ds)


def test_the_setting_is_bounded_and_admits_a_large_chest_detector() -> None:
    assert NodeSettings().max_pixel_bytes == DEFAULT_MAX_PIXEL_BYTES
    assert NodeSettings.from_env({}).max_pixel_bytes == DEFAULT_MAX_PIXEL_BYTES
    assert NodeSettings.from_env({"D2R_MAX_PIXEL_BYTES": "8388608"}).max_pixel_bytes == 8 * MIB
    for bad in ("0", "1000", str(MAX_PIXEL_BYTES_CEILING + 1), "lots"):
        with pytest.raises(ConfigError, match="^D2R_MAX_PIXEL_BYTES: "):
            NodeSettings.from_env({"D2R_MAX_PIXEL_BYTES": bad})
    chest = Dataset()
    chest.Rows, chest.Columns, chest.BitsAllocated = 4300, 4300, 16
    check_pixel_data_size(chest, DEFAULT_MAX_PIXEL_BYTES)
    chest.Rows, chest.Columns, chest.SamplesPerPixel, chest.BitsAllocated = 3000, 3000, 3, 8
    check_pixel_data_size(chest, DEFAULT_MAX_PIXEL_BYTES)  # an RGB scan of a film


# ------------------------------------------------------------------ peak memory (VmHWM)
_MEASURE = """
import gc, json, sys
from dicom_node.instance_file import read_instance
from dicom_node.settings import DEFAULT_MAX_PIXEL_BYTES
from studydb.store import StudyStore
from observability.pages import StatusPages
from model.preprocess import Preprocessor

def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

url, study, path = sys.argv[1:4]
pages = StatusPages(StudyStore(url), show_phi=True)
pages.store.recent(1)
operations = {
    "index": pages.index,
    "preview": lambda: pages.preview(study),
    "worker-read": lambda: read_instance(path, max_pixel_bytes=DEFAULT_MAX_PIXEL_BYTES),
    "worker-preprocess": lambda: Preprocessor(512).sample(
        read_instance(path, max_pixel_bytes=DEFAULT_MAX_PIXEL_BYTES)
    ),
}
growth = {}
for name, operation in operations.items():
    gc.collect()
    reset()
    base = hwm()
    try:
        result = operation()
        outcome = "none" if result is None else type(result).__name__
    except Exception as exc:
        outcome = type(exc).__name__
    growth[name] = [(hwm() - base) / 1024, outcome]
print(json.dumps(growth))
"""


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _stored(store: StudyStore, path: Path) -> str:
    header = read_instance_header(path)
    store.record_instance(record_for(header, path), outcome="stored")
    return str(header.StudyInstanceUID)


def _peak_growth(url: str, study: str, path: Path) -> dict[str, list[Any]]:
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, url, study, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dict(json.loads(run.stdout.splitlines()[-1]))


@pytest.mark.skipif(not _can_reset_peak(), reason="no /proc/PID/clear_refs")
def test_peak_memory_of_the_status_page_and_the_worker_read(
    bomb: tuple[Path, Dataset], tmp_path: Path
) -> None:
    """Peak RSS growth (VmHWM after clear_refs) of the PHI index, the preview and the worker's
    read. Unbounded, the bomb cost 256 MiB (index), 1.2 GiB (preview) and 257 MiB (read)."""
    url = f"sqlite:///{tmp_path / 'd2r.db'}"
    store = StudyStore(url)
    try:
        bomb_study = _stored(store, bomb[0])
        rg1 = deflated_copy(rg1_path(), tmp_path / "rg1.dcm")
        rg1_study = _stored(store, rg1)
    finally:
        store.close()
    growth = _peak_growth(url, bomb_study, bomb[0])
    assert growth["index"][1] == "str" and growth["index"][0] < 32, growth
    assert growth["preview"] == [growth["preview"][0], "none"] and growth["preview"][0] < 32, growth
    assert growth["worker-read"][1] == "PixelDataTooLarge" and growth["worker-read"][0] < 32, growth
    # the real chest CR (7 MB of pixels) still gets its preview, within a few times its size
    growth = _peak_growth(url, rg1_study, rg1)
    assert growth["preview"][1] == "bytes" and growth["preview"][0] < 64, growth
    assert growth["worker-read"][1] == "FileDataset", growth


@pytest.mark.skipif(not _can_reset_peak(), reason="no /proc/PID/clear_refs")
def test_the_largest_allowed_image_stays_under_200_mib(tmp_path: Path) -> None:
    """An image of exactly D2R_MAX_PIXEL_BYTES (5120 x 4096, 16 bits), Deflated: its preview in
    the node and its read and preprocessing in the worker."""
    ds = make_dx(None, rows=16, cols=16)
    ds.Rows, ds.Columns = 5120, 4096
    assert declared_pixel_bytes(ds) == DEFAULT_MAX_PIXEL_BYTES
    ds.PixelData = np.random.default_rng(0).integers(0, 4096, 5120 * 4096, np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "largest.dcm"
    ds.save_as(path, enforce_file_format=True)
    del ds
    url = f"sqlite:///{tmp_path / 'd2r.db'}"
    store = StudyStore(url)
    try:
        study = _stored(store, path)
    finally:
        store.close()
    growth = _peak_growth(url, study, path)
    assert growth["preview"][1] == "bytes" and growth["preview"][0] < 200, growth
    assert growth["worker-preprocess"][1] == "ImageSample", growth
    assert growth["worker-preprocess"][0] < 200, growth


# ----------------------------------------------------------- status page, real server
_SERVE = """
import sys, time
from studydb.store import StudyStore
from observability.http import ObservabilityServer
from observability.metrics import build_registry
from observability.pages import StatusPages

store = StudyStore(sys.argv[1])
pages = StatusPages(store, show_phi=True)
server = ObservabilityServer(
    "127.0.0.1", 0, registry=build_registry(None), health={}, ready={}, pages=pages
).start()
print(server.port, flush=True)
sys.stdin.read()  # until the test closes it
server.stop()
"""


def _vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


@pytest.fixture
def status_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, StudyStore]]:
    url = f"sqlite:///{tmp_path / 'd2r.db'}"
    store = StudyStore(url)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE, url],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield proc, port, store
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        store.close()


@pytest.mark.integration
def test_status_page_serves_the_bomb_study_bounded_and_stays_up(
    status_server: tuple[subprocess.Popen[str], int, StudyStore],
    bomb: tuple[Path, Dataset],
    tmp_path: Path,
) -> None:
    """``GET /`` with PHI shows the bomb study's patient label (from its header); its preview
    is refused with 404 (no preview); a normal study's preview still renders; the process stays
    up with its peak memory within a few megabytes."""
    proc, port, store = status_server
    path, ds = bomb
    bomb_study = _stored(store, path)
    normal = make_dx(tmp_path / "normal.dcm")
    normal_study = _stored(store, tmp_path / "normal.dcm")
    status, _, _ = _get(port, "/healthz")
    assert status == 200
    can_reset = _can_reset_peak()
    if can_reset:
        with open(f"/proc/{proc.pid}/clear_refs", "w") as f:
            f.write("5")
    base = _vm_hwm(proc.pid)
    status, kind, body = _get(port, "/")
    assert status == 200 and kind.startswith("text/html")
    page = body.decode()
    assert bomb_study in page and str(ds.PatientID) in page and str(normal.PatientID) in page
    status, kind, body = _get(port, f"/studies/{bomb_study}/preview.png")
    assert status == 404, (status, body[:200])
    status, _, body = _get(port, f"/studies/{bomb_study}")
    assert status == 200 and b"preview.png" in body
    grown_mib = (_vm_hwm(proc.pid) - base) / 1024
    status, kind, body = _get(port, f"/studies/{normal_study}/preview.png")
    assert status == 200 and kind == "image/png" and body.startswith(b"\x89PNG")
    time.sleep(0.1)
    assert proc.poll() is None, "the status page process died"
    status, _, _ = _get(port, "/healthz")
    assert status == 200
    if can_reset:
        assert grown_mib < 32, f"peak RSS grew by {grown_mib:.0f} MiB serving the bomb study"


# ------------------------------------------------------------------------ worker path
class _NeverPredicts:
    name, version, parameters = "d2r-test", "0", ()

    def predict(self, *_: Any, **__: Any) -> Any:
        raise AssertionError("an image over the limit must never reach the model")

    def predict_batch(self, *_: Any, **__: Any) -> Any:
        raise AssertionError("an image over the limit must never reach the model")


@pytest.mark.parametrize("batch_max", ["1", "2"])
def test_worker_fails_the_bomb_study_with_the_limit_in_its_reason(
    bomb: tuple[Path, Dataset], tmp_path: Path, batch_max: str
) -> None:
    from celery import Celery

    from worker import tasks
    from worker.messages import JobInstance, ReportJob
    from worker.settings import WorkerSettings

    class Context(tasks.WorkerContext):
        @property
        def predictor(self) -> Any:
            return _NeverPredicts()

    settings = WorkerSettings.from_env(
        {
            "D2R_SPOOL_DIR": str(tmp_path / "spool"),
            "D2R_DATABASE_URL": f"sqlite:///{tmp_path / 'd2r.db'}",
            "D2R_BATCH_MAX": batch_max,
            "D2R_MAX_PIXEL_BYTES": str(32 * MIB),
        }
    )
    ctx = Context(settings)
    store = ctx.store
    path, ds = bomb
    study = _stored(store, path)
    generation = store.mark_queued(study)
    job = ReportJob(
        study_instance_uid=study,
        generation=generation,
        instances=(JobInstance(ds.SOPInstanceUID, ds.SOPClassUID, str(path)),),
        queued_at=time.time(),
    )
    outcome = tasks.report_study(ctx, Celery("d2r-test"), job.to_dict(), "task-1")
    assert outcome == "failed"
    view = store.get(study)
    assert view is not None and view.state == "failed"
    assert view.reason is not None
    assert f"{BOMB_SIDE} x {BOMB_SIDE}" in view.reason
    assert f"limit of {32 * MIB} bytes" in view.reason and "D2R_MAX_PIXEL_BYTES" in view.reason
    assert str(ds.PatientID) not in view.reason and "SYNTHETIC" not in view.reason
    store.close()


def test_d2r_predict_refuses_the_bomb_as_an_unreadable_file(
    bomb: tuple[Path, Dataset], tmp_path: Path
) -> None:
    """``d2r predict`` says why, names the file, and exits as for any unreadable input."""
    run = subprocess.run(
        [sys.executable, "-m", "cli.main", "predict", "--model", str(tmp_path), str(bomb[0])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "D2R_MAX_PIXEL_BYTES": str(16 * MIB)},
    )
    assert run.returncode == 2, run.stderr
    assert str(bomb[0]) in run.stderr and "D2R_MAX_PIXEL_BYTES" in run.stderr
    assert f"limit of {16 * MIB} bytes" in run.stderr
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not a DICOM file")
    run = subprocess.run(
        [sys.executable, "-m", "cli.main", "predict", "--model", str(tmp_path), str(garbage)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "not a readable DICOM file" in run.stderr, run.stderr


def test_the_routing_header_of_a_stored_bomb_is_read_bounded(bomb: tuple[Path, Dataset]) -> None:
    from dicom_node.metadata import read_header_file

    header, peak = _traced_peak(lambda: read_header_file(bomb[0]))
    assert header.study_instance_uid == bomb[1].StudyInstanceUID
    assert peak < 4 * MIB, f"{peak / MIB:.1f} MiB allocated for a routing header"
