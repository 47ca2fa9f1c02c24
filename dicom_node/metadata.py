"""Read the header elements the node routes on, without decoding pixel data.

The receive path calls :func:`parse_header` on the C-STORE data set exactly as it
arrived (any transfer syntax, Deflated included); parsing stops before the first
element after Requested Procedure Priority (0040,1003), so pixel data is never read.
:func:`read_document` reads a small data set whole (a Structured Report, whose content follows
that element), or nothing when it is larger than its limit.
"""

from __future__ import annotations

import io
import logging
import zlib
from dataclasses import dataclass
from os import PathLike
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom_node.errors import InstanceRejected, MissingUIDError
from dicom_node.instance_file import read_instance_header

__all__ = [
    "InstanceHeader",
    "header_from_dataset",
    "parse_header",
    "read_document",
    "read_header_file",
]

logger = logging.getLogger(__name__)

_LAST_TAG = 0x00401003  # Requested Procedure Priority: every element we need sorts at or before it
#: The header we route on sits in the first few kilobytes; a Deflated data set is inflated only
#: this far, so a deflate bomb cannot exhaust memory in the listener.
_MAX_INFLATED_HEADER = 4 * 1024 * 1024
_UID_KEYWORDS = (
    ("SOPClassUID", "(0008,0016)"),
    ("SOPInstanceUID", "(0008,0018)"),
    ("StudyInstanceUID", "(0020,000D)"),
)


@dataclass(frozen=True)
class InstanceHeader:
    """Routing attributes of one instance (no PHI).

    Empty strings stand for absent or empty elements, except the three UIDs that
    :func:`header_from_dataset` requires.
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    body_part_examined: str
    view_position: str
    series_description: str
    #: (attribute, value) of each Requested Procedure Priority (0040,1003) the header names, at
    #: the top level and in the Request Attributes Sequence (0040,0275); printable text
    priorities: tuple[tuple[str, str], ...] = ()
    #: the AccessionNumber (0008,0050), an order identifier: stored so that signed reports
    #: from the RIS can be matched by it, never logged
    accession_number: str = ""


def _priorities(ds: Dataset) -> tuple[tuple[str, str], ...]:
    """The Requested Procedure Priority values of ``ds`` and of its Request Attributes items.

    A malformed element here costs the instance its header priority, never its acceptance.
    """
    found = []
    try:
        top = _text(ds, "RequestedProcedurePriority")
        if top:
            found.append(("Requested Procedure Priority", top))
        items: Any = ds.get("RequestAttributesSequence") or ()
        for item in items:
            value = _text(item, "RequestedProcedurePriority")
            if value:
                found.append(("Request Attributes Sequence priority", value))
    except Exception:  # malformed or truncated: no priority from the header
        logger.debug("priority elements unreadable")
    return tuple(found)


def _text(ds: Dataset, keyword: str) -> str:
    """The element's value as one line of printable text (control characters become spaces).

    Header text reaches the study database, ``d2r status`` and the logs: an ESC, NUL or line
    break from a hostile or broken sender must not travel with it.
    """
    value: Any = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return "".join(" " if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text).strip()


def header_from_dataset(ds: Dataset) -> InstanceHeader:
    """Extract an :class:`InstanceHeader` from a (possibly partial) data set.

    Raises
    ------
    MissingUIDError
        When SOP Class, SOP Instance or Study Instance UID is absent or empty.
    """
    study_uid = _text(ds, "StudyInstanceUID")
    for keyword, tag in _UID_KEYWORDS:
        if not _text(ds, keyword):
            raise MissingUIDError(f"missing {keyword} {tag}", study_instance_uid=study_uid or None)
    for keyword, tag in (*_UID_KEYWORDS, ("SeriesInstanceUID", "(0020,000E)")):
        value = _text(ds, keyword)
        if value and not UID(value).is_valid:  # e.g. cut off mid-value: "1.2."
            raise InstanceRejected(
                f"invalid {keyword} {tag}",
                study_instance_uid=study_uid if UID(study_uid).is_valid else None,
            )
    return InstanceHeader(
        sop_class_uid=_text(ds, "SOPClassUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_instance_uid=study_uid,
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality").upper(),
        body_part_examined=_text(ds, "BodyPartExamined"),
        view_position=_text(ds, "ViewPosition"),
        series_description=_text(ds, "SeriesDescription"),
        priorities=_priorities(ds),
        accession_number=_text(ds, "AccessionNumber")[:64],
    )


def _stop(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) > _LAST_TAG


def _inflate_head(fp: BinaryIO, limit: int = _MAX_INFLATED_HEADER) -> bytes:
    """The first ``limit`` bytes of a deflated stream, read from ``fp`` a chunk at a time:
    neither the compressed nor the inflated data set is ever held whole."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    while len(out) < limit and not inflater.eof:
        chunk = inflater.unconsumed_tail or fp.read(64 * 1024)
        if not chunk:
            break
        out += inflater.decompress(chunk, limit - len(out))
    return bytes(out)


