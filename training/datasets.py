"""Dataset adapters: users' on-disk datasets -> one :class:`StudyRecord` type.

Readers:

* :func:`read_r2gen` — MIMIC-CXR-JPG images (``files/pNN/p<subject>/s<study>/<dicom_id>.jpg``)
  or any image root, with an R2Gen ``annotation.json`` (with or without D2R-Net box fields);
  also reads the phantom's ``annotation.json``.
* :func:`read_vindr` — VinDr-CXR ``train|test/<image_id>.dicom`` (or ``.png``) with
  ``annotations/annotations_{train,test}.csv``; multiple readers' boxes fused by
  :func:`fuse_reader_boxes`.
* :func:`read_iu_xray` — IU X-ray (NLMCXR) ``ecgen-radiology/*.xml`` + PNG images.
* :func:`read_config` / :func:`load_datasets` — a JSON config naming the paths per dataset.

Every reader collects all missing or malformed files and raises one
:class:`~training.errors.DatasetError` naming each of them.

**Reader fusion policy (VinDr-CXR training boxes).** Per image and class, boxes from all
readers are clustered greedily (highest-IoU link first, complete linkage: a box joins a cluster
only if its IoU with *every* member is >= 0.4, and a cluster holds at most one box per reader).
A cluster is kept if boxes from at least ``min_readers`` distinct readers support it
(default 2, i.e. 2 of 3 readers); its box is the mean of the members' coordinates. Test
annotations are already a consensus and are taken as they are.
"""

from __future__ import annotations

import csv
import json
import logging
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2r_core.classes import VINDR_CLASSES
from d2r_core.geometry import Box, iou
from training.errors import DatasetError

logger = logging.getLogger(__name__)

FUSION_IOU = 0.4
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class BoxLabel:
    """A box in source pixels ``[x_min, y_min, x_max, y_max]`` with its VinDr-CXR class."""

    class_name: str
    box: Box


