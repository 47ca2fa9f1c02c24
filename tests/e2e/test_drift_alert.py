"""A shifted input population raises the drift gauges of a real ``d2r serve`` and fires the
shipped alert rules in ``promtool test rules``.

The bundled demo model's input gate is calibrated again (``d2r calibrate-gate``) on 24 phantom
studies, so that its file keeps the reference distribution of the score. ``d2r serve`` (the
window, the baseline and the least to export: 8 studies) receives 8 more phantom studies over
C-STORE, then 8 phantom studies as another detector renders them (a steeper response curve:
each pixel value ``v`` of the 12-bit range becomes ``v**2.2``, rescaled). After each batch,
``/metrics`` is scraped and its ``d2r_drift_*`` samples become the input series of a promtool
unit test of ``deploy/prometheus/d2r-rules.yml``: after the phantoms nothing fires; after the
shifted ones D2RGateScoreShift and D2RAbstentionsRising do.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.phantom import DEMO_MODEL
from tests.support.processes import (
    REPO,
    Process,
    base_env,
    d2r_cmd,
    free_port,
    run_d2r,
    wait_for,
    wait_port,
)
from tests.support.prometheus import sample_value, scrape

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RULES = REPO / "deploy" / "prometheus" / "d2r-rules.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
BATCH = 8
WINDOW = {"window": f"{BATCH}_studies"}
NODE = "drift-node"


def _synth(out: Path, studies: int, seed: int) -> list[Path]:
    """Phantom studies (512-pixel DICOM, 12 bits); their frontal images."""
    res = run_d2r(
        "synth", "--out", str(out), "--studies", str(studies), "--seed", str(seed),
        "--size", "64", "--dicom-size", "512", env=base_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in (out / "studies.jsonl").read_text().splitlines()]
    return [out / row["dicom"][0] for row in rows]


def _other_detector(path: Path, out: Path) -> Path:
    """The image as a detector with a steeper response curve gives it."""
    ds = pydicom.dcmread(path)
    top = float((1 << int(ds.BitsStored)) - 1)
    pixels = ds.pixel_array.astype(np.float64) / top
    ds.PixelData = np.round(pixels**2.2 * top).astype(np.uint16).tobytes()
    target = out / path.name
    ds.save_as(target, enforce_file_format=True)
    return target


def _store(port: int, files: list[Path]) -> None:
    res = subprocess.run(
        ["/usr/bin/storescu", "-aec", "D2R", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr


def _input_series(metrics: str) -> list[dict[str, str]]:
    """Every ``d2r_drift_*`` sample as a promtool input series, constant for 90 minutes."""
    series = []
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name.startswith("d2r_drift_"):
                labels = {**s.labels, "job": "d2r-serve"}
                text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
                series.append({"series": f"{s.name}{{{text}}}", "values": f"{s.value:.12f}x90"})
    return series


def _alert(name: str) -> dict[str, Any]:
    """The expected alert ``name`` of the shipped rules, on the node's window."""
    (rule,) = [
        r
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for r in group["rules"]
        if r.get("alert") == name
    ]
    labels = {**rule["labels"], **WINDOW, "node": NODE, "job": "d2r-serve"}
    return {"exp_labels": labels, "exp_annotations": rule["annotations"]}


