"""Hostile and malformed instances against the real listener, then through the real pipeline.

Each instance gets a specific failure status, or is stored and later refused by the worker with
a recorded reason; the listener never crashes and keeps accepting (a normal store succeeds after
every case). Bytes are sent raw (pynetdicom's chunked send: only the File Meta is read).

pydicom reports malformed values as ``UserWarning``; in production those are log lines, so they
are ignored here too (the suite otherwise turns warnings into errors, also in listener threads).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE, _config

from d2r_core import statuses
from dicom_node.ingest import STORAGE_SOP_CLASSES
from dicom_node.selection import select_images
from dicom_node.spool import dataset_offset
from tests.security import hostile
from tests.security.listener import AE_TITLE, Listener, running_listener
from tests.support.dicom_files import make_dx

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::UserWarning:pydicom"),
]

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

Maker = Callable[[Path], tuple[Path, Dataset]]

#: case -> the status the listener must answer
REFUSED: dict[str, tuple[Maker, int]] = {
    "truncated-header": (hostile.truncated_header, statuses.CANNOT_UNDERSTAND),
    "garbage": (hostile.garbage, statuses.CANNOT_UNDERSTAND),
    "missing-sop-instance-uid": (hostile.missing_sop_instance_uid, statuses.CANNOT_UNDERSTAND),
    "missing-study-uid": (hostile.missing_study_uid, statuses.CANNOT_UNDERSTAND),
    "wrong-vr": (hostile.wrong_vr, statuses.CANNOT_UNDERSTAND),
}
#: stored as received (the header is usable); the worker refuses them later
STORED: dict[str, Maker] = {
    "pixel-data-short": hostile.pixel_data_short,
    "pixel-data-truncated": hostile.pixel_data_truncated,
    "unsupported-photometric": hostile.unsupported_photometric,
    "decompression-bomb": hostile.decompression_bomb,
    "odd-text": hostile.odd_text,
    "non-image": hostile.non_image,
}


@contextmanager
def raw_sends() -> Iterator[None]:
    """Send files as bytes (pynetdicom global, restored after)."""
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved


def send_raw(port: int, path: Path) -> int:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    for sop_class in [*STORAGE_SOP_CLASSES[:4], BASIC_TEXT_SR]:
        for syntax in (ExplicitVRLittleEndian, RLELossless):
            ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        with raw_sends():
            response = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert "Status" in response, "no response: the listener dropped the association"
    return int(response.Status)


def assert_still_accepting(node: Listener, tmp: Path) -> None:
    normal = make_dx(tmp / f"normal-{len(list(tmp.iterdir()))}.dcm", rows=32, cols=32)
    path = tmp / f"normal-{normal.SOPInstanceUID}.dcm"
    normal.save_as(path, enforce_file_format=True)
    assert send_raw(node.port, path) == statuses.SUCCESS
    assert [i.sop_instance_uid for i in node.store.instances(normal.StudyInstanceUID)] == [
        normal.SOPInstanceUID
    ]


def test_refused_instances_get_a_specific_status(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    with running_listener(tmp_path) as node:
        for name, (make, expected) in REFUSED.items():
            path, _ = make(files)
            assert send_raw(node.port, path) == expected, name
            assert_still_accepting(node, files)
        reasons = [r["reason"] for r in node.store.rejections()]
        assert len(reasons) == len(REFUSED)
        assert all(reasons), reasons
        assert not list((node.spool.root / "tmp").iterdir())  # no partial files left


def test_stored_instances_are_kept_byte_for_byte(tmp_path: Path) -> None:
    files = tmp_path / "files"
    files.mkdir()
    with running_listener(tmp_path) as node:
        for name, make in STORED.items():
            path, ds = make(files)
            assert send_raw(node.port, path) == statuses.SUCCESS, name
            (record,) = node.store.instances(ds.StudyInstanceUID)
            stored, sent = Path(record.path).read_bytes(), path.read_bytes()
            assert stored[dataset_offset(stored) :] == sent[dataset_offset(sent) :], name
            assert Path(record.path).resolve().is_relative_to(node.spool.root.resolve())
            assert_still_accepting(node, files)
        odd = [
            i
            for uid in {i.study_instance_uid for i in _all_instances(node)}
            for i in node.store.instances(uid)
            if i.series_description.startswith("PA")
        ]
        assert len(odd) == 1 and odd[0].body_part_examined.startswith("CHEST")
        (sr,) = [i for i in _all_instances(node) if i.sop_class_uid == BASIC_TEXT_SR]
        assert select_images([sr]).skip_reason  # stored, then skipped with a reason


def _all_instances(node: Listener) -> list:  # type: ignore[type-arg]
    studies = node.store.recent(limit=1000)
    return [i for s in studies for i in node.store.instances(s.study_instance_uid)]


def test_control_characters_do_not_reach_the_records(tmp_path: Path) -> None:
    from dicom_node.metadata import read_header_file

    path, _ = hostile.odd_text(tmp_path)
    header = read_header_file(path)
    for text in (header.series_description, header.body_part_examined):
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text), repr(text)


def _no_sr(content: Any) -> list[Dataset]:
    raise AssertionError("a refused image must never reach the report builder")


@pytest.fixture(scope="module")
def predictor(model_dir: Path):  # type: ignore[no-untyped-def]
    import torch

    torch.set_num_threads(1)
    from model.predict import Predictor

    return Predictor.from_checkpoint(model_dir, input_gate=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("pixel-data-short", "cannot decode the image"),
        ("pixel-data-truncated", "cannot"),
        ("unsupported-photometric", "PhotometricInterpretation 'PALETTE COLOR' is unsupported"),
    ],
)
def test_worker_refuses_undecodable_images_with_a_reason(
    predictor: Any, name: str, reason: str, tmp_path: Path
) -> None:
    from dicom_node.instance_file import read_instance
    from dicom_node.settings import DEFAULT_MAX_PIXEL_BYTES
    from worker import pipeline
    from worker.errors import InputRejected
    from worker.messages import JobInstance, ReportJob

    path, ds = STORED[name](tmp_path)
    job = ReportJob(
        study_instance_uid=ds.StudyInstanceUID,
        generation=1,
        instances=(JobInstance(ds.SOPInstanceUID, ds.SOPClassUID, str(path)),),
        queued_at=0.0,
    )
    with pytest.raises(InputRejected) as info:
        pipeline.run(
            job,
            read_image=functools.partial(read_instance, max_pixel_bytes=DEFAULT_MAX_PIXEL_BYTES),
            predict=predictor.predict,
            build_reports=_no_sr,
        )
    assert reason in str(info.value)


def test_decompression_bomb_is_refused_before_allocating(tmp_path: Path) -> None:
    import tracemalloc

    from model.errors import PreprocessError
    from model.preprocess import DicomToFloat

    path, _ = hostile.decompression_bomb(tmp_path)
    ds = pydicom.dcmread(path)
    tracemalloc.start()
    try:
        with pytest.raises(PreprocessError):
            DicomToFloat()(ds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 2**20, f"{peak / 2**30:.1f} GiB allocated before refusing"
