"""Grounded findings in the SRs: only stated boxes become groups, each with its sentence."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset

from model.predict import Lesion, StudyPrediction
from report.build import AlgorithmInfo, RoiEncoding, build_reports
from worker.pipeline import report_content

# RG1 is 1841 columns wide: a box on the image's right is on the patient's left
LEFT_EFFUSION = Lesion("Pleural effusion", 0.47, (1300.0, 1200.0, 1700.0, 1600.0))
RIGHT_PNEUMOTHORAX = Lesion("Pneumothorax", 0.6, (200.0, 200.0, 700.0, 800.0))
OPACITY = Lesion("Lung Opacity", 0.1, (300.0, 900.0, 500.0, 1100.0))
FINDINGS = "Moderate left pleural effusion. No pneumothorax. Heart size is normal."


def _walk(ds: Dataset) -> list[Dataset]:
    out: list[Dataset] = []
    for item in getattr(ds, "ContentSequence", []):
        out.append(item)
        out += _walk(item)
    return out


def _code(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def _reports(
    header: Dataset, algorithm: AlgorithmInfo, encoding: RoiEncoding = RoiEncoding.TID1410
) -> list[Dataset]:
    prediction = StudyPrediction(
        FINDINGS,
        "Left pleural effusion. Right lower lung nodule.",
        (LEFT_EFFUSION, RIGHT_PNEUMOTHORAX, OPACITY),
        str(header.SOPInstanceUID),
        "d2r-demo-phantom",
        "3.1.0",
    )
    return build_reports(report_content(prediction, [header]), algorithm, roi_encoding=encoding)


def test_only_stated_boxes_become_groups_with_their_sentence(
    rg1_header: Dataset, algorithm: AlgorithmInfo
) -> None:
    comprehensive, text = _reports(rg1_header, algorithm)
    groups = [i for i in _walk(comprehensive) if _code(i) == "125007"]
    assert len(groups) == 1  # the negated pneumothorax and the omitted opacity are left out
    (group,) = groups
    finding = [i for i in group.ContentSequence if _code(i) == "121071"]
    assert finding[0].ConceptCodeSequence[0].CodeMeaning == "Pleural effusion"
    sentences = [
        str(i.TextValue)
        for i in group.ContentSequence
        if i.ValueType == "TEXT" and _code(i) == "C0034375"
    ]
    assert sentences == ["Moderate left pleural effusion."]
    # the impression keeps only what the findings state; both SRs say the same
    for ds in (comprehensive, text):
        (impression,) = [str(i.TextValue) for i in _walk(ds) if _code(i) == "121073"]
        assert impression == "Left pleural effusion."
        (findings,) = [
            str(i.TextValue)
            for i in _walk(ds)
            if i.ValueType == "TEXT" and _code(i) in ("121070", "121071")
        ]
        assert findings == FINDINGS
    # the text SR carries no grounding: text items only, as before
    assert {i.ValueType for i in _walk(text) if _code(i) in ("121071", "121073")} == {"TEXT"}
    assert not any(_code(i) in ("125007", "C0034375") for i in _walk(text))


def test_grounded_sr_is_valid_and_parses_back(
    rg1_header: Dataset,
    algorithm: AlgorithmInfo,
    tmp_path: Path,
    dciodvfy_errors: Callable[[Path], list[str]],
    dsrdump: Callable[[Path], subprocess.CompletedProcess[str]],
) -> None:
    parameters = ("lesion score threshold: 0.3", "input gate: on, threshold 19.308")
    with_parameters = AlgorithmInfo(algorithm.name, algorithm.version, parameters=parameters)
    comprehensive = _reports(rg1_header, with_parameters)[0]
    (group,) = [i for i in _walk(comprehensive) if _code(i) == "125007"]
    written = [str(i.TextValue) for i in _walk(group) if _code(i) == "111002"]
    assert tuple(written) == parameters  # TID 4019 Algorithm Parameters in the group
    path = tmp_path / "sr.dcm"
    comprehensive.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    dump = dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert '"Qualitative Evaluations")="Moderate left pleural' in dump.stdout
    sr = hd.sr.ComprehensiveSR.from_dataset(comprehensive)
    (group,) = sr.content.get_planar_roi_measurement_groups()  # type: ignore[attr-defined]
    assert group.finding_type.meaning == "Pleural effusion"
    assert group.roi is not None


def test_tid1501_group_labels_the_box_with_finding_score_and_sentence(
    rg1_header: Dataset,
    algorithm: AlgorithmInfo,
    tmp_path: Path,
    dciodvfy_errors: Callable[[Path], list[str]],
    dsrdump: Callable[[Path], subprocess.CompletedProcess[str]],
) -> None:
    """D2R_SR_ROI_ENCODING=tid1501: the box under the Certainty NUM, Comments for OHIF."""
    comprehensive = _reports(rg1_header, algorithm, RoiEncoding.TID1501)[0]
    (group,) = [i for i in _walk(comprehensive) if _code(i) == "125007"]
    assert not any(i.ValueType == "SCOORD" for i in group.ContentSequence)  # not TID 1410
    comments = [str(i.TextValue) for i in group.ContentSequence if _code(i) == "121106"]
    assert comments == ["Pleural effusion 47 %", "Moderate left pleural effusion."]
    sentences = [str(i.TextValue) for i in group.ContentSequence if _code(i) == "C0034375"]
    assert sentences == ["Moderate left pleural effusion."]
    path = tmp_path / "sr.dcm"
    comprehensive.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    dump = dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert '"Comment")="Pleural effusion 47 %"' in dump.stdout
    content = hd.sr.ComprehensiveSR.from_dataset(comprehensive).content
    assert content.get_planar_roi_measurement_groups() == []  # type: ignore[attr-defined]
    (parsed,) = content.get_image_measurement_groups()  # type: ignore[attr-defined]
    assert parsed.finding_type.meaning == "Pleural effusion"
    (certainty,) = parsed.get_measurements()
    assert certainty.value == 47.0
    (region,) = certainty.referenced_coordinates
    assert list(region.value[0]) + list(region.value[2]) == list(LEFT_EFFUSION.box)
