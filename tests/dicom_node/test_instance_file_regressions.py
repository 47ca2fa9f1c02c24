"""Headers found by the fuzzing campaign (``fuzz/dicom_header.py``, inputs in
fuzz/regressions/dicom_header): a stored instance whose image size attributes cannot be read is
refused with ``InstanceRejected`` (no preview, input rejected), whatever pydicom raises.
"""

from __future__ import annotations

import io

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset

from dicom_node.errors import InstanceRejected
from dicom_node.instance_file import declared_pixel_bytes

ROWS_US = b"\x28\x00\x10\x00US\x02\x00\x08\x00"  # (0028,0010) Rows, US, 8


def _header(*elements: bytes) -> Dataset:
    return read_dataset(io.BytesIO(b"".join(elements)), is_implicit_VR=False, is_little_endian=True)


def test_readable_size_attributes_give_the_size() -> None:
    columns = b"\x28\x00\x11\x00US\x02\x00\x04\x00"
    assert declared_pixel_bytes(_header(ROWS_US, columns)) == 8 * 4 * 2


@pytest.mark.parametrize(
    "columns",
    [
        b"\x28\x00\x11\x00UW\x02\x00\x08\x00",  # VR "UW": pydicom's NotImplementedError
        b"\x28\x00\x11\x00US\x03\x00\x08\x00\x00",  # 3 bytes of US: BytesLengthException
    ],
)
def test_unreadable_size_attribute_is_rejected(columns: bytes) -> None:
    with pytest.raises(InstanceRejected):
        declared_pixel_bytes(_header(ROWS_US, columns))
