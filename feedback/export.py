"""``d2r feedback export``: the studies with a signed report, as a training set that ``d2r
train`` and ``d2r train-detector`` read as they are, and as the input of ``d2r evaluate``.

Layout of the folder written (``DIR``)::

    manifest.json          every study: exported or skipped (and why), version, received_at,
                           split, files, boxes; the counts
    annotation.json        R2Gen-style train/val/test lists (training.datasets.read_r2gen): per
                           study its image, the signed report's findings and impression as the
                           reference, the draft beside it, and the draft's boxes as weak labels
                           (COCO [x, y, w, h] in source pixels, VinDr-CXR class names)
    datasets.json          {"datasets": [{"kind": "r2gen", ...}]}: ``d2r train --data`` and
                           ``d2r train-detector --data`` take it
    images/<study>/<sop>.dcm  the frontal image the draft was made from, copied from the spool
    studies.jsonl          per exported study its image, split and reference: ``d2r evaluate
                           --model CHECKPOINT --data DIR --split test`` runs a checkpoint on them
    signed_reports.jsonl   per study its current signed report as ``reference`` and the draft as
                           ``generated``: ``d2r evaluate --predictions`` scores the drafts

Images, report texts and UIDs are patient data: the folder is made ``0o700`` and every file
``0o600``, whatever the umask; keep the folder on storage meant for patient data.

A study is exported when its image is still in the spool. The spool's retention
(``D2R_SPOOL_RETENTION_HOURS``) removes a finished study's files: such a study is listed in the
manifest as skipped, with the reason, and stays in ``signed_reports.jsonl`` (text only).

**Weak boxes.** d2r keeps a draft's boxes only in the TID 1500 SR it wrote (the study's result
files in the spool); they are read back with highdicom: each measurement group's image region
(TID 1410), or the region its first measurement is inferred from (TID 1501,
``D2R_SR_ROI_ENCODING=tid1501``). The caller maps each group's finding code to its VinDr-CXR
class (``finding_classes``, from :data:`report.codes.FINDING_CODES`). These boxes are what the
model drew, not what a radiologist marked: labels to start from, never ground truth, so
``studies.jsonl`` carries no ``gt_lesions``. A study whose SR is gone or unreadable is exported
without boxes, and the manifest says why.

**Splits.** A study's split follows from its Study Instance UID alone (:func:`split_of`: 80 %
train, 10 % val, 10 % test), so it stays in the same split in every export: a later export never
trains on a study an earlier one held out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, Protocol

from dicom_node.errors import InstanceRejected
from dicom_node.instance_file import read_instance_header
from dicom_node.selection import select_images
from dicom_node.spool import safe_name
from feedback.scoring import draft_text
from studydb.feedback import ScoringCase
from studydb.records import InstanceRecord, StudyView

__all__ = [
    "EXPORT_FORMAT",
    "EXPORTED",
    "SKIPPED",
    "DraftBox",
    "DraftBoxes",
    "ExportBook",
    "annotation_entry",
    "choose_image",
    "export_training_set",
    "read_draft_boxes",
    "signed_report_record",
    "split_of",
    "split_sections",
]

logger = logging.getLogger(__name__)

EXPORT_FORMAT: Final = "d2r-feedback-export/1"
EXPORTED: Final = "exported"
SKIPPED: Final = "skipped"
#: percent of the studies held out for validation and for the test (the rest: train)
VAL_PERCENT: Final = 10
TEST_PERCENT: Final = 10
COMPREHENSIVE_SR: Final = "1.2.840.10008.5.1.4.1.1.88.33"
_DIR_MODE: Final = 0o700
_FILE_MODE: Final = 0o600
#: a section heading of a report, at the start of a line: "FINDINGS:", "Impression -", ...
_HEADING = re.compile(
    r"^[ \t]*(findings|impressions?|conclusions?)[ \t]*[:\-][ \t]*", re.IGNORECASE | re.MULTILINE
)
FindingClasses = Mapping[tuple[str, str], str]
_GONE: Final = (
    "the image is no longer in the spool (a finished study's files are removed after "
    "D2R_SPOOL_RETENTION_HOURS)"
)


class ExportBook(Protocol):
    """The study-database calls the export needs (:class:`studydb.store.StudyStore`)."""

    def reports_with_drafts(self, *, since: float | None = None) -> list[ScoringCase]: ...

    def get(self, study_uid: str) -> StudyView | None: ...

    def instances(self, study_uid: str) -> list[InstanceRecord]: ...


@dataclass(frozen=True)
class DraftBox:
    """One box of the draft, in source-image pixels ``(x_min, y_min, x_max, y_max)``."""

    class_name: str
    box: tuple[float, float, float, float]
    sop_instance_uid: str
    #: the Certainty of Finding the SR states, 0-1 (None: not stated)
    score: float | None = None


@dataclass(frozen=True)
class DraftBoxes:
    """The boxes read from a study's SRs, and why none could be read (``note``)."""

    boxes: tuple[DraftBox, ...] = ()
    note: str = ""


