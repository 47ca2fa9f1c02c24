"""``d2r synth`` and ``d2r evaluate`` as subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

D2R = [sys.executable, "-m", "cli.main"]


def test_synth_then_evaluate(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    done = subprocess.run(
        [
            *D2R,
            "synth",
            "--out",
            str(out),
            "--studies",
            "4",
            "--seed",
            "1",
            "--size",
            "128",
            "--dicom-size",
            "128",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["studies"] == 4
    studies = [json.loads(x) for x in (out / "studies.jsonl").read_text().splitlines()]
    assert len(studies) == 4 and all((out / s["dicom"][0]).is_file() for s in studies)
    # perfect predictions: the reference itself and the ground-truth boxes
    preds = tmp_path / "preds.jsonl"
    preds.write_text(
        "".join(
            json.dumps(
                {
                    "id": s["id"],
                    "reference": s["reference"],
                    "generated": s["reference"],
                    "gt_lesions": s["gt_lesions"],
                    "pred_lesions": [{**g, "score": 0.9} for g in s["gt_lesions"]],
                    "gt_sentences": s["gt_sentences"],
                    "columns": s["columns"],
                    "rows": s["rows"],
                }
            )
            + "\n"
            for s in studies
        )
    )
    metrics = tmp_path / "m" / "metrics.json"
    done = subprocess.run(
        [*D2R, "evaluate", "--predictions", str(preds), "--out", str(metrics)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    m = json.loads(metrics.read_text())
    assert m["bleu_4"] > 0.99 and m["ce_f1"] > 0.0
    if any(s["gt_lesions"] for s in studies):
        assert m["map50"] == 1.0
        # the reference text grounded in the true boxes: every sentence finds its box
        assert m["grounding_precision"] == m["grounding_recall"] == 1.0
        assert m["contradictions"] == 0
    assert (metrics.parent / "metrics.md").read_text().count("CE computed with") == 1
    assert len((metrics.parent / "per_report.jsonl").read_text().splitlines()) == 4


def test_evaluate_reports_bad_lines(tmp_path: Path) -> None:
    preds = tmp_path / "bad.jsonl"
    preds.write_text('{"id": "a", "reference": "x", "generated": ""}\n{oops\n')
    done = subprocess.run(
        [*D2R, "evaluate", "--predictions", str(preds), "--out", str(tmp_path / "m.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "line 2:" in done.stderr
