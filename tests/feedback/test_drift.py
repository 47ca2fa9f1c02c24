"""Drift monitoring without a process: the statistics against hand-computed values, the
gate's reference distribution in its file, the window read from a real study database, and
what ``/metrics`` exports of it."""

from __future__ import annotations

import doctest
import importlib
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from d2r_core.classes import VINDR_CLASSES
from d2r_core.errors import ConfigError
from feedback.drift import (
    bin_shares,
    drift_figures,
    ks_pvalue,
    ks_statistic,
    population_stability_index,
    reference_cdf,
)
from feedback.settings import FeedbackSettings
from observability.metrics import (
    AgreementCollector,
    DriftCollector,
    KeyedMemo,
    feedback_collectors,
)
from studydb.drift import (
    Counts,
    DriftWindow,
    GateReference,
    Observation,
    agreement_fingerprint,
    drift_window,
    last_signed_report_at,
    write_observation,
)
from studydb.feedback import ScoringCase, SignedReport
from studydb.store import StudyStore
from tests.support.prometheus import sample_value

QUANTILES = (0.0, 1.0, 2.0, 3.0, 4.0)  # four bins of 1/4 each
GATE = GateReference(threshold=3.9, percentile=99.5, calibration_images=40, quantiles=QUANTILES)


@pytest.mark.parametrize("name", ["feedback.drift", "studydb.drift", "model.gate"])
def test_examples_in_docstrings_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------ statistics
def test_population_stability_index_by_hand() -> None:
    scores = [0.5, 1.5, 1.5, 2.5, 3.5, 3.5, 3.5, 9.0]  # 9.0 is beyond the last quantile
    assert bin_shares(scores, QUANTILES) == [1 / 8, 2 / 8, 1 / 8, 4 / 8]
    # (1/8 - 1/4) ln(1/2) twice, (1/2 - 1/4) ln 2 once: ln 2 / 2
    assert population_stability_index(scores, QUANTILES) == pytest.approx(math.log(2) / 2)
    # an empty bin counts as epsilon: (eps - 1/4) ln(4 eps) for it
    psi = population_stability_index([0.5, 1.5, 2.5], QUANTILES, epsilon=0.01)
    assert psi == pytest.approx(
        3 * (1 / 3 - 1 / 4) * math.log(4 / 3) + (0.01 - 0.25) * math.log(0.04)
    )
    with pytest.raises(ValueError, match="non-decreasing"):
        bin_shares([1.0], (0.0, 2.0, 1.0))
    with pytest.raises(ValueError, match="at least one"):
        population_stability_index([], QUANTILES)


def test_ks_statistic_and_reference_cdf_by_hand() -> None:
    assert reference_cdf(2.5, QUANTILES) == pytest.approx(0.625)
    assert reference_cdf(-1.0, QUANTILES) == 0.0 and reference_cdf(4.0, QUANTILES) == 1.0
    # F at 0.5, 1.0, 3.0: 0.125, 0.25, 0.75; the largest gap is after 1.0: 2/3 - 0.25
    assert ks_statistic([0.5, 1.0, 3.0], QUANTILES) == pytest.approx(2 / 3 - 0.25)
    # tied scores: F(2) = 0.5, the step goes from 0 to 1 there
    assert ks_statistic([2.0, 2.0], QUANTILES) == pytest.approx(0.5)
    assert ks_statistic([5.0, 6.0, 7.0], QUANTILES) == 1.0  # all above the reference


def test_ks_pvalue_matches_the_kolmogorov_distribution() -> None:
    # Q(1.3581) = 0.05 and Q(1.6276) = 0.01: the familiar critical values
    n = 10**6
    root = math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)
    assert ks_pvalue(1.3581 / root, n) == pytest.approx(0.05, abs=1e-4)
    assert ks_pvalue(1.6276 / root, n) == pytest.approx(0.01, abs=1e-4)
    # two samples: the effective size n m / (n + m) replaces n
    effective = 8 * 40 / 48
    root = math.sqrt(effective) + 0.12 + 0.11 / math.sqrt(effective)
    assert ks_pvalue(1.3581 / root, 8, 40) == pytest.approx(0.05, abs=1e-4)
    assert ks_pvalue(0.0, 8, 40) == 1.0 and ks_pvalue(1.0, 8, 40) < 1e-3
    with pytest.raises(ValueError):
        ks_pvalue(0.5, 0)


