"""Phantom: determinism, boxes, DICOM validity, report consistency."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from training.evaluation.labeler import label_report
from training.phantom import PHANTOM_CLASSES, render, sample_study
from training.phantom_output import PhantomConfig, generate
from training.phantom_report import write_report

# drawn class -> the CheXpert observation its report sentence must make positive
_CHEXPERT = {
    "Cardiomegaly": "Cardiomegaly",
    "Pleural effusion": "Pleural Effusion",
    "Nodule/Mass": "Lung Lesion",
    "Lung cavity": "Lung Lesion",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Atelectasis": "Atelectasis",
    "Aortic enlargement": "Enlarged Cardiomediastinum",
    "Pleural thickening": "Pleural Other",
    "Rib fracture": "Fracture",
}


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    generate(PhantomConfig(studies=8, seed=5, size=128, dicom_size=256), out)
    return out


def test_same_seed_identical_bytes_different_seed_differs(synth: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(PhantomConfig(studies=8, seed=5, size=128, dicom_size=256), again)
    assert _digest(synth) == _digest(again)
    other = tmp_path / "other"
    generate(PhantomConfig(studies=8, seed=6, size=128, dicom_size=256), other)
    a, b = _digest(synth), _digest(other)
    assert a["annotation.json"] != b["annotation.json"]
    assert a.keys() != b.keys() or any(a[k] != b[k] for k in a)


def test_boxes_inside_image_and_consistent_between_png_and_dicom(synth: Path) -> None:
    ann = json.loads((synth / "annotation.json").read_text())
    entries = {e["study_id"]: e for split in ann.values() for e in split}
    studies = [json.loads(x) for x in (synth / "studies.jsonl").read_text().splitlines()]
    n_boxes = 0
    for st in studies:
        e = entries[st["id"]]
        assert len(e["boxes"]) == len(e["labels"]) == len(st["gt_lesions"])
        for (x, y, w, h), gt in zip(e["boxes"], st["gt_lesions"], strict=True):
            assert w > 0 and h > 0
            assert x >= 0 and x + w <= e["width"] and y >= 0 and y + h <= e["height"]
            scale = st["columns"] / e["width"]
            assert gt["box"] == pytest.approx(
                [x * scale, y * scale, (x + w) * scale, (y + h) * scale]
            )
            n_boxes += 1
        ds = pydicom.dcmread(synth / st["dicom"][0])
        assert ds.Rows == st["rows"] and ds.PatientName.family_name == "PHANTOM"
        assert ds.BodyPartExamined == "CHEST" and ds.Modality in ("CR", "DX")
    assert n_boxes > 0


def test_lesions_render_where_their_box_is() -> None:
    for index in range(40):
        study = sample_study(2, index)
        if not study.lesions:
            continue
        r = render(study, 128, noise=False)
        for le, box in zip(study.lesions, r.boxes, strict=True):
            assert box[2] > box[0] and box[3] > box[1], le.class_name
            if le.laterality == "R":
                assert box[0] < study.anatomy.cx  # patient's right = image left
            if le.laterality == "L":
                assert box[2] > study.anatomy.cx


def test_normals_present_and_cardiomegaly_ctr() -> None:
    studies = [sample_study(9, i) for i in range(60)]
    assert 8 <= sum(not s.lesions for s in studies) <= 30
    for s in studies:
        big = any(le.class_name == "Cardiomegaly" for le in s.lesions)
        assert (s.anatomy.cardiothoracic_ratio > 0.5) == big


def test_reports_mention_exactly_the_drawn_lesions() -> None:
    drawn_seen: set[str] = set()
    for index in range(80):
        study = sample_study(4, index)
        report = write_report(study)
        labels = label_report(report.findings)
        drawn = {le.class_name for le in study.lesions}
        drawn_seen |= drawn
        expected = {_CHEXPERT[c] for c in drawn if c in _CHEXPERT}
        positive = {k for k, v in labels.items() if v == 1 and k not in ("No Finding",)}
        assert expected <= positive, (report.findings, drawn)
        assert positive <= expected, (report.findings, drawn)
        assert (labels["No Finding"] == 1) == (not drawn), report.findings
        for le in study.lesions:
            if le.laterality in ("R", "L"):
                side = {"R": "right", "L": "left"}[le.laterality]
                assert side in report.findings.lower()
        if not drawn:
            assert report.impression
    assert drawn_seen == set(PHANTOM_CLASSES)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_dciodvfy_reports_no_errors_on_cr_and_dx(synth: Path) -> None:
    studies = [json.loads(x) for x in (synth / "studies.jsonl").read_text().splitlines()]
    seen = set()
    for st in studies:
        if st["modality"] in seen:
            continue
        seen.add(st["modality"])
        out = subprocess.run(
            ["dciodvfy", str(synth / st["dicom"][0])], capture_output=True, text=True, timeout=60
        )
        text = out.stdout + out.stderr
        assert "Error" not in text, text
        assert "Warning" not in text, text
    assert seen == {"CR", "DX"}