def _promtool(metrics: str, firing: list[str], path: Path) -> subprocess.CompletedProcess[str]:
    """``promtool test rules`` (the test written to ``path``) of the shipped rules on the
    scraped series: at 75 minutes (past every ``for:``) exactly ``firing`` of the drift alerts
    fire."""
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": _input_series(metrics),
                "alert_rule_test": [
                    {
                        "eval_time": "75m",
                        "alertname": name,
                        "exp_alerts": [_alert(name)] if name in firing else [],
                    }
                    for name in ("D2RGateScoreShift", "D2RAbstentionsRising")
                ],
            }
        ],
    }
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    return subprocess.run(
        [PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.timeout(300)
def test_a_shifted_population_raises_the_drift_gauges_and_fires_the_alert(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model)
    calibration = _synth(tmp_path / "calibration", 24, seed=31)
    res = run_d2r("calibrate-gate", "--model", str(model), "--data", str(calibration[0].parents[2]),
                  env=base_env(D2R_INPUT_GATE="on"))  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["reference_quantiles"] == 21
    served = _synth(tmp_path / "served", 2 * BATCH, seed=77)
    (tmp_path / "shifted").mkdir()
    phantoms = served[:BATCH]
    shifted = [_other_detector(p, tmp_path / "shifted") for p in served[BATCH:]]

    node_port, http_port = free_port(), free_port()
    env = base_env(
        D2R_MODEL=str(model),
        D2R_INPUT_GATE="on",
        D2R_BACKEND="torch",
        D2R_SPOOL_DIR=str(tmp_path / "data" / "spool"),
        D2R_PORT=str(node_port),
        D2R_HTTP_PORT=str(http_port),
        D2R_MIN_FREE_BYTES="0",
        D2R_NODE_NAME=NODE,
        D2R_DRIFT_WINDOW_STUDIES=str(BATCH),
        D2R_DRIFT_BASELINE_STUDIES=str(BATCH),
        D2R_DRIFT_MIN_STUDIES=str(BATCH),
    )
    serve = Process(d2r_cmd("serve"), env=env, log=tmp_path / "serve.log")
    try:
        wait_port(node_port, timeout=90)
        wait_port(http_port, timeout=30)

        def done(count: int) -> str | None:
            text = scrape(http_port)
            return text if sample_value(text, "d2r_studies", state="done") == count else None

        try:
            _store(node_port, phantoms)
            in_distribution = wait_for(lambda: done(BATCH), 180, "the phantom studies")
            _store(node_port, shifted)
            after_shift = wait_for(lambda: done(2 * BATCH), 180, "the shifted studies")
        except TimeoutError:
            pytest.fail(f"serve log:\n{serve.log_tail()}")
    finally:
        serve.stop()

    def value(text: str, name: str, **labels: str) -> float:
        found = sample_value(text, name, **labels)
        assert found is not None, (name, labels)
        return found

    # the phantoms the gate was calibrated for: no significant shift, nothing declined
    assert value(in_distribution, "d2r_drift_studies", **WINDOW) == BATCH
    assert value(in_distribution, "d2r_drift_gate_scored_studies", **WINDOW) == BATCH
    assert value(in_distribution, "d2r_drift_gate_score_ks_pvalue", **WINDOW) > 0.01
    assert value(in_distribution, "d2r_drift_abstention_ratio", **WINDOW) == 0.0
    assert value(in_distribution, "d2r_drift_abstention_reference_ratio") == pytest.approx(0.005)
    # the first studies are the positive rates' baseline: the same figures as the window
    assert value(in_distribution, "d2r_drift_baseline_studies") == BATCH
    for finding in ("Cardiomegaly", "Pneumothorax"):
        labels = {"finding": finding}
        assert value(in_distribution, "d2r_drift_positive_ratio", **labels, **WINDOW) == value(
            in_distribution, "d2r_drift_positive_reference_ratio", **labels
        )

    # another detector: every score beyond the calibration's, the gate declines them all
    assert value(after_shift, "d2r_drift_gate_score_ks", **WINDOW) == 1.0
    assert value(after_shift, "d2r_drift_gate_score_ks_pvalue", **WINDOW) < 1e-4
    # all 8 scores in the last of the 20 bins, the 19 others empty (each counts as 1e-4): the
    # largest index there is. (With 8 studies the phantoms' index is large too, by chance:
    # the alert also needs the Kolmogorov-Smirnov p-value, which accounts for the sizes.)
    most = 0.95 * math.log(20) + 19 * (1e-4 - 0.05) * math.log(1e-4 / 0.05)
    assert value(after_shift, "d2r_drift_gate_score_psi", **WINDOW) == pytest.approx(most)
    assert value(in_distribution, "d2r_drift_gate_score_psi", **WINDOW) < most
    assert value(after_shift, "d2r_drift_abstention_ratio", **WINDOW) == 1.0

    quiet = _promtool(in_distribution, [], tmp_path / "quiet.test.yml")
    assert quiet.returncode == 0 and "SUCCESS" in quiet.stdout, quiet.stdout + quiet.stderr
    alerts = ["D2RGateScoreShift", "D2RAbstentionsRising"]
    firing = _promtool(after_shift, alerts, tmp_path / "firing.test.yml")
    assert firing.returncode == 0 and "SUCCESS" in firing.stdout, firing.stdout + firing.stderr
    # and the same series do not pass for a test expecting silence: the alerts really fire
    silent = _promtool(after_shift, [], tmp_path / "silent.test.yml")
    assert (
        silent.returncode != 0 and "alertname: D2RGateScoreShift" in silent.stdout + silent.stderr
    )