def _window(
    studies: int,
    abstentions: int,
    positives: dict[str, int],
    scores: tuple[float, ...],
    gate: GateReference | None = GATE,
    baseline: Counts | None = None,
) -> DriftWindow:
    return DriftWindow(
        "m", "1", Counts(studies, abstentions, positives), scores, gate, baseline or Counts()
    )


def test_drift_figures_come_once_due() -> None:
    early = drift_figures(
        _window(3, 1, {"Edema": 1}, (0.5, 1.5, 2.5)),
        window_studies=10,
        baseline_studies=4,
        min_studies=4,
    )
    assert (early.window, early.studies, early.gate_scores) == ("10_studies", 3, 3)
    assert early.abstention_ratio is None and early.gate_score_psi is None
    assert early.positive_ratios == {} and early.positive_reference_ratios == {}
    assert early.abstention_reference_ratio == pytest.approx(0.005)  # 1 - 99.5 / 100

    baseline = Counts(4, 0, {"Edema": 1, "Cardiomegaly": 2})
    scores = (0.5, 1.5, 1.5, 2.5, 3.5, 3.5, 3.5, 9.0)
    due = drift_figures(
        _window(10, 2, {"Edema": 4}, scores, baseline=baseline),
        window_studies=10,
        baseline_studies=4,
        min_studies=4,
    )
    assert due.abstention_ratio == pytest.approx(0.2)
    assert due.gate_score_psi == pytest.approx(math.log(2) / 2)
    assert due.gate_score_ks == pytest.approx(ks_statistic(list(scores), QUANTILES))
    assert due.gate_score_ks_pvalue == pytest.approx(ks_pvalue(due.gate_score_ks or 0, 8, 40))
    assert set(due.positive_ratios) == set(VINDR_CLASSES)
    assert due.positive_ratios["Edema"] == pytest.approx(4 / 8)  # of the 8 not declined
    assert due.positive_ratios["Cardiomegaly"] == 0.0
    assert due.positive_reference_ratios["Cardiomegaly"] == pytest.approx(0.5)

    unfinished = drift_figures(
        _window(10, 2, {}, scores, baseline=baseline),
        window_studies=10,
        baseline_studies=5,
        min_studies=4,
    )
    assert unfinished.positive_reference_ratios == {}  # 4 of 5 baseline studies so far
    old_gate = GateReference(3.9, 99.5, 40)  # a gate file without the quantiles
    no_quantiles = drift_figures(
        _window(10, 2, {}, scores, gate=old_gate),
        window_studies=10,
        baseline_studies=4,
        min_studies=4,
    )
    assert no_quantiles.gate_score_psi is None and no_quantiles.gate_score_ks is None
    assert no_quantiles.abstention_reference_ratio == pytest.approx(0.005)
    gate_off = drift_figures(
        _window(10, 0, {}, (), gate=None), window_studies=10, baseline_studies=4, min_studies=4
    )
    assert gate_off.abstention_reference_ratio is None and gate_off.gate_score_ks is None
    assert gate_off.abstention_ratio == 0.0


