"""The drafts against the radiologists' signed reports, end to end: phantom studies with
drafts in a real ``d2r node``'s database, their reference reports sent by the RIS over MLLP
(some agreeing with the draft, some not), scored by the node with the labeler of ``d2r
evaluate``; ``/metrics`` and ``d2r feedback report --json`` give the figures computed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from delivery.hl7 import parse_ack
from delivery.mllp import exchange
from studydb.store import StudyStore
from tests.support.processes import (
    Process,
    base_env,
    d2r_cmd,
    free_port,
    run_d2r,
    start_redis,
    wait_for,
    wait_port,
)
from tests.support.prometheus import sample_value, scrape
from tests.support.signed_reports import add_study, oru, set_draft

pytestmark = [pytest.mark.integration, pytest.mark.slow]
pytest.importorskip("medspacy", reason="the labeler of d2r evaluate is not installed")

# (study, draft findings, signed report); every observation the texts do not name is negative
# on both sides
CASES = [
    ("1.6.1", "Small left pleural effusion.", "Small left pleural effusion."),  # agree
    ("1.6.2", "Cardiomegaly. No pleural effusion.", "No cardiomegaly. No pleural effusion."),
    ("1.6.3", "No pneumothorax.", "Right pneumothorax."),
]
ABSTAINED = ("1.6.4", "Not assessed by AI.", "Normal chest.")

# By hand, over the 14 observations of the 3 assessed studies (42 pairs):
# 1.6.2: Cardiomegaly AI only; No Finding radiologist only (the signed report is all negative,
# the draft states cardiomegaly). 1.6.3: Pneumothorax radiologist only; No Finding AI only.
OVERALL = {"studies": 4, "abstentions": 1, "abstention_rate": 0.25, "agreement_rate": 38 / 42}
#: both positive, both negative, AI only, radiologist only, sensitivity, PPV
EXPECTED: dict[str, tuple[float | None, ...]] = {
    "Pleural Effusion": (1, 2, 0, 0, 1.0, 1.0),
    "Cardiomegaly": (0, 2, 1, 0, None, 0.0),
    "Pneumothorax": (0, 2, 0, 1, 0.0, None),
    "No Finding": (0, 1, 1, 1, 0.0, 0.0),
    "Edema": (0, 3, 0, 0, None, None),
}
KEYS = ("both_positive", "both_negative", "ai_only", "radiologist_only", "sensitivity", "ppv")


def _metrics(port: int) -> str:
    return scrape(port)


def _value(metrics: str, name: str, **labels: str) -> float | None:
    """The sample's value (the node adds its own ``node`` label), None when it has none."""
    return sample_value(metrics, name, **labels)


@pytest.mark.timeout(240)
def test_agreement_in_metrics_and_the_report_equals_the_hand_computed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd2r.db'}"
    store = StudyStore(url)
    for uid, draft, _ in [*CASES, ABSTAINED]:
        add_study(store, uid, accession="ACC" + uid)
        set_draft(store, uid, draft, abstained="input gate" if uid == ABSTAINED[0] else "")
    store.close()
    redis, broker = start_redis(tmp_path)
    hl7_port, http_port = free_port(), free_port()
    env = base_env(
        D2R_DATABASE_URL=url,
        D2R_SPOOL_DIR=str(tmp_path / "spool"),
        D2R_HOST="127.0.0.1",
        D2R_PORT=str(free_port()),
        D2R_HTTP_PORT=str(http_port),
        D2R_BROKER_URL=broker,
        D2R_MIN_FREE_BYTES="0",
        D2R_AUDIT_LOG=str(tmp_path / "audit.jsonl"),
        D2R_HL7_LISTEN_PORT=str(hl7_port),
        D2R_FEEDBACK_SCORE_SECONDS="0.5",
    )
    node = Process(d2r_cmd("node"), env=env, log=tmp_path / "node.log")
    try:
        wait_port(hl7_port, timeout=60)
        wait_port(http_port, timeout=60)
        for n, (uid, _, signed) in enumerate([*CASES, ABSTAINED]):
            message = oru(signed, control_id=f"S{n}", accession="ACC" + uid)
            ack = parse_ack(exchange("127.0.0.1", hl7_port, message, timeout=10))
            assert (ack.code, ack.text) == ("AA", "stored as version 1")
        wait_for(
            lambda: _value(_metrics(http_port), "d2r_feedback_studies", window="all") == 4,
            120,
            "the node to score the 4 signed reports",
        )
        metrics = _metrics(http_port)
        report = run_d2r("feedback", "report", "--json", "--no-score", env=env)
        exported = run_d2r("feedback", "export", "--out", str(tmp_path / "export"), env=env)
    finally:
        node.stop()
        redis.stop()
    assert report.returncode == 0, report.stderr
    assert exported.returncode == 0, exported.stderr
    lines = (tmp_path / "export" / "signed_reports.jsonl").read_text().splitlines()
    records = {r["id"]: r for r in map(json.loads, lines)}
    assert {uid: (r["reference"], r["generated"]) for uid, r in records.items()} == {
        uid: (signed, "" if uid == ABSTAINED[0] else draft)
        for uid, draft, signed in [*CASES, ABSTAINED]
    }
    summary = json.loads(report.stdout)
    for key, expected in OVERALL.items():
        assert summary[key] == pytest.approx(expected), key
    for observation in EXPECTED:
        figures = summary["observations"][observation]
        assert tuple(figures[k] for k in KEYS) == pytest.approx(EXPECTED[observation]), observation
    for window in ("all", "30d"):
        assert _value(metrics, "d2r_feedback_studies", window=window) == 4
        assert _value(metrics, "d2r_feedback_abstention_ratio", window=window) == 0.25
        assert _value(metrics, "d2r_feedback_agreement_ratio", window=window) == pytest.approx(
            38 / 42
        )
        for observation in ("Pleural Effusion", "Cardiomegaly", "Pneumothorax", "No Finding"):
            _, _, ai, rad, sens, ppv = EXPECTED[observation]
            labels = {"window": window, "observation": observation}
            assert _value(metrics, "d2r_feedback_sensitivity", **labels) == sens
            assert _value(metrics, "d2r_feedback_ppv", **labels) == ppv
            assert _value(metrics, "d2r_feedback_observations", agreement="ai_only", **labels) == ai
            assert (
                _value(metrics, "d2r_feedback_observations", agreement="radiologist_only", **labels)
                == rad
            )