@dataclass(frozen=True)
class StudyRecord:
    """One image with its report text and boxes, whatever the source dataset."""

    dataset: str
    id: str
    study_id: str
    split: str
    image_path: Path
    findings: str = ""
    impression: str = ""
    boxes: tuple[BoxLabel, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def report(self) -> str:
        """Findings, or the impression when there are no findings."""
        return self.findings or self.impression

    @property
    def is_dicom(self) -> bool:
        """Whether the image is a DICOM file."""
        return self.image_path.suffix.lower() in (".dcm", ".dicom")


# --------------------------------------------------------------------------- R2Gen / MIMIC


def _coco_to_corners(box: Sequence[float]) -> Box | None:
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:  # padding ([-1, -1, -1, -1]) or degenerate
        return None
    return (x, y, x + w, y + h)


def read_r2gen(
    annotation: Path, image_root: Path, *, dataset: str = "mimic-cxr", check_images: bool = True
) -> list[StudyRecord]:
    """Read an R2Gen-style ``annotation.json`` (``train``/``val``/``test`` lists).

    Box fields (``boxes`` in COCO ``[x, y, w, h]``, ``labels`` as class names or indices) are
    optional; padded boxes are dropped.
    """
    problems: list[str] = []
    try:
        data = json.loads(annotation.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(dataset, [f"{annotation}: missing"]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(dataset, [f"{annotation}: not valid JSON ({exc})"]) from exc
    if not isinstance(data, dict) or not any(s in data for s in SPLITS):
        raise DatasetError(dataset, [f"{annotation}: expected an object with train/val/test"])
    records: list[StudyRecord] = []
    for split in SPLITS:
        for n, entry in enumerate(data.get(split, [])):
            where = f"{annotation}: {split}[{n}]"
            try:
                paths = entry["image_path"]
                if isinstance(paths, str):
                    paths = [paths]
                image = image_root / paths[0]
                boxes: list[BoxLabel] = []
                labels = entry.get("labels", [])
                for b, lab in zip(entry.get("boxes", []), labels, strict=False):
                    corners = _coco_to_corners(b)
                    if corners is None:
                        continue
                    name = VINDR_CLASSES[lab] if isinstance(lab, int) else str(lab)
                    if name not in VINDR_CLASSES:
                        raise ValueError(f"unknown class {name!r}")
                    boxes.append(BoxLabel(name, corners))
                findings = str(entry.get("findings", entry.get("report", "")))
                rec = StudyRecord(
                    dataset,
                    str(entry["id"]),
                    str(entry.get("study_id", "")),
                    split,
                    image,
                    findings,
                    str(entry.get("impression", "")),
                    tuple(boxes),
                )
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                problems.append(f"{where}: malformed entry ({exc!r})")
                continue
            if check_images and not image.is_file():
                problems.append(f"{image}: missing image ({where})")
                continue
            records.append(rec)
    if problems:
        raise DatasetError(dataset, problems)
    return records


def mimic_image_path(
    image_root: Path, subject_id: int | str, study_id: int | str, dicom_id: str
) -> Path:
    """``files/p<NN>/p<subject>/s<study>/<dicom_id>.jpg`` under ``image_root``."""
    subject = str(subject_id)
    return (
        image_root
        / "files"
        / f"p{subject[:2]}"
        / f"p{subject}"
        / f"s{study_id}"
        / f"{dicom_id}.jpg"
    )


# --------------------------------------------------------------------------- VinDr-CXR


def fuse_reader_boxes(
    boxes: Sequence[tuple[str, Box]], *, iou_threshold: float = FUSION_IOU, min_readers: int = 2
) -> list[Box]:
    """Fuse one class's boxes of one image from several readers (see the module docstring).

    Parameters
    ----------
    boxes : sequence of (reader id, box)
    iou_threshold : float
        Complete-linkage IoU needed to join a cluster.
    min_readers : int
        Distinct readers needed to keep a cluster.
    """
    clusters: list[list[tuple[str, Box]]] = [[b] for b in boxes]
    while True:
        best, pair = iou_threshold, None
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                ri = {r for r, _ in clusters[i]}
                if ri & {r for r, _ in clusters[j]}:
                    continue
                link = min(iou(a, b) for _, a in clusters[i] for _, b in clusters[j])
                if link >= best:
                    best, pair = link, (i, j)
        if pair is None:
            break
        i, j = pair
        clusters[i] = clusters[i] + clusters.pop(j)
    fused = []
    for c in clusters:
        if len({r for r, _ in c}) >= min_readers:
            fused.append(tuple(sum(b[k] for _, b in c) / len(c) for k in range(4)))
    return sorted(fused)  # type: ignore[arg-type]


def read_vindr(
    root: Path,
    *,
    splits: Sequence[str] = ("train", "test"),
    min_readers: int = 2,
    check_images: bool = True,
) -> list[StudyRecord]:
    """Read VinDr-CXR: ``<split>/<image_id>.dicom|.png`` + ``annotations/*.csv``."""
    problems: list[str] = []
    records: list[StudyRecord] = []
    for split in splits:
        csv_path = root / "annotations" / f"annotations_{split}.csv"
        if not csv_path.is_file():
            problems.append(f"{csv_path}: missing")
            continue
        per_image: dict[str, list[tuple[str, str, Box]]] = defaultdict(list)
        images: dict[str, None] = {}
        with csv_path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = {c.lower().strip(): c for c in reader.fieldnames or []}
            need = ["image_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
            lacking = [c for c in need if c not in cols]
            if lacking:
                problems.append(f"{csv_path}: missing column(s) {', '.join(lacking)}")
                continue
            for n, row in enumerate(reader, start=2):
                image_id = row[cols["image_id"]].strip()
                name = row[cols["class_name"]].strip()
                images.setdefault(image_id)
                if name.lower() == "no finding":
                    continue
                if name not in VINDR_CLASSES:
                    problems.append(f"{csv_path}: line {n}: unknown class {name!r}")
                    continue
                try:
                    box = tuple(float(row[cols[k]]) for k in need[2:])
                except ValueError:
                    problems.append(f"{csv_path}: line {n}: {name} row without valid coordinates")
                    continue
                reader_id = row[cols["rad_id"]].strip() if "rad_id" in cols else "consensus"
                per_image[image_id].append((reader_id, name, box))  # type: ignore[arg-type]
        for image_id in images:
            path = next(
                (
                    root / split / f"{image_id}{ext}"
                    for ext in (".dicom", ".dcm", ".png")
                    if (root / split / f"{image_id}{ext}").is_file()
                ),
                None,
            )
            if path is None:
                if check_images:
                    problems.append(f"{root / split / image_id}.dicom: missing image")
                    continue
                path = root / split / f"{image_id}.dicom"
            rows = per_image.get(image_id, [])
            readers = {r for r, _, _ in rows}
            boxes: list[BoxLabel] = []
            for cls in sorted({c for _, c, _ in rows}, key=VINDR_CLASSES.index):
                items = [(r, b) for r, c, b in rows if c == cls]
                if readers == {"consensus"}:
                    kept = [b for _, b in items]
                else:
                    kept = fuse_reader_boxes(items, min_readers=min_readers)
                boxes += [BoxLabel(cls, b) for b in kept]
            records.append(
                StudyRecord(
                    "vindr-cxr",
                    image_id,
                    image_id,
                    split,
                    path,
                    boxes=tuple(boxes),
                    extra={"fusion": f"iou>={FUSION_IOU}, >={min_readers} readers, mean"},
                )
            )
    if problems:
        raise DatasetError("vindr-cxr", problems)
    return records


# --------------------------------------------------------------------------- IU X-ray


def read_iu_xray(
    reports_dir: Path, image_dir: Path, *, check_images: bool = True, split: str = "train"
) -> list[StudyRecord]:
    """Read NLMCXR ``ecgen-radiology/*.xml`` (FINDINGS, IMPRESSION, ``<parentImage id>``)."""
    problems: list[str] = []
    records: list[StudyRecord] = []
    if not reports_dir.is_dir():
        raise DatasetError("iu-xray", [f"{reports_dir}: missing report folder"])
    xmls = sorted(reports_dir.glob("*.xml"))
    if not xmls:
        raise DatasetError("iu-xray", [f"{reports_dir}: no *.xml reports"])
    for path in xmls:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as exc:
            problems.append(f"{path}: malformed XML ({exc})")
            continue
        sections = {
            (t.get("Label") or "").upper(): (t.text or "").strip()
            for t in root.iter("AbstractText")
        }
        images = [im.get("id") for im in root.iter("parentImage") if im.get("id")]
        if not images:
            problems.append(f"{path}: no <parentImage id=...>")
            continue
        for image_id in images:
            image = image_dir / f"{image_id}.png"
            if check_images and not image.is_file():
                problems.append(f"{image}: missing image ({path.name})")
                continue
            records.append(
                StudyRecord(
                    "iu-xray",
                    str(image_id),
                    path.stem,
                    split,
                    image,
                    sections.get("FINDINGS", ""),
                    sections.get("IMPRESSION", ""),
                )
            )
    if problems:
        raise DatasetError("iu-xray", problems)
    return records


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DatasetConfig:
    """Paths of one dataset (relative paths resolve against the config file's folder)."""

    kind: str  # "r2gen", "mimic-cxr", "phantom", "vindr-cxr", "iu-xray"
    paths: dict[str, Path]


_REQUIRED = {
    "r2gen": ("annotation", "image_root"),
    "mimic-cxr": ("annotation", "image_root"),
    "phantom": ("root",),
    "vindr-cxr": ("root",),
    "iu-xray": ("reports_dir", "image_dir"),
}


def read_config(path: Path) -> list[DatasetConfig]:
    """Read a JSON config ``{"datasets": [{"kind": ..., <path keys>}, ...]}``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError("config", [f"{path}: missing"]) from None
    except json.JSONDecodeError as exc:
        raise DatasetError("config", [f"{path}: not valid JSON ({exc})"]) from exc
    problems: list[str] = []
    out = []
    for n, item in enumerate(data.get("datasets", []) if isinstance(data, dict) else []):
        kind = item.get("kind") if isinstance(item, dict) else None
        if kind not in _REQUIRED:
            problems.append(f"{path}: datasets[{n}].kind must be one of {sorted(_REQUIRED)}")
            continue
        lacking = [k for k in _REQUIRED[kind] if k not in item]
        if lacking:
            problems.append(f"{path}: datasets[{n}] ({kind}) lacks {', '.join(lacking)}")
            continue
        out.append(DatasetConfig(kind, {k: (path.parent / item[k]) for k in _REQUIRED[kind]}))
    if not out and not problems:
        problems.append(f"{path}: no datasets listed")
    if problems:
        raise DatasetError("config", problems)
    return out


def load_datasets(config: Path) -> list[StudyRecord]:
    """Read every dataset a config names."""
    records: list[StudyRecord] = []
    for ds in read_config(config):
        p = ds.paths
        if ds.kind in ("r2gen", "mimic-cxr"):
            records += read_r2gen(p["annotation"], p["image_root"], dataset=ds.kind)
        elif ds.kind == "phantom":
            records += read_r2gen(
                p["root"] / "annotation.json", p["root"] / "images", dataset="phantom"
            )
        elif ds.kind == "vindr-cxr":
            records += read_vindr(p["root"])
        else:
            records += read_iu_xray(p["reports_dir"], p["image_dir"])
    return records


__all__ = [
    "FUSION_IOU",
    "BoxLabel",
    "DatasetConfig",
    "StudyRecord",
    "fuse_reader_boxes",
    "load_datasets",
    "mimic_image_path",
    "read_config",
    "read_iu_xray",
    "read_r2gen",
    "read_vindr",
]
