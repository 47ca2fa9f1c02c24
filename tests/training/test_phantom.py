"""Phantom: determinism, boxes, devices, DICOM validity, report consistency and coverage."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from model.tokenizer import Tokenizer
from training.evaluation.labeler import CHEXPERT_OBSERVATIONS, label_report
from training.phantom import (
    BILATERAL,
    DEVICE_FRACTION,
    DEVICE_KINDS,
    LOBAR_CONSOLIDATION,
    PHANTOM_CLASSES,
    PhantomStudy,
    render,
    sample_study,
)
from training.phantom_output import PhantomConfig, generate
from training.phantom_report import TOKEN_BUDGET, write_report

# drawn class -> the CheXpert observation its report sentence must make positive
_CHEXPERT = {
    "Cardiomegaly": "Cardiomegaly",
    "Pleural effusion": "Pleural Effusion",
    "Nodule/Mass": "Lung Lesion",
    "Lung cavity": "Lung Lesion",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Lung Opacity": "Lung Opacity",
    "Edema": "Edema",
    "Atelectasis": "Atelectasis",
    "Aortic enlargement": "Enlarged Cardiomediastinum",
    "Pleural thickening": "Pleural Other",
    "Rib fracture": "Fracture",
}
#: seed of the 60-study check set on which every CheXpert observation is positive >= 3 times
CHECK_SEED = 193


def _expected_positive(study: PhantomStudy) -> set[str]:
    """The CheXpert observations the reference findings of ``study`` must make positive."""
    expected = {_CHEXPERT[le.class_name] for le in study.lesions if le.class_name in _CHEXPERT}
    if any(le.attr("pneumonia") == "positive" for le in study.lesions):
        expected.add("Pneumonia")
    if study.devices:
        expected.add("Support Devices")
    return expected


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
            assert gt["class_name"] not in DEVICE_KINDS
            scale = st["columns"] / e["width"]
            assert gt["box"] == pytest.approx(
                [x * scale, y * scale, (x + w) * scale, (y + h) * scale]
            )
            n_boxes += 1
        assert e["devices"] == st["devices"] and set(st["devices"]) <= set(DEVICE_KINDS)
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
    devices_seen: set[str] = set()
    for index in range(80):
        study = sample_study(4, index)
        report = write_report(study)
        labels = label_report(report.findings)
        drawn = {le.class_name for le in study.lesions}
        drawn_seen |= drawn
        devices_seen |= {dev.kind for dev in study.devices}
        expected = _expected_positive(study)
        positive = {k for k, v in labels.items() if v == 1 and k not in ("No Finding",)}
        assert expected <= positive, (report.findings, drawn)
        assert positive <= expected, (report.findings, drawn)
        assert (labels["No Finding"] == 1) == (not drawn), report.findings
        for le in study.lesions:
            if le.class_name in BILATERAL:  # one lesion per lung, reported without a side
                sides = sorted(x.laterality for x in study.lesions if x.class_name == le.class_name)
                assert sides == ["L", "R"], (le.class_name, sides)
            elif le.laterality in ("R", "L"):
                side = {"R": "right", "L": "left"}[le.laterality]
                assert side in report.findings.lower()
        if not drawn:
            assert report.impression
    assert drawn_seen == set(PHANTOM_CLASSES)
    assert devices_seen == set(DEVICE_KINDS)


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


def _studies_with(name: str, count: int, *, seed: int = 3) -> list[PhantomStudy]:
    """The first ``count`` studies of ``seed`` that draw class or device ``name``."""
    found = []
    for index in range(300):
        study = sample_study(seed, index)
        kinds = {le.class_name for le in study.lesions} | {dev.kind for dev in study.devices}
        if name in kinds:
            found.append(study)
            if len(found) == count:
                break
    assert found, name
    return found


def test_check_set_covers_all_14_chexpert_observations() -> None:
    # the labeler on the reference reports (``d2r evaluate`` scores the findings section)
    counts = dict.fromkeys(CHEXPERT_OBSERVATIONS, 0)
    for index in range(60):
        labels = label_report(write_report(sample_study(CHECK_SEED, index)).findings)
        for observation, label in labels.items():
            counts[observation] += label == 1
    assert min(counts.values()) >= 3, counts
    assert 12 <= counts["No Finding"] <= 21, counts  # normal studies stay about 20-35 %


@pytest.mark.parametrize("name", ["Lung Opacity", "Edema", "Consolidation"])
def test_new_findings_are_labelled_positive_not_uncertain(name: str) -> None:
    for study in _studies_with(name, 8):
        report = write_report(study)
        for text in (report.findings, report.impression):
            labels = label_report(text)
            if name == "Lung Opacity" and "opacity" in text.lower():
                assert labels["Lung Opacity"] == 1, text
            if name == "Edema" and "edema" in text.lower():
                assert labels["Edema"] == 1, text
                assert labels["Cardiomegaly"] != -1, text  # no "chf" / "heart failure"
        labels = label_report(report.findings)
        drawn = {le.class_name for le in study.lesions}
        if name == "Lung Opacity" and "Consolidation" not in drawn:
            # an opacity is neither a consolidation nor a pneumonia (absent or negated only)
            assert labels["Consolidation"] in (None, 0), report
            assert labels["Pneumonia"] in (None, 0), report
        if name == "Consolidation":
            kind = next(le for le in study.lesions if le.class_name == name).attr("pneumonia")
            want = {"positive": 1, "concerning": -1, "compatible": -1, "": None}[kind]
            assert labels["Pneumonia"] == want, report.findings
            if kind == "positive":
                assert labels["Pneumonia"] == 1 == label_report(report.impression)["Pneumonia"]


def test_pneumonia_is_named_for_lobar_consolidations_only() -> None:
    # the image decides: radii of the two kinds lie on either side of a gap
    radii: dict[bool, list[float]] = {True: [], False: []}
    for study in _studies_with("Consolidation", 40):
        for le in study.lesions:
            if le.class_name == "Consolidation":
                radii[le.attr("pneumonia") == "positive"].append(le.p("r"))
    assert len(radii[True]) >= 5 and len(radii[False]) >= 5, radii
    assert min(radii[True]) >= LOBAR_CONSOLIDATION + 0.007, radii
    assert max(radii[False]) <= LOBAR_CONSOLIDATION - 0.007, radii


def test_device_fraction_sets_how_many_studies_carry_devices() -> None:
    def share(fraction: float) -> float:
        studies = [sample_study(5, i, device_fraction=fraction) for i in range(200)]
        return sum(bool(s.devices) for s in studies) / len(studies)

    assert share(0.0) == 0.0
    low, high = share(DEVICE_FRACTION), share(0.4)
    assert 0.08 <= low <= 0.3 and high >= low + 0.2, (low, high)
    # the other draws of a study do not depend on the fraction
    a, b = sample_study(5, 7, device_fraction=0.0), sample_study(5, 7, device_fraction=1.0)
    assert a.lesions == b.lesions and a.anatomy == b.anatomy and b.devices


@pytest.mark.parametrize("name", ["Lung Opacity", "Edema"])
def test_new_classes_box_inside_the_image_where_the_drawing_changes_pixels(name: str) -> None:
    size = 128
    for study in _studies_with(name, 4):
        drawn = render(study, size, noise=False)
        for i, (le, box) in enumerate(zip(study.lesions, drawn.boxes, strict=True)):
            if le.class_name != name:
                continue
            x0, y0, x1, y1 = box
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0, box
            if le.laterality == "R":
                assert x1 <= study.anatomy.cx + 0.02  # patient's right = image left
            else:
                assert x0 >= study.anatomy.cx - 0.02
            without = dataclasses.replace(study, lesions=study.lesions[:i] + study.lesions[i + 1 :])
            diff = np.abs(drawn.image - render(without, size, noise=False).image)
            r0, r1 = round(y0 * size), round(y1 * size)
            c0, c1 = round(x0 * size), round(x1 * size)
            inside = diff[r0:r1, c0:c1]
            assert inside.max() > 0.08 and inside.mean() > 0.02, (name, inside.mean())
            outside = diff.copy()
            outside[r0:r1, c0:c1] = 0.0
            assert outside.max() <= 0.04 + 1e-5  # the box holds every clear change
            if name == "Edema":  # reaches the lung base (Kerley lines, basal haze)
                assert y1 > study.anatomy.dome and y1 - y0 > 0.25


def test_devices_change_pixels_but_add_no_box() -> None:
    size = 128
    seen = set()
    for kind in DEVICE_KINDS:
        for study in _studies_with(kind, 3):
            assert all(le.class_name in PHANTOM_CLASSES for le in study.lesions)
            drawn = render(study, size, noise=False)
            bare = render(dataclasses.replace(study, devices=()), size, noise=False)
            assert drawn.boxes == bare.boxes and len(drawn.boxes) == len(study.lesions)
            for dev in study.devices:
                seen.add(dev.kind)
                one = render(dataclasses.replace(study, devices=(dev,)), size, noise=False)
                changed = np.abs(one.image - bare.image) > 0.05
                rows, cols = np.nonzero(changed)
                assert rows.size > size // 4, dev.kind
                cx = study.anatomy.cx * size
                # both run down from the top of the image and end above the heart
                assert rows.min() <= 0.05 * size and rows.max() <= study.anatomy.carina * size + 8
                if dev.kind == "Endotracheal tube":  # on the midline, tip above the carina
                    assert np.abs(cols - cx).max() <= 0.02 * size + 2
                    assert rows.max() < study.anatomy.carina * size
                else:  # right internal jugular: the patient's right, image left
                    assert cols.max() < cx
    assert seen == set(DEVICE_KINDS)


def test_sampling_and_rendering_with_new_findings_are_deterministic() -> None:
    study = _studies_with("Edema", 1)[0]
    again = sample_study(study.seed, study.index)
    assert again == study and np.array_equal(again.texture, study.texture)
    for name in ("Lung Opacity", "Central venous catheter", "Endotracheal tube"):
        s = _studies_with(name, 1)[0]
        a, b = render(s, 96), render(sample_study(s.seed, s.index), 96)
        assert np.array_equal(a.image, b.image) and a.boxes == b.boxes
    assert sample_study(3, 5) != sample_study(4, 5)


def test_reports_fit_the_decoder_token_budget() -> None:
    tok = Tokenizer([])  # lengths do not depend on the vocabulary
    lengths = np.array(
        [
            len(tok.encode(r.findings, r.impression))
            for r in (
                write_report(sample_study(seed, i)) for seed in (4, CHECK_SEED) for i in range(300)
            )
        ]
    )
    assert TOKEN_BUDGET <= 55
    assert lengths.max() <= TOKEN_BUDGET, lengths.max()  # the demo decoder stops at 60
    assert np.percentile(lengths, 95) <= 55