# ------------------------------------------------------------------------- pure parts


def split_of(study_uid: str) -> str:
    """``train``, ``val`` or ``test``, from the Study Instance UID alone (stable).

    >>> split_of("1.2.3") == split_of("1.2.3") and split_of("1.2.3") in ("train", "val", "test")
    True
    """
    bucket = int.from_bytes(hashlib.sha256(study_uid.encode("utf-8")).digest()[:8], "big") % 100
    if bucket < TEST_PERCENT:
        return "test"
    return "val" if bucket < TEST_PERCENT + VAL_PERCENT else "train"


def split_sections(text: str) -> tuple[str, str]:
    """A signed report's findings and impression, by its ``FINDINGS:`` and ``IMPRESSION:``
    (or ``CONCLUSION:``) headings; a report without them is all findings. Text before the
    first heading (a clinical history, the technique) is left out when there are headings.

    >>> split_sections("History: cough.\\nFINDINGS: Small effusion.\\nIMPRESSION: Effusion.")
    ('Small effusion.', 'Effusion.')
    >>> split_sections("Heart size normal.")
    ('Heart size normal.', '')
    """
    marks = list(_HEADING.finditer(text))
    if not marks:
        return text.strip(), ""
    findings: list[str] = []
    impression: list[str] = []
    for n, mark in enumerate(marks):
        end = marks[n + 1].start() if n + 1 < len(marks) else len(text)
        body = " ".join(text[mark.end() : end].split())
        (findings if mark.group(1).lower() == "findings" else impression).append(body)
    return " ".join(f for f in findings if f), " ".join(i for i in impression if i)


def signed_report_record(case: ScoringCase) -> dict[str, Any]:
    """One line of ``signed_reports.jsonl`` (``d2r evaluate --predictions``)."""
    return {
        "id": case.study_instance_uid,
        "reference": case.signed_text,
        "generated": "" if case.abstained else draft_text(case),
        "version": case.version,
        "abstained": case.abstained,
        "received_at": case.received_at,
    }


def choose_image(
    records: Sequence[InstanceRecord], boxes: Sequence[DraftBox]
) -> InstanceRecord | None:
    """The image the draft's boxes are drawn on, else the image the worker chooses
    (:func:`dicom_node.selection.select_images`); None when the study has no such image."""
    referenced = {b.sop_instance_uid for b in boxes if b.sop_instance_uid}
    for record in records:
        if record.sop_instance_uid in referenced:
            return record
    chosen = select_images(records).images
    return chosen[0] if chosen else None


def annotation_entry(
    case: ScoringCase,
    *,
    image_path: str,
    sop_instance_uid: str,
    boxes: Sequence[DraftBox],
    split: str,
    columns: int,
    rows: int,
) -> dict[str, Any]:
    """One study's entry of ``annotation.json`` (:func:`training.datasets.read_r2gen`'s
    fields, and the draft beside the reference)."""
    findings, impression = split_sections(case.signed_text)
    return {
        "id": case.study_instance_uid,
        "study_id": case.study_instance_uid,
        "sop_instance_uid": sop_instance_uid,
        "split": split,
        "image_path": [image_path],
        "report": case.signed_text,
        "findings": findings,
        "impression": impression,
        "signed_version": case.version,
        "received_at": case.received_at,
        "draft_findings": "" if case.abstained else case.draft_findings,
        "draft_impression": "" if case.abstained else case.draft_impression,
        "abstained": case.abstained,
        "boxes": [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in (b.box for b in boxes)],
        "labels": [b.class_name for b in boxes],
        "scores": [b.score for b in boxes],
        "box_source": "draft",
        "width": columns,
        "height": rows,
    }


# ------------------------------------------------------------------------- reading SRs


def _bounds(points: Any) -> tuple[float, float, float, float] | None:
    values = [(float(p[0]), float(p[1])) for p in points]
    if not values:
        return None
    xs, ys = [x for x, _ in values], [y for _, y in values]
    x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _referenced_uid(region: Any) -> str:
    for item in region.get("ContentSequence", []):
        refs = item.get("ReferencedSOPSequence")
        if refs:
            return str(refs[0].ReferencedSOPInstanceUID)
    return ""