# ------------------------------------------------------------------------- the gate's file
def test_the_calibration_keeps_the_held_out_scores_as_the_reference(tmp_path: Path) -> None:
    from model.calibrate import fit_from_features
    from model.errors import CheckpointError
    from model.gate import (
        GATE_FILE,
        REFERENCE_BINS,
        GateCalibration,
        load_calibration,
        load_gate,
    )

    features = torch.randn(40, 4, generator=torch.Generator().manual_seed(3))
    stats = fit_from_features(features, percentile=90.0)
    reference = stats.reference
    assert len(reference) == REFERENCE_BINS + 1
    assert list(reference) == sorted(reference)
    # the threshold is the 90th percentile of the same held-out scores: between the
    # quantiles at 0.85 and 0.95
    assert reference[17] <= stats.threshold <= reference[19]
    stats.save(tmp_path)
    assert load_gate(tmp_path, 4).reference == reference  # type: ignore[union-attr]
    calibration = load_calibration(tmp_path)
    assert calibration == stats.calibration
    assert calibration is not None and calibration.calibration_images == 40

    # a gate file written before the reference was kept: no reference, nothing else lost
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / GATE_FILE), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    old = {k: v for k, v in meta.items() if k != "reference_quantiles"}
    save_file(tensors, str(tmp_path / GATE_FILE), metadata=old)
    assert load_calibration(tmp_path) == GateCalibration(stats.threshold, 90.0, 40, ())
    save_file(tensors, str(tmp_path / GATE_FILE), metadata={**old, "reference_quantiles": "[3, 1]"})
    with pytest.raises(CheckpointError, match="non-decreasing"):
        load_calibration(tmp_path)
    assert load_calibration(tmp_path / "absent") is None


# ----------------------------------------------------------------------- the study database
@pytest.fixture
def store(tmp_path: Path) -> Iterator[StudyStore]:
    s = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    yield s
    s.close()


def _observe(store: StudyStore, uid: str, observation: Observation, at: float) -> None:
    with store.transaction() as conn:
        write_observation(conn, uid, observation, now=at)


def test_the_window_is_the_newest_studies_of_the_current_model_and_gate(
    store: StudyStore,
) -> None:
    assert drift_window(store, window_studies=5, baseline_studies=4) is None
    for i in range(10):
        findings = ("Cardiomegaly",) if i % 2 else ()
        obs = Observation("m", "1", i % 4 == 0, float(i) + 0.5, GATE, findings)
        _observe(store, f"1.{i}", obs, 1000.0 + i)
    # reported again: replaces its observation and becomes the newest
    _observe(store, "1.3", Observation("m", "1", False, 3.5, GATE, ("Edema", "Edema")), 2000.0)
    window = drift_window(store, window_studies=5, baseline_studies=4)
    assert window is not None and (window.model_name, window.model_version) == ("m", "1")
    # the 5 newest: 1.3, 1.9, 1.8 (declined), 1.7, 1.6
    assert window.window == Counts(5, 1, {"Cardiomegaly": 2, "Edema": 1})
    assert sorted(window.gate_scores) == [3.5, 6.5, 7.5, 8.5, 9.5]
    assert window.gate == GATE
    # the baseline: the first 4 still in place, 1.0, 1.1, 1.2, 1.4 (1.0 and 1.4 declined)
    assert window.baseline == Counts(4, 2, {"Cardiomegaly": 1})

    # a re-calibrated gate starts a new window; the model's baseline stays
    gate2 = GateReference(4.2, 99.5, 60, (0.0, 2.0, 4.0))
    _observe(store, "2.1", Observation("m", "1", False, None, gate2), 3000.0)
    window = drift_window(store, window_studies=5, baseline_studies=4)
    assert window is not None and window.gate == gate2
    assert window.window == Counts(1, 0, {}) and window.gate_scores == ()
    assert window.baseline == Counts(4, 2, {"Cardiomegaly": 1})
    # a new model starts a new baseline too; the gate off has no calibration
    _observe(store, "3.1", Observation("m", "2", False, None, None, ("Edema",)), 4000.0)
    window = drift_window(store, window_studies=5, baseline_studies=4)
    assert window is not None and window.model_version == "2" and window.gate is None
    assert window.window == window.baseline == Counts(1, 0, {"Edema": 1})


