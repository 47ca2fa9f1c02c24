"""Property-based fuzzing of the header parser and image selection (hypothesis).

Whatever bytes arrive, :func:`dicom_node.metadata.parse_header` either returns a header or raises
:class:`~dicom_node.errors.InstanceRejected` (which the listener maps to a status); anything else
would become a processing failure at best. Selection accepts any header values.

These run in every test run; the coverage-guided campaign (``fuzz/dicom_header.py``, run by
``tests/security/test_fuzz_campaign.py``) explores the same reader, and the preview, further.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.errors import InstanceRejected
from dicom_node.metadata import InstanceHeader, parse_header
from dicom_node.selection import select_images
from studydb.records import InstanceRecord
from tests.security.hostile import encode
from tests.support.dicom_files import make_dx

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")

SYNTAXES = st.sampled_from(
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
        "1.2.840.10008.1.2.4.50",
        "9.9.9",
    ]
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_header_bytes() -> bytes:
    ds = make_dx(None, rows=8, cols=8)
    del ds.file_meta
    return encode(ds)


VALID = _valid_header_bytes()


def _parse(data: bytes, syntax: str) -> InstanceHeader | None:
    try:
        return parse_header(data, syntax)
    except InstanceRejected as exc:
        assert exc.reason  # a reason to record
        return None


@FUZZ
@given(data=st.binary(max_size=2048), syntax=SYNTAXES)
def test_random_bytes_parse_or_are_rejected(data: bytes, syntax: str) -> None:
    header = _parse(data, syntax)
    if header is not None:
        assert header.sop_class_uid and header.sop_instance_uid and header.study_instance_uid


@FUZZ
@given(
    cut=st.integers(min_value=0, max_value=len(VALID)),
    flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=8),
)
def test_mutated_real_headers_parse_or_are_rejected(cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(VALID[:cut])
    for at, value in flips:
        if at < len(data):
            data[at] = value
    _parse(bytes(data), ExplicitVRLittleEndian)


TEXT = st.text(max_size=40)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "1.2.840.10008.5.1.4.1.1.1",
                    "1.2.840.10008.5.1.4.1.1.1.1",
                    "1.2.840.10008.5.1.4.1.1.7",
                    "1.2.840.10008.5.1.4.1.1.88.11",
                ]
            )
            | TEXT,
            TEXT,
            TEXT,
            TEXT,
        ),
        max_size=6,
    )
)
def test_selection_accepts_any_header_values(
    rows: list[tuple[str, str, str, str]],
) -> None:
    records = [
        InstanceRecord(
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.4",
            sop_instance_uid=f"1.2.3.4.{n}",
            sop_class_uid=sop_class,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            modality=modality,
            body_part_examined=body_part,
            view_position=view,
            series_description="",
            path=f"/spool/{n}.dcm",
            size=1,
            sha256="0" * 64,
            calling_ae_title="FUZZ",
            received_at=datetime.now(UTC),
        )
        for n, (sop_class, modality, body_part, view) in enumerate(rows)
    ]
    selection = select_images(records)
    assert (selection.skip_reason is None) == bool(selection.images)
    assert set(selection.images) <= set(records)
