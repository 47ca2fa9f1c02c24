"""Header parsing from received bytes, without pixel data."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.errors import InstanceRejected, MissingUIDError
from dicom_node.metadata import parse_header, read_header_file
from tests.support.dicom_files import make_dx


def _dataset_bytes(ds: pydicom.Dataset, ts: str) -> bytes:
    """Encode ``ds`` without file meta in transfer syntax ``ts``."""
    buf = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    dcmwrite(buf, ds, enforce_file_format=True)
    raw = buf.getvalue()
    # skip preamble + meta: the group length element value gives its size
    meta_len = int.from_bytes(raw[140:144], "little")
    return raw[144 + meta_len :]


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_parse_uncompressed(ts: str) -> None:
    ds = make_dx(None, view_position="AP", body_part="THORAX")
    ds.SeriesDescription = "chest ap"
    h = parse_header(_dataset_bytes(ds, ts), ts)
    assert h.sop_instance_uid == ds.SOPInstanceUID
    assert h.study_instance_uid == ds.StudyInstanceUID
    assert h.series_instance_uid == ds.SeriesInstanceUID
    assert h.sop_class_uid == ds.SOPClassUID
    assert (h.modality, h.body_part_examined, h.view_position) == ("DX", "THORAX", "AP")
    assert h.series_description == "chest ap"


def test_parse_deflated_and_file_like_rewound() -> None:
    ds = make_dx(None)
    raw = _dataset_bytes(ds, DeflatedExplicitVRLittleEndian)
    # the encoded data set is really deflated
    with pytest.raises(zlib.error):
        zlib.decompress(raw)
    fp = io.BytesIO(raw)
    fp.seek(17)
    h = parse_header(fp, DeflatedExplicitVRLittleEndian)
    assert h.sop_instance_uid == ds.SOPInstanceUID
    assert fp.tell() == 0


def test_pixel_data_is_not_read() -> None:
    ds = make_dx(None, rows=64, cols=64)
    raw = _dataset_bytes(ds, ExplicitVRLittleEndian)
    cut = raw[: raw.index(b"\xe0\x7f\x10\x00") + 4]  # stop inside the Pixel Data header
    assert parse_header(cut, ExplicitVRLittleEndian).sop_instance_uid == ds.SOPInstanceUID


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SOPClassUID"])
def test_missing_uid(keyword: str) -> None:
    ds = make_dx(None)
    study = ds.StudyInstanceUID
    delattr(ds, keyword)
    with pytest.raises(MissingUIDError, match=keyword) as info:
        parse_header(_dataset_bytes(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    expected = None if keyword == "StudyInstanceUID" else study
    assert info.value.study_instance_uid == expected


def test_garbage_is_rejected() -> None:
    with pytest.raises(InstanceRejected):
        parse_header(b"\x08\x00\x16\x00UI\xff\xff", ExplicitVRLittleEndian)
    with pytest.raises(InstanceRejected, match="unreadable"):
        parse_header(b"\x00" * 64, DeflatedExplicitVRLittleEndian)
    with pytest.raises(InstanceRejected):
        parse_header(b"", ExplicitVRLittleEndian)


def test_read_header_file(tmp_path: Path) -> None:
    ds = make_dx(tmp_path / "a.dcm", view_position="LL")
    assert read_header_file(tmp_path / "a.dcm").view_position == "LL"
    assert read_header_file(tmp_path / "a.dcm").sop_instance_uid == ds.SOPInstanceUID
    (tmp_path / "b.dcm").write_bytes(b"not dicom")
    with pytest.raises(InstanceRejected):
        read_header_file(tmp_path / "b.dcm")


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
def test_uid_cut_off_mid_value_is_rejected() -> None:
    ds = make_dx(None, rows=8, cols=8)
    ds.StudyInstanceUID = "1.2."  # what a data set truncated inside the UID leaves behind
    with pytest.raises(InstanceRejected, match="invalid StudyInstanceUID"):
        parse_header(_dataset_bytes(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)


@pytest.mark.filterwarnings("ignore:Found unknown escape sequence:UserWarning")
def test_control_characters_in_text_fields_become_spaces() -> None:
    ds = make_dx(None, rows=8, cols=8)
    ds.SeriesDescription = "chest\x1b[31m PA\x00"
    h = parse_header(_dataset_bytes(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert h.series_description == "chest [31m PA"


def test_deflated_header_is_inflated_only_as_far_as_needed() -> None:
    ds = make_dx(None, rows=8, cols=8)
    body = _dataset_bytes(ds, ExplicitVRLittleEndian)
    # a deflate stream that would expand to 512 MiB after the real header
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = packer.compress(body) + packer.compress(b"\0" * (512 * 2**20)) + packer.flush()
    assert len(bomb) < 2 * 2**20
    h = parse_header(bomb, DeflatedExplicitVRLittleEndian)
    assert h.sop_instance_uid == ds.SOPInstanceUID


class _CountingReader(io.BytesIO):
    """Counts the bytes read from it."""

    taken = 0

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self.taken += len(data)
        return data


def test_a_deflated_stream_is_read_only_as_far_as_the_header_needs() -> None:
    ds = make_dx(None, rows=8, cols=8)
    body = _dataset_bytes(ds, ExplicitVRLittleEndian)
    packer = zlib.compressobj(0, zlib.DEFLATED, -zlib.MAX_WBITS)  # stored: 1 byte in, 1 out
    stream = packer.compress(body) + packer.compress(b"\0" * (32 * 2**20)) + packer.flush()
    fp = _CountingReader(stream)
    h = parse_header(fp, DeflatedExplicitVRLittleEndian)
    assert h.sop_instance_uid == ds.SOPInstanceUID
    assert fp.taken < 5 * 2**20  # not the 32 MiB behind the header
    assert fp.tell() == 0
