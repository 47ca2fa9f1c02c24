"""A reported study's results on disk: its SRs, and the content file the HL7 and FHIR senders send.

Each file is written durably and atomically (temp file, fsync, rename, fsync of the folder): a
crash leaves the whole file or none of it, never a torn SR.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import Dataset

from delivery.content import CONTENT_FILE, DeliveryContent, FindingBox

if TYPE_CHECKING:
    from worker.pipeline import ReportResult

__all__ = [
    "delivery_content",
    "encode",
    "read_content",
    "write_all_atomic",
    "write_atomic",
    "write_results",
]


def write_results(folder: Path, result: ReportResult) -> list[str]:
    """Write ``result``'s SRs (``<SOPInstanceUID>.dcm``) and its content file into ``folder``;
    returns the SRs' paths, TID 1500 first."""
    files = {folder / f"{ds.SOPInstanceUID}.dcm": encode(ds) for ds in result.reports}
    content = delivery_content(result).to_json().encode("utf-8")
    write_all_atomic({**files, folder / CONTENT_FILE: content})
    return [str(p) for p in files]


def delivery_content(result: ReportResult) -> DeliveryContent:
    """What the HL7 and FHIR senders send: what the SRs say (the grounded lesions, each with
    its sentence, and the checked impression), tied to the TID 1500 SR."""
    pred = result.prediction
    said = result.content
    return DeliveryContent(
        findings=said.findings,
        impression=said.impression,
        lesions=tuple(
            FindingBox(lesion.class_name, lesion.score, lesion.box, sentence=lesion.sentence)
            for lesion in said.lesions
        ),
        model_name=pred.model_name,
        model_version=pred.model_version,
        sr_sop_instance_uid=str(result.reports[0].SOPInstanceUID) if result.reports else "",
        image_sop_instance_uid=pred.sop_instance_uid,
        abstained=pred.abstained,
        abstain_reason=pred.abstain_reason,
        input_gate=pred.input_gate,
    )


def read_content(paths: Sequence[str]) -> DeliveryContent | None:
    """The content file beside the SRs at ``paths``, or None for results written before it
    existed."""
    if not paths:
        return None
    path = Path(paths[0]).parent / CONTENT_FILE
    try:
        return DeliveryContent.from_json(path.read_bytes())
    except FileNotFoundError:
        return None


def encode(ds: Dataset) -> bytes:
    """``ds`` as a DICOM file (preamble and file meta information)."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably: temp file, fsync, rename, fsync the folder."""
    write_all_atomic({path: data})


def write_all_atomic(files: dict[Path, bytes]) -> None:
    """Write each file durably: temp file, fsync, rename; then fsync each folder once.

    A folder created here is also made durable in its parent.
    """
    folders: dict[Path, bool] = {}
    for path in files:
        if path.parent not in folders:
            folders[path.parent] = not path.parent.is_dir()
            path.parent.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    for folder, created in folders.items():
        for directory in (folder, folder.parent) if created else (folder,):
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