def test_the_reported_transaction_records_the_observation(store: StudyStore) -> None:
    from tests.support.signed_reports import add_study

    add_study(store, "1.8.1")
    store.mark_queued("1.8.1")
    assert store.claim("1.8.1", generation=1, owner="w", lease_seconds=60)
    assert store.mark_reported(
        "1.8.1",
        owner="w",
        result_paths=[],
        model_name="m",
        model_version="1",
        findings="",
        impression="",
        lesion_count=0,
        destinations=[],
        outcome="abstained: outside",
        observation=Observation("m", "1", True, 12.0, GATE),
    )
    window = drift_window(store, window_studies=5, baseline_studies=5)
    assert window is not None and window.window == Counts(1, 1, {})
    assert window.gate_scores == (12.0,)
    # a stale worker (not the owner) records nothing
    assert not store.mark_reported(
        "1.8.1",
        owner="other",
        result_paths=[],
        model_name="m",
        model_version="1",
        findings="",
        impression="",
        lesion_count=0,
        destinations=[],
        observation=Observation("m", "1", False, 1.0, GATE),
    )
    window = drift_window(store, window_studies=5, baseline_studies=5)
    assert window is not None and window.gate_scores == (12.0,)


def test_agreement_fingerprint_and_last_signed_report(store: StudyStore) -> None:
    assert last_signed_report_at(store) is None
    before = agreement_fingerprint(store, since=0.0)
    store.store_signed_report(SignedReport("1.9.1", 0, "F", "Clear.", "hl7:RIS^H", 5000.0, "M1"))
    assert last_signed_report_at(store) == 5000.0
    assert agreement_fingerprint(store, since=0.0) == before  # nothing scored yet
    case = ScoringCase("1.9.1", 1, "Clear.", "Clear.", "", False, 5000.0)
    store.store_score(case, draft_labels={}, signed_labels={}, labeler="test 1")
    scored = agreement_fingerprint(store, since=0.0)
    assert scored != before and scored[0] == 1
    # the report ages out of the window: the fingerprint says so
    assert agreement_fingerprint(store, since=6000.0) != scored
    # a correction supersedes the scored version
    store.store_signed_report(SignedReport("1.9.1", 0, "C", "Effusion.", "hl7:RIS^H", 5100.0, "M2"))
    assert agreement_fingerprint(store, since=0.0) != scored


# --------------------------------------------------------------------------------- /metrics
def _scrape(*collectors: object) -> str:
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_keyed_memo_computes_again_only_when_the_key_changes() -> None:
    calls: list[int] = []
    key = [1]

    def compute() -> int:
        calls.append(1)
        return len(calls)

    memo = KeyedMemo(compute, lambda: key[0])
    assert (memo(), memo()) == (1, 1)
    key[0] = 2
    assert (memo(), memo(), len(calls)) == (2, 2, 2)


def test_drift_collector_exports_the_figures_that_are_due() -> None:
    baseline = Counts(4, 0, {"Edema": 2})
    scores = (5.0, 6.0, 7.0, 8.0)  # all above the reference
    collector = DriftCollector(
        lambda: _window(4, 1, {"Edema": 3}, scores, baseline=baseline),
        window_studies=4,
        baseline_studies=4,
        min_studies=4,
    )
    text = _scrape(collector)
    w = {"window": "4_studies"}
    assert sample_value(text, "d2r_drift_studies", **w) == 4
    assert sample_value(text, "d2r_drift_gate_scored_studies", **w) == 4
    assert sample_value(text, "d2r_drift_baseline_studies") == 4
    assert sample_value(text, "d2r_drift_gate_score_ks", **w) == 1.0
    assert (sample_value(text, "d2r_drift_gate_score_ks_pvalue", **w) or 1) < 1e-3
    # every score in the last bin: (1 - 1/4) ln(4) + 3 (eps - 1/4) ln(4 eps)
    psi = 0.75 * math.log(4) + 3 * (1e-4 - 0.25) * math.log(4e-4)
    assert sample_value(text, "d2r_drift_gate_score_psi", **w) == pytest.approx(psi)
    assert sample_value(text, "d2r_drift_abstention_ratio", **w) == 0.25
    assert sample_value(text, "d2r_drift_abstention_reference_ratio") == pytest.approx(0.005)
    assert sample_value(text, "d2r_drift_positive_ratio", finding="Edema", **w) == 1.0
    assert sample_value(text, "d2r_drift_positive_reference_ratio", finding="Edema") == 0.5
    assert sample_value(text, "d2r_drift_positive_ratio", finding="Pneumothorax", **w) == 0.0

    early = DriftCollector(
        lambda: _window(3, 0, {}, scores[:3]),
        window_studies=4,
        baseline_studies=4,
        min_studies=4,
    )
    text = _scrape(early)
    assert sample_value(text, "d2r_drift_studies", window="4_studies") == 3
    for name in (
        "d2r_drift_gate_score_psi",
        "d2r_drift_abstention_ratio",
        "d2r_drift_positive_ratio",
    ):
        assert name not in text
    assert (
        _scrape(DriftCollector(lambda: None, window_studies=4, baseline_studies=4, min_studies=4))
        == ""
    )

    def down() -> DriftWindow:
        raise OSError("database down")

    assert _scrape(DriftCollector(down, window_studies=4, baseline_studies=4, min_studies=4)) == ""