def parse_header(data: bytes | memoryview | BinaryIO, transfer_syntax_uid: str) -> InstanceHeader:
    """Parse the routing header of a data set encoded in ``transfer_syntax_uid``.

    Parameters
    ----------
    data : bytes, memoryview or binary file-like
        The encoded data set without File Meta Information, as received in a
        C-STORE request. A file-like object is read from its start and left
        positioned at its start.
    transfer_syntax_uid : str
        The transfer syntax of the presentation context the data set arrived on.

    Raises
    ------
    InstanceRejected
        When the data set cannot be parsed; :class:`MissingUIDError` when a
        required UID is missing.
    """
    ts = UID(transfer_syntax_uid)
    source: BinaryIO | None = None
    fp: BinaryIO
    if isinstance(data, (bytes, memoryview)):
        fp = io.BytesIO(data)
    else:
        fp = source = data
        fp.seek(0)
    try:
        if ts == DeflatedExplicitVRLittleEndian:
            fp = io.BytesIO(_inflate_head(fp))
        if not ts.is_transfer_syntax:
            raise ValueError(f"unknown transfer syntax {ts}")
        ds = pydicom.filereader.read_dataset(
            fp,
            is_implicit_VR=ts.is_implicit_VR,
            is_little_endian=ts.is_little_endian,
            stop_when=_stop,
            defer_size=1024,
        )
        # reading values of the elements we use may raise on malformed data
        header = header_from_dataset(ds)
    except InstanceRejected:
        raise
    except Exception as exc:  # any parse failure means the header is unusable
        logger.debug("header parse failed: %s", type(exc).__name__)
        raise InstanceRejected(f"unreadable header ({type(exc).__name__})") from exc
    finally:
        if source is not None:
            source.seek(0)
    return header


def read_document(fp: BinaryIO, transfer_syntax_uid: str, max_bytes: int) -> Dataset | None:
    """The whole data set of ``fp`` (encoded in ``transfer_syntax_uid``, read from its start),
    every value loaded, or None when it is longer than ``max_bytes`` (a Deflated one: once
    inflated). At most ``max_bytes + 1`` bytes are read or inflated.

    Raises
    ------
    InstanceRejected
        When the data set cannot be parsed.
    """
    ts = UID(transfer_syntax_uid)
    fp.seek(0)
    if ts == DeflatedExplicitVRLittleEndian:
        data = _inflate_head(fp, max_bytes + 1)
    else:
        data = fp.read(max_bytes + 1)
    if len(data) > max_bytes:
        return None
    try:
        if not ts.is_transfer_syntax:
            raise ValueError(f"unknown transfer syntax {ts}")
        ds = pydicom.filereader.read_dataset(
            io.BytesIO(data), is_implicit_VR=ts.is_implicit_VR, is_little_endian=ts.is_little_endian
        )
        for _element in ds.iterall():  # converted here: a malformed value fails now
            pass
    except Exception as exc:  # any parse failure: the data set cannot be read
        logger.debug("data set parse failed: %s", type(exc).__name__)
        raise InstanceRejected(f"unreadable data set ({type(exc).__name__})") from exc
    return ds


def read_header_file(path: str | PathLike[str]) -> InstanceHeader:
    """Read the routing header of a DICOM Part 10 file, without its pixel data (a Deflated one
    inflated only as far as :func:`dicom_node.instance_file.read_instance_header` does).

    Raises
    ------
    InstanceRejected
        When the file cannot be read or parsed, or lacks a required UID.
    """
    try:
        return header_from_dataset(read_instance_header(path))
    except InstanceRejected:
        raise
    except Exception as exc:
        raise InstanceRejected(f"unreadable file ({type(exc).__name__})") from exc
