"""The abstention SR: what the worker writes when the model's input gate declines a study."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset

from model.predict import Lesion, StudyPrediction
from report.build import AlgorithmInfo, build_reports
from worker.pipeline import GATE_OFF_COMMENT, report_content


def _texts(ds: Dataset, code: str | None = None) -> list[str]:
    """TEXT values in the tree (only those named ``code``, when given)."""
    out: list[str] = []
    for item in ds.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeValue
        if item.ValueType == "TEXT" and code in (None, name):
            out.append(str(item.TextValue))
        if "ContentSequence" in item:
            out += _texts(item, code)
    return out


def _has_groups(ds: Dataset) -> bool:
    return any(item.ConceptNameCodeSequence[0].CodeValue == "126010" for item in ds.ContentSequence)


def test_abstention_sr_says_who_declined_and_why(
    rg1_header: Dataset,
    algorithm: AlgorithmInfo,
    tmp_path: Path,
    dciodvfy_errors: Callable[[Path], list[str]],
) -> None:
    pred = StudyPrediction(
        "",
        "",
        (),
        str(rg1_header.SOPInstanceUID),
        "d2r-demo-phantom",
        "3.1.0",
        abstained=True,
        abstain_reason="image outside the inputs the model was validated on",
        ood_score=80.1,
        ood_threshold=19.3,
    )
    reports = build_reports(report_content(pred, [rg1_header]), algorithm)
    assert len(reports) == 2
    comprehensive = reports[0]
    assert not _has_groups(comprehensive)
    (findings,) = _texts(comprehensive, "121070")
    assert "not assessed" in findings and "d2r-demo-phantom version 3.1.0" in findings
    assert "outside the inputs" in findings and "80.1" in findings and "19.3" in findings
    for i, ds in enumerate(reports):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []


def test_every_sr_says_when_the_gate_was_off(
    rg1_header: Dataset, algorithm: AlgorithmInfo, tmp_path: Path,
    dciodvfy_errors: Callable[[Path], list[str]],
) -> None:  # fmt: skip
    # on the image's right: the patient's left, as the findings say
    lesion = Lesion("Pleural effusion", 0.5, (1400.0, 1200.0, 1700.0, 1600.0))
    pred = StudyPrediction(
        "There is a small left pleural effusion.",
        "Left pleural effusion.",
        (lesion,),
        str(rg1_header.SOPInstanceUID),
        "d2r-demo-phantom",
        "3.1.0",
        input_gate=False,
    )
    reports = build_reports(report_content(pred, [rg1_header]), algorithm)
    for i, ds in enumerate(reports):
        assert GATE_OFF_COMMENT in _texts(ds)
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
    assert _has_groups(reports[0])
