"""The alert rules shipped in ``deploy/prometheus``: Prometheus's own ``promtool`` checks them
and runs their unit tests; every metric they name is one the node exports, and every alert
has its section in docs/operations.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from observability.metrics import AgreementCollector, DriftCollector
from studydb.drift import Counts, DriftWindow, GateReference

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "deploy" / "prometheus"
RULES = FOLDER / "d2r-rules.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
ALERTS = ("D2RAgreementFalling", "D2RAbstentionsRising", "D2RGateScoreShift", "D2RNoSignedReports")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=FOLDER, capture_output=True, text=True, timeout=60)


def _rules() -> list[dict[str, object]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_checks_the_rules_and_passes_their_unit_tests() -> None:
    checked = _promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout
    tested = _promtool("test", "rules", "d2r-rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    # every alert has a unit test that expects it to fire
    tests = yaml.safe_load((FOLDER / "d2r-rules.test.yml").read_text())
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == set(ALERTS)


def test_every_metric_the_rules_name_is_exported_by_the_node() -> None:
    gate = GateReference(30.0, 99.5, 40, tuple(float(q) for q in range(21)))
    window = DriftWindow(
        "m", "1", Counts(4, 1, {"Edema": 1}), (1.0, 2.0, 3.0, 4.0), gate, Counts(4, 0, {})
    )
    summary = {
        "studies": 4,
        "abstentions": 1,
        "abstention_rate": 0.25,
        "agreement_rate": 0.9,
        "observations": {},
    }
    registry = CollectorRegistry()
    registry.register(
        DriftCollector(lambda: window, window_studies=4, baseline_studies=4, min_studies=4)
    )
    registry.register(
        AgreementCollector(
            lambda: {"all": summary, "30d": summary},
            last_signed_report=lambda: 1000.0,
            listening_since=None,
        )
    )
    exported = {s.name for family in registry.collect() for s in family.samples}
    named = {m for rule in _rules() for m in re.findall(r"\bd2r_\w+", str(rule["expr"]))}
    assert named and named <= exported, named - exported


def test_every_alert_links_its_section_of_the_operations_guide() -> None:
    headings = {
        line.lstrip("#").strip()
        for line in (ROOT / "docs" / "operations.md").read_text().splitlines()
        if line.startswith("#")
    }
    rules = _rules()
    assert [r["alert"] for r in rules] == list(ALERTS)
    for rule in rules:
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert annotations["runbook_url"] == f"docs/operations.md#{str(rule['alert']).lower()}"
        assert rule["alert"] in headings, rule["alert"]
        assert rule.get("for"), rule["alert"]  # a blip never pages