def test_last_signed_report_timestamp_falls_back_to_the_listener_start() -> None:
    name = "d2r_feedback_last_signed_report_timestamp_seconds"
    collector = AgreementCollector(dict, last_signed_report=lambda: 5000.0, listening_since=7000.0)
    assert sample_value(_scrape(collector), name) == 5000.0
    collector = AgreementCollector(dict, last_signed_report=lambda: None, listening_since=7000.0)
    assert sample_value(_scrape(collector), name) == 7000.0
    collector = AgreementCollector(dict, last_signed_report=lambda: None, listening_since=None)
    assert sample_value(_scrape(collector), name) is None


def test_the_nodes_collectors_read_the_study_database(store: StudyStore) -> None:
    name = "d2r_feedback_last_signed_report_timestamp_seconds"
    calls: list[int] = []

    def agreement() -> dict[str, dict[str, object]]:
        calls.append(1)
        return {}

    quiet = FeedbackSettings.from_env({"D2R_DRIFT_MIN_STUDIES": "1"})
    before = time.time()
    listening = FeedbackSettings.from_env({"D2R_HL7_LISTEN_PORT": "2575"})
    text = _scrape(*feedback_collectors(store, listening, agreement))
    assert before <= (sample_value(text, name) or 0) <= time.time()
    assert "d2r_drift_" not in text  # nothing reported yet
    _observe(store, "1.1", Observation("m", "1", False, 9.0, GATE, ("Edema",)), 1000.0)
    store.store_signed_report(SignedReport("1.1", 0, "F", "Edema.", "hl7:RIS^H", 5000.0, "M1"))
    collectors = feedback_collectors(store, quiet, agreement)
    text = _scrape(*collectors)
    assert sample_value(text, name) == 5000.0
    assert sample_value(text, "d2r_drift_gate_score_ks", window="500_studies") == 1.0
    assert sample_value(text, "d2r_drift_positive_ratio", finding="Edema") == 1.0
    _scrape(*collectors)  # no new score: the agreement is not computed again
    assert len(calls) == 2  # once per collector made above


def test_drift_settings() -> None:
    settings = FeedbackSettings.from_env({})
    assert (
        settings.drift_window_studies,
        settings.drift_baseline_studies,
        settings.drift_min_studies,
    ) == (500, 500, 100)
    with pytest.raises(ConfigError, match="D2R_DRIFT_MIN_STUDIES"):
        FeedbackSettings.from_env({"D2R_DRIFT_WINDOW_STUDIES": "50"})
    with pytest.raises(ConfigError, match="D2R_DRIFT_WINDOW_STUDIES"):
        FeedbackSettings.from_env({"D2R_DRIFT_WINDOW_STUDIES": "100001"})
    with pytest.raises(ConfigError, match="D2R_DRIFT_BASELINE_STUDIES"):
        FeedbackSettings.from_env({"D2R_DRIFT_BASELINE_STUDIES": "0"})