def _certainty(group: Any) -> float | None:
    for measurement in group.get_measurements():
        if measurement.name.value == "111012":  # (111012, DCM, "Certainty of finding")
            return float(measurement.value) / 100.0
    return None


def _class_of(group: Any, classes: FindingClasses) -> str | None:
    finding = group.finding_type
    if finding is None:
        return None
    return classes.get((str(finding.scheme_designator), str(finding.value)))


def _boxes_of_sr(ds: Any, classes: FindingClasses) -> tuple[list[DraftBox], int]:
    """The boxes of one TID 1500 SR, and how many groups had a finding no class maps to."""
    import highdicom as hd

    content: Any = hd.sr.ComprehensiveSR.from_dataset(ds).content
    boxes: list[DraftBox] = []
    unknown = 0
    regions: list[tuple[Any, Any]] = [
        (g, g.roi) for g in content.get_planar_roi_measurement_groups() if g.roi is not None
    ]
    for group in content.get_image_measurement_groups():  # TID 1501: the NUM's region
        inferred = [r for m in group.get_measurements() for r in m.referenced_coordinates or ()]
        if inferred:
            regions.append((group, inferred[0]))
    for group, region in regions:
        class_name = _class_of(group, classes)
        box = _bounds(region.value)
        if class_name is None:
            unknown += 1
        elif box is not None:
            boxes.append(DraftBox(class_name, box, _referenced_uid(region), _certainty(group)))
    return boxes, unknown


def read_draft_boxes(paths: Iterable[str], classes: FindingClasses | None) -> DraftBoxes:
    """The boxes of the TID 1500 SRs among a study's result files ``paths``.

    ``classes`` maps a finding's ``(coding scheme designator, code value)`` to its VinDr-CXR
    class; None reads no box (the note says why). Other result files (the Basic Text SR, the
    presentation state, the overlay image) are passed over.
    """
    if classes is None:
        return DraftBoxes(note="boxes not read: highdicom is not installed here")
    boxes: list[DraftBox] = []
    found = unknown = 0
    for path in paths:
        try:
            ds = read_instance_header(path)
        except FileNotFoundError:
            continue
        except (InstanceRejected, OSError) as exc:
            return DraftBoxes(note=f"the draft's SR is unreadable ({type(exc).__name__})")
        if str(ds.get("SOPClassUID", "")) != COMPREHENSIVE_SR:
            continue
        found += 1
        try:
            more, missing = _boxes_of_sr(ds, classes)
        except Exception as exc:  # whatever highdicom raises on a malformed document
            return DraftBoxes(note=f"the draft's SR is unreadable ({type(exc).__name__})")
        boxes += more
        unknown += missing
    if not found:
        return DraftBoxes(note="the draft's SR is no longer in the spool: no boxes")
    note = f"{unknown} box(es) of an unknown finding left out" if unknown else ""
    return DraftBoxes(tuple(boxes), note)


# ------------------------------------------------------------------------- writing


def _private_dir(path: Path) -> None:
    path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, _DIR_MODE)


@contextmanager
def _private_file(path: Path, *, binary: bool = False) -> Iterator[IO[Any]]:
    """``path`` opened for writing, created (or truncated) with mode ``0o600``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, _FILE_MODE)
    os.fchmod(fd, _FILE_MODE)
    f: IO[Any] = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")
    with f:
        yield f


def _write_json(path: Path, value: object) -> None:
    with _private_file(path) as f:
        f.write(json.dumps(value, indent=1, ensure_ascii=False) + "\n")


def _write_lines(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    with _private_file(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _copy(source: str, target: Path) -> None:
    with open(source, "rb") as src, _private_file(target, binary=True) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


@dataclass
class _Study:
    """One study's line of the manifest, filled as the export goes."""

    case: ScoringCase
    status: str = SKIPPED
    reason: str = ""
    split: str = ""
    files: list[str] = field(default_factory=list)
    boxes: int = 0
    note: str = ""

    def manifest(self) -> dict[str, Any]:
        c = self.case
        return {
            "study_instance_uid": c.study_instance_uid,
            "status": self.status,
            "reason": self.reason,
            "version": c.version,
            "received_at": c.received_at,
            "received": datetime.fromtimestamp(c.received_at, UTC).isoformat(),
            "abstained": c.abstained,
            "split": self.split,
            "files": self.files,
            "boxes": self.boxes,
            "note": self.note,
        }


