"""The CE labeler on a corpus of real-style report sentences, its per-report output and CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from training.evaluation import EvalRecord, evaluate_records
from training.evaluation.labeler import CHEXPERT_OBSERVATIONS, label_report, label_reports

CORPUS = Path(__file__).parent / "data" / "labeler_corpus.jsonl"
ROWS: list[dict[str, Any]] = [json.loads(line) for line in CORPUS.read_text().splitlines()]
D2R = [sys.executable, "-m", "cli.main"]


def test_corpus_covers_every_failure_class() -> None:
    classes = {row["class"] for row in ROWS}
    assert {"normal_heart", "stable_positive", "no_finding", "context"} <= classes
    assert len(ROWS) >= 250
    assert any("XXXX" in row["text"] for row in ROWS)


@pytest.fixture(scope="module")
def corpus_labels() -> list[dict[str, int | None]]:
    return label_reports(row["text"] for row in ROWS)


@pytest.mark.parametrize("index", range(len(ROWS)), ids=[f"{i}" for i in range(len(ROWS))])
def test_corpus_sentence(index: int, corpus_labels: list[dict[str, int | None]]) -> None:
    row = ROWS[index]
    labels = corpus_labels[index]
    for observation, want in row["labels"].items():
        assert labels[observation] == want, (row["text"], observation, labels)


def test_batched_and_single_labels_agree(corpus_labels: list[dict[str, int | None]]) -> None:
    for index in range(0, len(ROWS), 37):
        assert label_report(ROWS[index]["text"]) == corpus_labels[index]


def test_per_report_labels_are_keyed_by_observation() -> None:
    recs = [
        EvalRecord("b", "Stable mild cardiomegaly. No pleural effusion.", "Heart size normal."),
        EvalRecord("a", "Heart size normal. Lungs are clear.", ""),
    ]
    per = evaluate_records(recs, nlg=False)["per_report"]
    assert [row["id"] for row in per] == ["a", "b"]
    for row in per:
        for key in ("ce_reference", "ce_generated"):
            assert list(row[key]) == list(CHEXPERT_OBSERVATIONS)
    assert per[1]["ce_reference"]["Cardiomegaly"] == 1
    assert per[1]["ce_reference"]["Pleural Effusion"] == 0
    assert per[1]["ce_reference"]["Pneumonia"] is None
    assert per[1]["ce_generated"]["Cardiomegaly"] == 0
    assert per[0]["ce_reference"]["No Finding"] == 1


def test_evaluate_predictions_file(tmp_path: Path) -> None:
    lines = [
        {"id": "r1", "reference": "Stable mild cardiomegaly.", "generated": "Mild cardiomegaly."},
        {
            "id": "r2",
            "reference": "Heart size normal. Lungs are clear.",
            "generated": "The heart is top normal in size. No pneumothorax.",
        },
        {
            "id": "r3",
            "reference": "Right lower lobe opacity consistent with pneumonia.",
            "generated": "No acute cardiopulmonary disease.",
        },
    ]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out" / "metrics.json"
    done = subprocess.run(
        [*D2R, "evaluate", "--predictions", str(preds), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    m = json.loads(out.read_text())
    assert m["meta"]["n"] == 3 and m["meta"]["labeler"]["medspacy"]
    per = {
        row["id"]: row
        for row in map(json.loads, (out.parent / "per_report.jsonl").read_text().splitlines())
    }
    assert (
        per["r1"]["ce_reference"]["Cardiomegaly"] == per["r1"]["ce_generated"]["Cardiomegaly"] == 1
    )
    assert per["r2"]["ce_reference"]["No Finding"] == per["r2"]["ce_generated"]["No Finding"] == 1
    assert per["r3"]["ce_reference"]["Pneumonia"] == 1
    assert per["r3"]["ce_generated"]["Pneumonia"] is None
    # Cardiomegaly and No Finding agree, Pneumonia (r3) and Lung Opacity (r3) are missed
    assert m["ce"]["per_label"]["Cardiomegaly"] == {
        "support": 1,
        "precision": 1.0,
        "recall": 1.0,
        "f1": 1.0,
    }
    assert m["ce"]["per_label"]["Pneumonia"]["recall"] == 0.0


def _iu_reports_module() -> Any:
    import importlib.util

    path = Path(__file__).parents[2] / "bench" / "labeler" / "iu_reports.py"
    spec = importlib.util.spec_from_file_location("bench_iu_reports", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_reads_even_ids_only(tmp_path: Path) -> None:
    import io
    import tarfile

    iu = _iu_reports_module()
    report = (
        '<eCitation><AbstractText Label="INDICATION">Cough.</AbstractText>'
        '<AbstractText Label="FINDINGS">Stable mild cardiomegaly.</AbstractText>'
        '<AbstractText Label="IMPRESSION">No acute disease.</AbstractText>'
        "<MeSH><major>Cardiomegaly/mild</major></MeSH></eCitation>"
    )
    members = {
        "ecgen-radiology/4.xml": report.encode(),
        # odd ids are never parsed: this one is not even XML
        "ecgen-radiology/3.xml": b"<not xml",
        "ecgen-radiology/10.xml": report.replace("mild", "moderate").encode(),
    }
    archive = tmp_path / "NLMCXR_reports.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    reports = list(iu.even_reports(archive))
    assert [r.id for r in reports] == [4, 10]
    assert reports[0].text == "Stable mild cardiomegaly.\nNo acute disease."
    assert reports[1].mesh == ("Cardiomegaly/moderate",)
    assert iu.member_id("ecgen-radiology/3.xml") == 3 and iu.member_id("README") is None
