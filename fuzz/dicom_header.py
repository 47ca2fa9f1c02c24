"""Fuzz target: the routing-header reader and the status page preview.

Each input is a transfer syntax (its first byte picks one of :data:`SYNTAXES`) and a data set
encoded in it, as a C-STORE brings it. :func:`dicom_node.metadata.parse_header` must return a
header or raise :class:`~dicom_node.errors.InstanceRejected` with a reason. An instance whose
header is accepted is kept by the node, so it is also written as the spool writes it (File Meta
Information, then the data set as received) and rendered by the status page
(:meth:`observability.pages.StatusPages.preview`, which reads the file and calls
:func:`observability.status_page.render_preview`): a PNG, None (no preview: the image cannot
be read, cannot be rendered or is too large), never an exception (a Rust decoder's panic
included). Memory stays under the run's ``-rss_limit_mb``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, cast

from fuzz._harness import (
    KnownGap,
    OneInput,
    PropertyViolation,
    check,
    fuzz_main,
    instrumented,
    quiet_logging,
    tolerating,
)

with instrumented("dicom_node", "observability", "pydicom", "PIL"):
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import (
        UID,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGLSLossless,
        RLELossless,
    )

    from dicom_node.errors import InstanceRejected
    from dicom_node.metadata import parse_header
    from observability.pages import StatusPages
    from studydb.records import DONE, InstanceRecord, StudyView

if TYPE_CHECKING:
    from studydb.views import Views

#: the transfer syntax of an input is SYNTAXES[first byte % len(SYNTAXES)]
SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEG2000Lossless,
    UID("1.2.840.10008.1.2.4.999"),  # not a transfer syntax pydicom knows
)
PREVIEW_FAILED = "the preview of a routable instance raised"


KNOWN_GAPS: tuple[KnownGap, ...] = ()


def part10_prefix(transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information, as the spool writes them."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")
    meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.1")
    meta.TransferSyntaxUID = UID(transfer_syntax)
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(DicomFileLike(buf), meta, enforce_standard=True)
    return buf.getvalue()


class _OneFileStore:
    """The two study-store reads the preview makes, over one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.modality = "DX"

    def get(self, study_uid: str) -> StudyView:
        now = datetime.now(UTC).timestamp()
        return StudyView(
            study_instance_uid=study_uid,
            state=DONE,
            reason=None,
            generation=1,
            first_received_at=now,
            last_received_at=now,
            queued_at=None,
            processed_at=None,
            finished_at=None,
            model_name=None,
            model_version=None,
            findings=None,
            impression=None,
            lesion_count=None,
            result_paths=(),
            instance_count=1,
            deliveries=(),
        )

    def instances(self, study_uid: str) -> list[InstanceRecord]:
        return [
            InstanceRecord(
                study_instance_uid=study_uid,
                series_instance_uid="1.2.3.4",
                sop_instance_uid="1.2.3.4.5",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                transfer_syntax_uid=ExplicitVRLittleEndian,
                modality=self.modality,
                body_part_examined="CHEST",
                view_position="PA",
                series_description="",
                path=str(self.path),
                size=self.path.stat().st_size,
                sha256="0" * 64,
                calling_ae_title="FUZZ",
                received_at=datetime.now(UTC),
            )
        ]


def one_input_with(folder: Path) -> OneInput:
    prefixes = {ts: part10_prefix(ts) for ts in SYNTAXES}
    path = folder / "instance.dcm"
    store = _OneFileStore(path)
    pages = StatusPages(cast("Views", store))  # the pages read instances() only here
    studies = itertools.count()

    def one_input(data: bytes) -> None:
        if not data:
            return
        syntax = SYNTAXES[data[0] % len(SYNTAXES)]
        dataset = data[1:]
        try:
            header = parse_header(dataset, syntax)
        except InstanceRejected as exc:
            check(exc.reason, "rejected without a reason")
            return
        check(header.sop_instance_uid and header.study_instance_uid, "header without UIDs")
        try:
            streamed = parse_header(io.BytesIO(dataset), syntax)  # as the C-STORE stream reads
        except InstanceRejected as exc:
            raise PropertyViolation(f"accepted as bytes, rejected as a file: {exc}") from None
        check(streamed == header, f"read as a file: {streamed}, as bytes: {header}")
        path.write_bytes(prefixes[syntax] + dataset)
        store.modality = header.modality if header.modality in ("CR", "DX") else "DX"
        try:
            png = pages.preview(f"1.2.826.0.1.3680043.8.498.{next(studies)}")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a decoder's panic is a BaseException
            raise PropertyViolation(f"{PREVIEW_FAILED} {type(exc).__name__}: {exc}") from exc
        check(png is None or png.startswith(b"\x89PNG"), f"the preview is not a PNG: {png!r:.40}")

    return one_input


@contextlib.contextmanager
def harness() -> Iterator[OneInput]:
    quiet_logging()
    with tempfile.TemporaryDirectory(prefix="d2r-fuzz-header-") as tmp:
        yield tolerating(one_input_with(Path(tmp)), KNOWN_GAPS)


if __name__ == "__main__":
    fuzz_main(harness)