# Longer than a screen: one study from the database rows to its copied image and its entries,
# each refusal a named reason, read top to bottom
def _export_study(
    book: ExportBook, study: _Study, out: Path, classes: FindingClasses | None
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Copy one study's image; its annotation entry and ``studies.jsonl`` line, or None (the
    study is skipped; ``study.reason`` says why)."""
    case = study.case
    findings, impression = split_sections(case.signed_text)
    if not (findings or impression):
        study.reason = "the signed report has no text under its headings"
        return None
    view = book.get(case.study_instance_uid)
    drafted = DraftBoxes(note="the draft abstained: no boxes") if case.abstained else None
    if drafted is None:
        drafted = read_draft_boxes(view.result_paths if view else (), classes)
    record = choose_image(book.instances(case.study_instance_uid), drafted.boxes)
    if record is None:
        study.reason = "no frontal chest image among the study's instances"
        return None
    try:
        header = read_instance_header(record.path)
        columns, rows = int(header.Columns), int(header.Rows)
    except FileNotFoundError:
        study.reason = _GONE
        return None
    except (InstanceRejected, OSError, AttributeError, TypeError, ValueError) as exc:
        study.reason = f"the image's header is unreadable ({type(exc).__name__})"
        return None
    boxes = [
        b
        for b in drafted.boxes
        if not b.sop_instance_uid or b.sop_instance_uid == record.sop_instance_uid
    ]
    relative = f"{safe_name(case.study_instance_uid)}/{safe_name(record.sop_instance_uid)}.dcm"
    _private_dir(out / "images" / safe_name(case.study_instance_uid))
    try:
        _copy(record.path, out / "images" / relative)
    except FileNotFoundError:  # removed by the retention since its header was read
        study.reason = _GONE
        return None
    study.status, study.split, study.boxes, study.note = (
        EXPORTED,
        split_of(case.study_instance_uid),
        len(boxes),
        drafted.note,
    )
    study.files = [f"images/{relative}"]
    entry = annotation_entry(
        case,
        image_path=relative,
        sop_instance_uid=record.sop_instance_uid,
        boxes=boxes,
        split=study.split,
        columns=columns,
        rows=rows,
    )
    line = {
        "id": case.study_instance_uid,
        "split": study.split,
        "dicom": [f"images/{relative}"],
        "reference": findings or case.signed_text,
        "findings": findings,
        "impression": impression,
        "study_instance_uid": case.study_instance_uid,
        "sop_instance_uid": record.sop_instance_uid,
        "gt_lesions": [],
        "columns": columns,
        "rows": rows,
    }
    return entry, line


def export_training_set(
    book: ExportBook,
    out: Path,
    *,
    since: float | None = None,
    finding_classes: FindingClasses | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Write the export (module docstring) to ``out``; the manifest written."""
    _private_dir(out)
    _private_dir(out / "images")
    cases = book.reports_with_drafts(since=since)
    studies = [_Study(case) for case in cases]
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    lines: list[dict[str, Any]] = []
    for study in studies:
        done = _export_study(book, study, out, finding_classes)
        if done is not None:
            splits[study.split].append(done[0])
            lines.append(done[1])
    _write_json(out / "annotation.json", splits)
    _write_json(
        out / "datasets.json",
        {"datasets": [{"kind": "r2gen", "annotation": "annotation.json", "image_root": "images"}]},
    )
    _write_lines(out / "studies.jsonl", lines)
    _write_lines(out / "signed_reports.jsonl", (signed_report_record(c) for c in cases))
    exported = [s for s in studies if s.status == EXPORTED]
    manifest = {
        "format": EXPORT_FORMAT,
        "created": datetime.fromtimestamp(
            datetime.now(UTC).timestamp() if now is None else now, UTC
        ).isoformat(),
        "since": None if since is None else datetime.fromtimestamp(since, UTC).isoformat(),
        "patient_data": "images and report texts of patients: keep on storage meant for them",
        "files": {
            "annotation": "annotation.json",
            "datasets": "datasets.json",
            "studies": "studies.jsonl",
            "signed_reports": "signed_reports.jsonl",
        },
        "counts": {
            "studies": len(studies),
            "exported": len(exported),
            "skipped": len(studies) - len(exported),
            "boxes": sum(s.boxes for s in exported),
            **{split: len(entries) for split, entries in splits.items()},
        },
        "studies": [s.manifest() for s in studies],
    }
    _write_json(out / "manifest.json", manifest)
    logger.info("exported %d of %d studies with a signed report", len(exported), len(studies))
    return manifest
