"""The export cache of ``D2R_BACKEND=auto`` on the CPU: a checked ONNX export per checkpoint.

The **export cache** holds one entry per checkpoint hash, made once and shared by every worker
on the host::

    <cache>/<checkpoint sha256>/         export.json, 3 x (.onnx, .onnx.data), parity.json
    <cache>/<checkpoint sha256>.lock     taken while an entry is made (flock)
    <cache>/<checkpoint sha256>.failed   why the last export or parity check failed, and with
                                         which torch and onnxruntime: not retried with the same

An entry is made in a private folder beside it, checked against torch on probe images (the
same report text, the same lesion classes, boxes within 1 px, scores within 1e-3), and renamed
into place, so a reader only ever sees a whole, checked entry. ``parity.json`` records every
file's SHA-256; an entry whose files no longer match is corrupt and is made again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from model.backend_choice import CacheOutcome
from model.backends import ONNXRUNTIME

logger = logging.getLogger(__name__)

PARITY_FILE = "parity.json"
PARITY_FORMAT = "d2r-onnx-parity/1"
#: the largest difference of a box coordinate (source pixels) the parity check accepts
BOX_TOLERANCE_PX = 1.0
#: the largest difference of a lesion score the parity check accepts
SCORE_TOLERANCE = 1e-3


def runtime_versions() -> dict[str, str]:
    """The libraries an entry (or a failure) depends on."""
    import torch

    versions = {"torch": str(torch.__version__)}
    try:
        import onnxruntime

        versions["onnxruntime"] = str(onnxruntime.__version__)
    except ImportError:
        versions["onnxruntime"] = ""
    return versions


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_problem(entry: Path, checkpoint_sha256: str) -> str | None:
    """Why ``entry`` cannot be used for the checkpoint (None: it can).

    Checks ``export.json`` (format, graphs, checkpoint hash), ``parity.json`` (passed) and
    every file's SHA-256 against ``parity.json``.
    """
    from model.errors import ExportError
    from model.export import read_export

    if not entry.is_dir():
        return "absent"
    try:
        read_export(entry, checkpoint_sha256=checkpoint_sha256)
    except ExportError as e:
        return str(e)
    try:
        parity = json.loads((entry / PARITY_FILE).read_text())
        files = parity["files"]
        passed = parity["format"] == PARITY_FORMAT and parity["passed"] is True
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{PARITY_FILE}: unreadable ({type(e).__name__})"
    if not passed or not isinstance(files, dict):
        return f"{PARITY_FILE}: not a passed check"
    for name, digest in files.items():
        file = entry / str(name)
        if not file.is_file() or _sha256(file) != digest:
            return f"{name}: missing or changed since it was checked"
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (released when the process dies)."""
    with path.open("a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _recorded_failure(marker: Path, versions: dict[str, str]) -> dict[str, Any] | None:
    """The failure recorded for these library versions, or None."""
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("versions") != versions:
        return None
    return data


def prepare_export(checkpoint_dir: Path, checkpoint_sha256: str, cache_dir: Path) -> CacheOutcome:
    """The checked ONNX export of the checkpoint in ``cache_dir``, made now if needed.

    Safe for several processes at once: one makes the entry under the lock, the others wait
    and use it. A failure is recorded and not retried until torch or onnxruntime change.
    Never raises for an export or parity problem: the outcome says why there is no entry.
    """
    entry = cache_dir / checkpoint_sha256
    if entry_problem(entry, checkpoint_sha256) is None:
        return CacheOutcome(entry)
    versions = runtime_versions()
    if not versions["onnxruntime"]:
        return CacheOutcome(
            None, fallback="onnxruntime_missing", detail="onnxruntime not installed"
        )
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return CacheOutcome(None, fallback="cache_unusable", detail=f"{cache_dir}: {e.strerror}")
    try:
        with _locked(cache_dir / f"{checkpoint_sha256}.lock"):
            return _prepare_locked(checkpoint_dir, checkpoint_sha256, cache_dir, versions)
    except OSError as e:  # a read-only or full cache folder: run torch, say why
        return CacheOutcome(None, fallback="cache_unusable", detail=f"{cache_dir}: {e}")


def _prepare_locked(
    checkpoint_dir: Path, checkpoint_sha256: str, cache_dir: Path, versions: dict[str, str]
) -> CacheOutcome:
    """:func:`prepare_export` under the entry's lock: re-check, recorded failure, make."""
    entry = cache_dir / checkpoint_sha256
    marker = cache_dir / f"{checkpoint_sha256}.failed"
    problem = entry_problem(entry, checkpoint_sha256)
    if problem is None:  # another process made it while this one waited
        return CacheOutcome(entry)
    failure = _recorded_failure(marker, versions)
    if failure is not None:
        return CacheOutcome(None, fallback=str(failure["fallback"]), detail=str(failure["detail"]))
    if entry.exists():
        logger.warning("export cache entry %s is unusable (%s); making it again", entry, problem)
        shutil.rmtree(entry, ignore_errors=True)
    work = cache_dir / f".{checkpoint_sha256}.{os.getpid()}.partial"
    shutil.rmtree(work, ignore_errors=True)
    try:
        fallback, detail = _make_entry(checkpoint_dir, checkpoint_sha256, work, versions)
        if fallback is None:
            os.rename(work, entry)
            marker.unlink(missing_ok=True)
            return CacheOutcome(entry, created=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.warning("D2R_BACKEND=auto cannot use onnxruntime for %s: %s", entry.name[:12], detail)
    failed = {"fallback": fallback, "detail": detail, "versions": versions}
    failed["recorded"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    marker.write_text(json.dumps(failed, indent=1) + "\n")
    return CacheOutcome(None, fallback=fallback, detail=detail)


def _make_entry(
    checkpoint_dir: Path, checkpoint_sha256: str, work: Path, versions: dict[str, str]
) -> tuple[str | None, str]:
    """Export into ``work`` and check it: ``(None, "")``, or the fallback reason and why."""
    import warnings

    from model.export import export_checkpoint

    try:
        with warnings.catch_warnings():  # the exporter's notes on axis names are not news here
            warnings.simplefilter("ignore")
            manifest = export_checkpoint(checkpoint_dir, work)
    except Exception as e:  # any exporter failure is a reason to run torch, not to stop
        return "export_failed", f"ONNX export failed: {type(e).__name__}: {str(e)[:200]}"
    if manifest.get("checkpoint_sha256") != checkpoint_sha256:
        return "export_failed", "the checkpoint changed while it was exported"
    try:
        problem = parity_problem(checkpoint_dir, work)
    except Exception as e:  # an export that cannot even run the probes fails its check
        problem = f"the export does not run: {type(e).__name__}: {str(e)[:200]}"
    if problem is not None:
        return "parity_failed", f"parity check against torch failed: {problem}"
    files = {p.name: _sha256(p) for p in sorted(work.iterdir()) if p.is_file()}
    record = {
        "format": PARITY_FORMAT,
        "passed": True,
        "probes": len(probe_images()),
        "box_tolerance_px": BOX_TOLERANCE_PX,
        "score_tolerance": SCORE_TOLERANCE,
        "versions": versions,
        "files": files,
        "checked": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    (work / PARITY_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return None, ""


# --------------------------------------------------------------------------- the parity check


def probe_images(rows: int = 512, columns: int = 416) -> list[Any]:
    """Deterministic chest-like DX images (``pydicom.Dataset``) the parity check runs on: a
    bright mediastinum between two darker lung fields, with seeded noise and nodules."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    images = []
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        body = 2600.0 - 900.0 * np.abs(x / columns - 0.5)
        for cx in (0.3, 0.7):
            lung = ((x / columns - cx) / 0.17) ** 2 + ((y / rows - 0.45) / 0.33) ** 2 < 1.0
            body = np.where(lung, body - 1300.0, body)
        for _ in range(3 + seed):
            nx, ny, r = rng.uniform(0.2, 0.8), rng.uniform(0.25, 0.7), rng.uniform(0.02, 0.05)
            spot = ((x / columns - nx) ** 2 + (y / rows - ny) ** 2) < r**2
            body = np.where(spot, body + 700.0, body)
        pixels = np.clip(body + rng.normal(0, 60, body.shape), 0, 4095).astype(np.uint16)
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image, For Presentation
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["d2r parity probe", str(seed)])
        ds.Modality = "DX"
        ds.ViewPosition = "PA"
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        images.append(ds)
    return images


def parity_problem(checkpoint_dir: Path, export_dir: Path) -> str | None:
    """How the export's predictions differ from torch's on :func:`probe_images` (None: they
    agree: the same report text, the same lesion classes, boxes within
    :data:`BOX_TOLERANCE_PX`, scores within :data:`SCORE_TOLERANCE`, for every box the detector
    keeps at a score threshold of 0)."""
    from model.backends import create_backend
    from model.checkpoint import load_checkpoint
    from model.predict import Predictor

    ckpt = load_checkpoint(Path(checkpoint_dir))
    # every box the detector proposes is compared, not only those above the serving threshold
    torch_side = Predictor(ckpt, input_gate=False, lesion_score_threshold=0.0)
    try:
        onnx = create_backend(
            ONNXRUNTIME, ckpt.model, checkpoint_sha256=ckpt.sha256, engine_dir=export_dir
        )
    except Exception as e:
        return f"the export does not load: {type(e).__name__}: {str(e)[:200]}"
    onnx_side = Predictor(ckpt, backend=onnx, input_gate=False, lesion_score_threshold=0.0)
    for index, probe in enumerate(probe_images()):
        expected = torch_side.predict([probe])
        got = onnx_side.predict([probe])
        if (got.findings, got.impression) != (expected.findings, expected.impression):
            return f"probe {index}: the report text differs"
        if [le.class_name for le in got.lesions] != [le.class_name for le in expected.lesions]:
            return f"probe {index}: the lesion classes differ"
        for a, b in zip(got.lesions, expected.lesions, strict=True):
            moved = max(abs(u - v) for u, v in zip(a.box, b.box, strict=True))
            if moved > BOX_TOLERANCE_PX:
                return f"probe {index}: a {a.class_name} box moved {moved:.2f} px"
            if abs(a.score - b.score) > SCORE_TOLERANCE:
                return f"probe {index}: a {a.class_name} score differs by {a.score - b.score:.4f}"
    return None


__all__ = [
    "BOX_TOLERANCE_PX",
    "PARITY_FILE",
    "SCORE_TOLERANCE",
    "entry_problem",
    "parity_problem",
    "prepare_export",
    "probe_images",
    "runtime_versions",
]
