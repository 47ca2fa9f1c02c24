from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from d2r_core.classes import VINDR_CLASSES
from tests.support.processes import backend_cache_env

REPO = Path(__file__).resolve().parents[2]


def _d2r(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("D2R_MODEL", "D2R_INPUT_GATE", "D2R_REPORT_CHOICE")
    }
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**base, **backend_cache_env(), **(env or {})},  # not the checkout's d2r-data/
        timeout=300,
    )


def test_init_model_then_predict_json_on_rg1(tmp_path: Path, rg1_path: Path) -> None:
    out = tmp_path / "model"
    res = _d2r("init-model", "--out", str(out), "--preset", "small", "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert "not trained" in res.stdout
    # a checkpoint without input-gate statistics is refused while the gate is on (the default)
    res = _d2r("predict", str(rg1_path), "--json", env={"D2R_MODEL": str(out)})
    assert res.returncode == 1 and not res.stdout
    (line,) = res.stderr.strip().splitlines()
    assert "D2R_INPUT_GATE" in line and "d2r calibrate-gate" in line
    res = _d2r(
        "predict",
        str(rg1_path),
        "--json",
        "--min-score",
        "0.0",
        env={"D2R_MODEL": str(out), "D2R_INPUT_GATE": "off"},
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert {"findings", "impression", "lesions", "model"} <= set(data)
    assert data["input_gate"] == "off" and data["abstained"] is False
    backend = data["model"].pop("backend")  # D2R_BACKEND=auto: the checked ONNX export
    assert backend.startswith("onnxruntime on cpu (D2R_BACKEND=auto: ONNX export of ")
    assert data["model"] == {"name": "d2r-net-random", "version": "0.0.0"}
    ds = pydicom.dcmread(rg1_path, stop_before_pixels=True)
    assert data["lesions"]
    for lesion in data["lesions"]:
        assert set(lesion) == {"class_name", "score", "box", "status", "sentence"}
        # a random model's text states none of its boxes: none is a finding of the report
        assert lesion["status"] in {"negated", "mislocated", "omitted"}
        assert lesion["sentence"] is None
        assert lesion["class_name"] in VINDR_CLASSES
        x0, y0, x1, y1 = lesion["box"]
        assert 0 <= x0 < x1 <= ds.Columns and 0 <= y0 < y1 <= ds.Rows
    text = _d2r("predict", str(rg1_path), "--model", str(out), env={"D2R_INPUT_GATE": "off"})
    assert text.returncode == 0 and "FINDINGS:" in text.stdout and "IMPRESSION:" in text.stdout
    assert "Input gate: off" in text.stdout


def test_predict_errors(
    tmp_path: Path,
    small_checkpoint: Path,
    rg1_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cli.main import main

    monkeypatch.setenv("D2R_MODEL", "")
    monkeypatch.setattr("worker.settings.BUNDLED_MODEL", tmp_path / "no-bundled-model")

    def run(*args: str) -> tuple[int, str]:
        code = main(["predict", *args])
        return code, capsys.readouterr().err

    code, err = run(str(rg1_path))
    assert code == 2 and "D2R_MODEL" in err and len(err.strip().splitlines()) == 1
    code, err = run(str(tmp_path / "absent.dcm"), "--model", str(small_checkpoint))
    assert code == 2 and "no such file" in err
    not_dicom = tmp_path / "x.dcm"
    not_dicom.write_text("hello")
    code, err = run(str(not_dicom), "--model", str(small_checkpoint))
    assert code == 2 and "not a readable DICOM" in err
    code, err = run(str(rg1_path), "--model", str(tmp_path))
    assert code == 1 and "bad checkpoint" in err and len(err.strip().splitlines()) == 1


DEMO = REPO / "models" / "d2r-demo-phantom"


def test_predict_json_ties_each_reported_box_to_its_sentence(tmp_path: Path) -> None:
    """The demo model on phantom studies: sentences list their boxes and the reverse."""
    res = _d2r(
        "synth", "--out", str(tmp_path), "--studies", "3", "--seed", "20261127", "--size", "64",
        "--dicom-size", "1024", "--normal-fraction", "0",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    studies = [json.loads(x) for x in (tmp_path / "studies.jsonl").read_text().splitlines()]
    reported = 0
    for study in studies:
        assert study["gt_sentences"], study  # abnormal studies: true boxes per finding sentence
        res = _d2r("predict", "--json", "--model", str(DEMO), str(tmp_path / study["dicom"][0]))
        assert res.returncode == 0, res.stderr
        data = json.loads(res.stdout)
        sentences, lesions = data["sentences"], data["lesions"]
        findings = [s for s in sentences if s["section"] == "findings"]
        assert " ".join(s["text"] for s in findings) == data["findings"]
        for index, lesion in enumerate(lesions):
            if lesion["status"] == "reported":
                reported += 1
                sentence = sentences[lesion["sentence"]]
                assert sentence["section"] == "findings" and index in sentence["lesions"]
                assert sentence["grounded"] is True
            else:
                assert lesion["sentence"] is None
                assert all(index not in s["lesions"] for s in sentences)
        for sentence in findings:
            assert sentence["grounded"] == (sentence["localised"] and bool(sentence["lesions"]))
        impression = [s["text"] for s in sentences if s["section"] == "impression"]
        kept = [s["text"] for s in sentences if s["section"] == "impression" and s["supported"]]
        assert data["impression"] == " ".join(kept)
        assert data["impression_dropped"] == [t for t in impression if t not in kept]
    assert reported >= len(studies)  # every abnormal phantom study has a reported box


def test_predict_refuses_an_unknown_report_choice(rg1_path: Path) -> None:
    res = _d2r("predict", str(rg1_path), env={"D2R_REPORT_CHOICE": "longest"})
    assert res.returncode == 2 and not res.stdout
    (line,) = res.stderr.strip().splitlines()
    assert "D2R_REPORT_CHOICE" in line and "consistent, probable" in line
