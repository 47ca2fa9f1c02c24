"""Prometheus metrics of the node and the workers.

Counters and histograms are module-level metrics moved by small hook functions
(:func:`observe_association`, :func:`observe_store_response`, :func:`observe_send_attempt` ...).
Gauges that describe shared state are read at scrape time by custom collectors, so the database
and the broker stay the truth: :class:`StudiesByStateCollector` (``d2r_studies{state}`` from
``StudyStore.count_by_state()``) and :class:`QueueDepthCollector` (``d2r_queue_depth{queue}``:
Redis ``LLEN`` or the file count of the embedded ``filesystem://`` queue).

Several processes (``d2r serve``: node and worker child; a prefork worker: pool children) share one
endpoint through prometheus_client's multiprocess mode: the entry point sets
``PROMETHEUS_MULTIPROC_DIR`` *before* this module is first imported, and
:func:`build_registry` aggregates every process's files.

=====================================  =========  ============================================
metric                                 type       labels
=====================================  =========  ============================================
``d2r_associations_total``             counter    ``result`` (accepted/rejected), ``reason``
``d2r_instances_received_total``       counter    ``outcome`` (stored/duplicate/conflict)
``d2r_instances_rejected_total``       counter    ``reason`` (a DIMSE status name)
``d2r_studies``                        gauge      ``state`` (collector, from the database)
``d2r_queued_studies``                 gauge      ``priority`` (collector, from the database)
``d2r_queue_depth``                    gauge      ``queue`` (collector, from the broker)
``d2r_study_end_to_end_seconds``       histogram  first instance received -> SRs acknowledged
``d2r_inference_seconds``              histogram  one model prediction (a batch: one call)
``d2r_reports_total``                  counter    ``result`` (reported/failed)
``d2r_send_attempts_total``            counter    ``destination``
``d2r_deliveries_total``               counter    ``type`` (dicom/dicomweb/mllp/fhir), ``outcome``
                                                  (sent/transient/permanent/unexpected)
``d2r_send_failures_total``            counter    ``destination``, ``kind`` (transient/permanent)
``d2r_send_retries_total``             counter    ``destination`` (a failed attempt to retry)
``d2r_model_info``                     gauge      ``name``, ``version`` (1 while loaded)
``d2r_http_refusals_total``            counter    ``reason`` (no_credential, bad_token,
                                                  bad_password, bad_scheme, untrusted_proxy,
                                                  missing_role, rate_limited)
=====================================  =========  ============================================

The drafts against the signed reports (:class:`AgreementCollector`, ``d2r_feedback_*``) and
the drift of the served studies against the checkpoint's calibration (:class:`DriftCollector`,
``d2r_drift_*``) are read from the database at scrape time too; the alert rules on them ship in
``deploy/prometheus/d2r-rules.yml``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from d2r_core import statuses
from d2r_core.priority import PRIORITY_VALUES
from feedback.drift import DriftFigures, drift_figures
from feedback.settings import FeedbackSettings
from studydb import drift
from studydb.drift import DriftWindow
from studydb.engine import Database
from studydb.records import DONE, STUDY_STATES, StudyView

__all__ = [
    "AgreementCollector",
    "DriftCollector",
    "KeyedMemo",
    "NodeLabelled",
    "OldestUnfinishedCollector",
    "QueueDepthCollector",
    "QueuedByPriorityCollector",
    "StudiesByStateCollector",
    "build_registry",
    "feedback_collectors",
    "mark_process_dead",
    "loaded_backends",
    "model_loaded",
    "observe_association",
    "observe_http_refusal",
    "observe_inference",
    "observe_instance",
    "observe_report",
    "observe_send_attempt",
    "observe_store_response",
    "observe_study_done",
    "rejection_reason",
    "set_backend_info",
    "set_model_info",
    "study_done_latency",
]

logger = logging.getLogger(__name__)

ACCEPTED: Final = "accepted"
REJECTED: Final = "rejected"
INSTANCE_OUTCOMES: Final = ("stored", "duplicate", "conflict")

ASSOCIATIONS = Counter(
    "d2r_associations", "Associations requested of the listener", ["result", "reason"]
)
INSTANCES_RECEIVED = Counter(
    "d2r_instances_received", "Instances received and answered Success", ["outcome"]
)
INSTANCES_REJECTED = Counter(
    "d2r_instances_rejected", "Instances answered with a failure status", ["reason"]
)
STUDY_END_TO_END = Histogram(
    "d2r_study_end_to_end_seconds",
    "From a study's first instance received to its SRs acknowledged by every destination",
    buckets=(5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 3600),
)
INFERENCE = Histogram(
    "d2r_inference_seconds",
    "Duration of one model prediction (decode, preprocess, detector, report generator)",
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120),
)
REPORTS = Counter("d2r_reports", "Report jobs finished by a worker", ["result"])
ATTEMPT_FAILURES = Counter(
    "d2r_attempt_failures",
    "Worker attempts ended by an unexpected error or a lost worker, by stage",
    ["stage"],
)
STUDIES_FAILED_AFTER_ATTEMPTS = Counter(
    "d2r_studies_failed_after_attempts",
    "Studies failed because their last allowed attempt ended in an unexpected error, by stage",
    ["stage"],
)
DELIVERIES = Counter(
    "d2r_deliveries",
    "Attempts to deliver a study's results, by destination type and outcome",
    ["type", "outcome"],
)
SEND_ATTEMPTS = Counter("d2r_send_attempts", "Attempts to send a study's SRs", ["destination"])
SEND_FAILURES = Counter(
    "d2r_send_failures", "Failed attempts to send a study's SRs", ["destination", "kind"]
)
SEND_RETRIES = Counter(
    "d2r_send_retries", "Failed send attempts that will be retried", ["destination"]
)
HTTP_REFUSALS = Counter(
    "d2r_http_refusals", "HTTP requests refused by the endpoint's authentication", ["reason"]
)
MODEL_INFO = Gauge(
    "d2r_model_info",
    "The model a worker process has loaded (1 while loaded)",
    ["name", "version"],
    multiprocess_mode="livemax",
)

BACKEND_INFO = Gauge(
    "d2r_backend_info",
    "The inference backend a worker process runs (1 while loaded): policy auto or explicit, "
    "fallback the reason auto runs torch instead of its first choice (none otherwise)",
    ["backend", "device", "policy", "fallback"],
    multiprocess_mode="livemax",
)
BACKEND_FALLBACKS = Counter(
    "d2r_backend_fallbacks",
    "Worker processes that started torch because D2R_BACKEND=auto could not use its first "
    "choice (export failed, parity check failed, export or engine did not load)",
    ["reason"],
)

#: failure status -> the ``reason`` label of ``d2r_instances_rejected_total``
_REJECTION_REASONS: Final = {
    statuses.OUT_OF_RESOURCES: "out_of_resources",
    statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS: "dataset_does_not_match_sop_class",
    statuses.CANNOT_UNDERSTAND: "cannot_understand",
    statuses.PROCESSING_FAILURE: "processing_failure",
    statuses.SOP_CLASS_NOT_SUPPORTED: "sop_class_not_supported",
    statuses.NOT_AUTHORIZED: "not_authorized",
}


# ------------------------------------------------------------------------------------- hooks
def observe_http_refusal(reason: str) -> None:
    """Count one refused HTTP request (``reason``: a fixed token of :mod:`d2r_http.auth`)."""
    HTTP_REFUSALS.labels(reason).inc()


def observe_association(accepted: bool, reason: str = "") -> None:
    """Count one association request (``reason``: a short, fixed token for a rejection)."""
    ASSOCIATIONS.labels(ACCEPTED if accepted else REJECTED, reason).inc()


def observe_instance(outcome: str) -> None:
    """Count one instance answered Success (``stored``, ``duplicate`` or ``conflict``)."""
    if outcome not in INSTANCE_OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(INSTANCE_OUTCOMES)}, not {outcome!r}")
    INSTANCES_RECEIVED.labels(outcome).inc()


def rejection_reason(status: int) -> str:
    """The ``reason`` label for a failure ``status`` (its range's first code decides)."""
    for code in (status, status & 0xFF00, status & 0xF000):
        if code in _REJECTION_REASONS:
            return _REJECTION_REASONS[code]
    return f"status_0x{status:04x}"


def observe_store_response(status: int, outcome: str | None) -> None:
    """Count one C-STORE response sent by the listener.

    Success and warnings count as received with ``outcome`` (default ``stored``); failures as
    rejected with a reason derived from the status.
    """
    if statuses.is_failure(status):
        INSTANCES_REJECTED.labels(rejection_reason(status)).inc()
    else:
        observe_instance(outcome or "stored")


def observe_inference(seconds: float) -> None:
    INFERENCE.observe(seconds)


def observe_report(result: str) -> None:
    """Count a finished report job (``reported``, ``abstained`` — the model's input gate
    declined the study and an abstention SR was written — or ``failed``)."""
    REPORTS.labels(result).inc()


def observe_failed_attempt(stage: str, *, final: bool) -> None:
    """Count an attempt ended by an unexpected error; ``final`` when it failed the study."""
    ATTEMPT_FAILURES.labels(stage).inc()
    if final:
        STUDIES_FAILED_AFTER_ATTEMPTS.labels(stage).inc()


def observe_send_attempt(
    destination: str, *, kind: str, ok: bool, failure: str | None, retry: bool
) -> None:
    """Count one send attempt; ``failure`` is ``transient`` or ``permanent`` when it failed.

    ``kind`` is the destination's type (dicom, dicomweb, mllp, fhir).
    """
    SEND_ATTEMPTS.labels(destination).inc()
    DELIVERIES.labels(kind, "sent" if ok else failure or "unknown").inc()
    if not ok:
        SEND_FAILURES.labels(destination, failure or "unknown").inc()
        if retry:
            SEND_RETRIES.labels(destination).inc()


def study_done_latency(view: StudyView, destination: str | None) -> float | None:
    """End-to-end seconds of a ``done`` study, for the caller that completed it; else None.

    ``destination`` is the delivery just recorded as sent. Several deliveries of one study each
    finish in their own transaction, and the study becomes done in the one that sent last, so
    only the caller whose delivery has the latest ``sent_at`` gets a value: each study is
    observed once. A study without destinations (``destination`` None) is done when reported.
    """
    if view.state != DONE or view.finished_at is None:
        return None
    if destination is not None:
        sent = {d.destination: d.sent_at for d in view.deliveries if d.sent_at is not None}
        mine = sent.get(destination)
        if mine is None or mine < max(sent.values()):
            return None
    elif view.deliveries:
        return None
    return max(0.0, view.finished_at - view.first_received_at)


def observe_study_done(view: StudyView, destination: str | None) -> float | None:
    """Observe :func:`study_done_latency` when it applies; returns it."""
    seconds = study_done_latency(view, destination)
    if seconds is not None:
        STUDY_END_TO_END.observe(seconds)
    return seconds


def mark_process_dead(pid: int, multiprocess_dir: str) -> None:
    """Drop the live gauges of process ``pid`` from a multiprocess folder (it has exited)."""
    multiprocess.mark_process_dead(pid, multiprocess_dir)  # type: ignore[no-untyped-call]


def set_model_info(name: str, version: str) -> None:
    """Record that this process has loaded model ``name`` ``version``."""
    MODEL_INFO.labels(name, version).set(1)


def set_backend_info(backend: str, device: str, policy: str, fallback: str | None) -> None:
    """Record the backend this process runs; count a fallback of ``D2R_BACKEND=auto``."""
    BACKEND_INFO.labels(backend, device, policy, fallback or "none").set(1)
    if fallback is not None:
        BACKEND_FALLBACKS.labels(fallback).inc()


def loaded_backends(registry: CollectorRegistry) -> str:
    """The backends the processes feeding ``registry`` run, e.g. ``onnxruntime on cpu (auto)``
    ("" before one has loaded)."""
    seen = set()
    for family in registry.collect():
        if family.name == "d2r_backend_info":
            for sample in family.samples:
                if sample.value >= 1:
                    labels = sample.labels
                    text = f"{labels['backend']} on {labels['device']} ({labels['policy']}"
                    if labels.get("fallback", "none") != "none":
                        text += f", fallback {labels['fallback']}"
                    seen.add(text + ")")
    return "; ".join(sorted(seen))


def model_loaded(registry: CollectorRegistry) -> bool:
    """Whether any process feeding ``registry`` reports a loaded model."""
    for family in registry.collect():
        if family.name == "d2r_model_info":
            return any(s.value >= 1 for s in family.samples)
    return False


# -------------------------------------------------------------------------------- collectors
class StudiesByStateCollector(Collector):
    """``d2r_studies{state}``: the number of studies in each state, read from the database."""

    def __init__(self, count_by_state: Callable[[], dict[str, int]]) -> None:
        self._count = count_by_state

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "d2r_studies", "Studies in each state (from the study database)", labels=["state"]
        )
        counts = _scraped(self._count, "count studies by state")
        if counts is None:
            return
        for state in STUDY_STATES:
            family.add_metric([state], counts.get(state, 0))
        yield family


_T = TypeVar("_T")


def _scraped(read: Callable[[], _T | None], what: str) -> _T | None:
    """``read()``, or None with a warning naming ``what``: a scrape must still answer while the
    database is down."""
    try:
        return read()
    except Exception as exc:
        logger.warning("cannot %s: %s", what, exc)
        return None


_UNSET: Final = object()


class KeyedMemo(Generic[_T]):
    """``compute()``'s last value, computed again only when ``key()`` (a cheap read, e.g. a
    few aggregates) differs from the key it was computed under."""

    def __init__(self, compute: Callable[[], _T], key: Callable[[], Hashable]) -> None:
        self._compute = compute
        self._key = key
        self._lock = threading.Lock()
        self._last: tuple[Hashable, Any] = (_UNSET, _UNSET)

    def __call__(self) -> _T:
        key = self._key()
        with self._lock:
            last_key, value = self._last
        if value is not _UNSET and last_key == key:
            return value  # type: ignore[no-any-return]
        fresh = self._compute()
        with self._lock:
            self._last = (key, fresh)
        return fresh


class AgreementCollector(Collector):
    """The drafts against the radiologists' signed reports, read from the database, per
    ``window`` (``all``, and the last ``D2R_FEEDBACK_WINDOW_DAYS``): ``d2r_feedback_studies``,
    ``d2r_feedback_abstention_ratio``, ``d2r_feedback_agreement_ratio``, and per
    ``observation`` ``d2r_feedback_sensitivity``, ``d2r_feedback_ppv`` and
    ``d2r_feedback_observations{agreement}`` (both_positive, both_negative, ai_only,
    radiologist_only). A ratio without a denominator has no sample.

    ``summaries`` returns window -> the summary ``d2r feedback report --json`` prints (a
    :class:`KeyedMemo` spares a scrape from reading every score).
    ``d2r_feedback_last_signed_report_timestamp_seconds`` says when the newest signed report
    arrived (``last_signed_report``); before the first, ``listening_since`` (when the HL7
    listener started; None: no sample).
    """

    def __init__(
        self,
        summaries: Callable[[], Mapping[str, Mapping[str, Any]]],
        *,
        last_signed_report: Callable[[], float | None] | None = None,
        listening_since: float | None = None,
    ) -> None:
        self._summaries = summaries
        self._last_signed_report = last_signed_report
        self._listening_since = listening_since

    def collect(self) -> Iterator[Metric]:
        try:
            summaries = self._summaries()
            last = self._last_arrival()
        except Exception as exc:  # a scrape must still answer while the database is down
            logger.warning("cannot read the signed-report agreement: %s", exc)
            return
        if last is not None:
            yield GaugeMetricFamily(
                "d2r_feedback_last_signed_report_timestamp_seconds",
                "When the newest signed report arrived (before the first: when the node "
                "started taking them), seconds since the epoch",
                value=last,
            )
        yield from self._agreement(summaries)

    def _last_arrival(self) -> float | None:
        last = None if self._last_signed_report is None else self._last_signed_report()
        return self._listening_since if last is None else last

    def _agreement(self, summaries: Mapping[str, Mapping[str, Any]]) -> Iterator[Metric]:
        w, wo = ["window"], ["window", "observation"]
        studies = GaugeMetricFamily(
            "d2r_feedback_studies",
            "Studies whose draft was scored against a signed report",
            labels=w,
        )
        abstention = GaugeMetricFamily(
            "d2r_feedback_abstention_ratio", "Scored studies where the model abstained", labels=w
        )
        agreement = GaugeMetricFamily(
            "d2r_feedback_agreement_ratio",
            "Observations where draft and signed report agree (both positive or both negative)",
            labels=w,
        )
        sensitivity = GaugeMetricFamily(
            "d2r_feedback_sensitivity", "Draft sensitivity against the signed report", labels=wo
        )
        ppv = GaugeMetricFamily(
            "d2r_feedback_ppv",
            "Draft positive predictive value against the signed report",
            labels=wo,
        )
        counts = GaugeMetricFamily(
            "d2r_feedback_observations",
            "Scored studies by observation and agreement",
            labels=[*wo, "agreement"],
        )
        for window, summary in summaries.items():
            studies.add_metric([window], summary["studies"])
            for family, key in ((abstention, "abstention_rate"), (agreement, "agreement_rate")):
                if summary[key] is not None:
                    family.add_metric([window], summary[key])
            for observation, figures in summary["observations"].items():
                for family, key in ((sensitivity, "sensitivity"), (ppv, "ppv")):
                    if figures[key] is not None:
                        family.add_metric([window, observation], figures[key])
                for kind in ("both_positive", "both_negative", "ai_only", "radiologist_only"):
                    counts.add_metric([window, observation, kind], figures[kind])
        yield from (studies, abstention, agreement, sensitivity, ppv, counts)


class DriftCollector(Collector):
    """The drift of the studies served against the checkpoint's calibration
    (:mod:`feedback.drift`), over the window of the latest ``D2R_DRIFT_WINDOW_STUDIES``
    studies of the current model (label ``window``, e.g. ``500_studies``):

    * ``d2r_drift_studies`` and ``d2r_drift_gate_scored_studies`` in the window,
      ``d2r_drift_baseline_studies`` in the positive rates' baseline (so far);
    * ``d2r_drift_gate_score_psi``, ``d2r_drift_gate_score_ks`` and
      ``d2r_drift_gate_score_ks_pvalue``: the gate's scores against its calibration;
    * ``d2r_drift_abstention_ratio`` and ``d2r_drift_abstention_reference_ratio``;
    * per ``finding``, ``d2r_drift_positive_ratio`` and ``d2r_drift_positive_reference_ratio``.

    A figure not computed yet (fewer than ``D2R_DRIFT_MIN_STUDIES`` studies in the window, no
    reference distribution in the gate file, a baseline not complete) has no sample.

    Parameters
    ----------
    read_window : callable
        The window from the database (:func:`studydb.drift.drift_window`), None before the
        first reported study.
    window_studies, baseline_studies, min_studies : int
        ``D2R_DRIFT_WINDOW_STUDIES``, ``D2R_DRIFT_BASELINE_STUDIES``, ``D2R_DRIFT_MIN_STUDIES``.
    """

    def __init__(
        self,
        read_window: Callable[[], DriftWindow | None],
        *,
        window_studies: int,
        baseline_studies: int,
        min_studies: int,
    ) -> None:
        self._read = read_window
        self._window_studies = window_studies
        self._baseline_studies = baseline_studies
        self._min_studies = min_studies

    def figures(self) -> DriftFigures | None:
        """The figures of the current window (None before the first reported study)."""
        window = self._read()
        if window is None:
            return None
        return drift_figures(
            window,
            window_studies=self._window_studies,
            baseline_studies=self._baseline_studies,
            min_studies=self._min_studies,
        )

    def collect(self) -> Iterator[Metric]:
        figures = _scraped(self.figures, "read the drift figures")
        if figures is None:
            return
        for name, documentation, attribute, windowed in _DRIFT_GAUGES:
            value = getattr(figures, attribute)
            if value is None:
                continue
            if windowed:
                family = GaugeMetricFamily(name, documentation, labels=["window"])
                family.add_metric([figures.window], value)
                yield family
            else:
                yield GaugeMetricFamily(name, documentation, value=value)
        if figures.positive_ratios:
            family = GaugeMetricFamily(
                "d2r_drift_positive_ratio",
                "Studies in the drift window (not declined) whose draft states the finding",
                labels=["finding", "window"],
            )
            for finding, value in figures.positive_ratios.items():
                family.add_metric([finding, figures.window], value)
            yield family
        if figures.positive_reference_ratios:
            family = GaugeMetricFamily(
                "d2r_drift_positive_reference_ratio",
                "The same share in the model's baseline studies",
                labels=["finding"],
            )
            for finding, value in figures.positive_reference_ratios.items():
                family.add_metric([finding], value)
            yield family


#: the drift gauges of one value: name, help, the :class:`~feedback.drift.DriftFigures`
#: attribute, and whether it carries the ``window`` label
_DRIFT_GAUGES: Final = (
    ("d2r_drift_studies", "Reported studies in the drift window", "studies", True),
    (
        "d2r_drift_gate_scored_studies",
        "Studies in the drift window with an input-gate score",
        "gate_scores",
        True,
    ),
    (
        "d2r_drift_baseline_studies",
        "Studies in the baseline of the positive rates (complete at D2R_DRIFT_BASELINE_STUDIES)",
        "baseline_studies",
        False,
    ),
    (
        "d2r_drift_gate_score_psi",
        "Population stability index of the input gate's scores against its calibration",
        "gate_score_psi",
        True,
    ),
    (
        "d2r_drift_gate_score_ks",
        "Kolmogorov-Smirnov statistic of the input gate's scores against its calibration",
        "gate_score_ks",
        True,
    ),
    (
        "d2r_drift_gate_score_ks_pvalue",
        "p-value of the Kolmogorov-Smirnov statistic (two samples: the window and the "
        "calibration's held-out images)",
        "gate_score_ks_pvalue",
        True,
    ),
    (
        "d2r_drift_abstention_ratio",
        "Studies in the drift window the input gate declined",
        "abstention_ratio",
        True,
    ),
    (
        "d2r_drift_abstention_reference_ratio",
        "Held-out in-distribution images above the input gate's threshold (1 - percentile / 100)",
        "abstention_reference_ratio",
        False,
    ),
)


def feedback_collectors(
    store: Database,
    settings: FeedbackSettings,
    agreement: Callable[[], Mapping[str, Mapping[str, Any]]],
) -> list[Collector]:
    """The node's :class:`AgreementCollector` (``agreement`` computed again only when the
    scores change: :func:`studydb.drift.agreement_fingerprint`) and :class:`DriftCollector`
    over ``store``, made when the node starts: with ``D2R_HL7_LISTEN_PORT`` set, the
    listener is taken to listen since then."""
    listening_since = time.time() if settings.port else None

    def agreement_key() -> Hashable:
        since = time.time() - settings.window_days * 86400.0
        return drift.agreement_fingerprint(store, since=since)

    def read_window() -> DriftWindow | None:
        return drift.drift_window(
            store,
            window_studies=settings.drift_window_studies,
            baseline_studies=settings.drift_baseline_studies,
        )

    return [
        AgreementCollector(
            KeyedMemo(agreement, agreement_key),
            last_signed_report=lambda: drift.last_signed_report_at(store),
            listening_since=listening_since,
        ),
        DriftCollector(
            read_window,
            window_studies=settings.drift_window_studies,
            baseline_studies=settings.drift_baseline_studies,
            min_studies=settings.drift_min_studies,
        ),
    ]


class QueuedByPriorityCollector(Collector):
    """``d2r_queued_studies{priority}``: queued studies of each priority (stat, urgent,
    routine, low), read from the database."""

    def __init__(self, count_by_priority: Callable[[], dict[str, int]]) -> None:
        self._count = count_by_priority

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "d2r_queued_studies",
            "Queued studies of each priority (from the study database)",
            labels=["priority"],
        )
        counts = _scraped(self._count, "count queued studies by priority")
        if counts is None:
            return
        for priority in PRIORITY_VALUES:
            family.add_metric([priority], counts.get(priority, 0))
        yield family


class OldestUnfinishedCollector(Collector):
    """``d2r_oldest_unfinished_study_age_seconds``: how long the oldest study still in
    receiving, queued, processing or sending has been in that state (0 when none)."""

    def __init__(self, oldest_age: Callable[[], float]) -> None:
        self._age = oldest_age

    def collect(self) -> Iterator[Metric]:
        age = _scraped(self._age, "read the oldest unfinished study")
        if age is None:
            return
        yield GaugeMetricFamily(
            "d2r_oldest_unfinished_study_age_seconds",
            "Seconds the oldest unfinished study has stayed in its state (alert on it)",
            value=age,
        )


class QueueDepthCollector(Collector):
    """``d2r_queue_depth{queue}``: messages waiting in each broker queue.

    Parameters
    ----------
    broker_url : str
        ``redis://`` / ``rediss://`` (``LLEN`` of each queue and its priority lists),
        ``sentinel://host:port;sentinel://host:port;...`` (the same, on the master the sentinels
        currently name) or ``filesystem://`` (files named ``*.<queue>.msg`` in
        ``queue_dir / "messages"``).
    queue_dir : Path
        Folder of the embedded queue.
    queues : iterable of str
        Queue names.
    sentinel_master : str
        The Sentinel master group of a ``sentinel://`` URL (``D2R_BROKER_SENTINEL_MASTER``).
    """

    _REDIS_SCHEMES = ("redis://", "rediss://", "sentinel://")

    def __init__(
        self,
        broker_url: str,
        queue_dir: Path,
        queues: Iterable[str],
        *,
        sentinel_master: str = "d2r",
    ) -> None:
        self.broker_url = broker_url
        self.messages_dir = Path(queue_dir) / "messages"
        self.queues = tuple(queues)
        self.sentinel_master = sentinel_master
        self._redis: Any = None

    def depths(self) -> dict[str, int]:
        """The current depth of each queue; raises when the broker cannot be read."""
        if self.broker_url.startswith("filesystem://"):
            counts = dict.fromkeys(self.queues, 0)
            suffixes = {f"{q}.msg": q for q in self.queues}
            for name in os.listdir(self.messages_dir):
                queue = suffixes.get(name.partition(".")[2])
                if queue is not None:
                    counts[queue] += 1
            return counts
        if self.broker_url.startswith(self._REDIS_SCHEMES):
            client = self.redis()
            # kombu keeps priority levels in lists named "<queue>\x06\x16<n>"
            return {
                q: sum(
                    int(client.llen(key)) for key in (q, *(f"{q}\x06\x16{n}" for n in range(1, 10)))
                )
                for q in self.queues
            }
        return {}

    def redis(self) -> Any:
        """The Redis client; behind Sentinel, each new connection goes to the current master."""
        if self._redis is None:
            import redis

            if self.broker_url.startswith("sentinel://"):
                self._redis = self._sentinel_master()
            else:
                self._redis = redis.Redis.from_url(
                    self.broker_url, socket_timeout=2.0, socket_connect_timeout=2.0
                )
        return self._redis

    def _sentinel_master(self) -> Any:
        """A client of the master the sentinels of ``broker_url`` name; the password and
        database are those of the URL's first entry (every entry carries the same)."""
        from urllib.parse import unquote, urlsplit

        from redis.sentinel import Sentinel

        entries = [urlsplit(entry.strip()) for entry in self.broker_url.split(";")]
        first = entries[0]
        sentinels = Sentinel(
            [(e.hostname or "127.0.0.1", e.port or 26379) for e in entries],
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
        )
        return sentinels.master_for(
            self.sentinel_master,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            db=int(first.path.strip("/") or 0),
            username=unquote(first.username) if first.username else None,
            password=unquote(first.password) if first.password else None,
        )

    def ping(self) -> None:
        """Raise unless the broker is reachable (behind Sentinel: its current master)."""
        if self.broker_url.startswith(self._REDIS_SCHEMES):
            self.redis().ping()
        elif self.broker_url.startswith("filesystem://") and not os.access(
            self.messages_dir, os.W_OK
        ):
            raise OSError(f"queue folder {self.messages_dir} is not writable")

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "d2r_queue_depth", "Messages waiting in each broker queue", labels=["queue"]
        )
        try:
            depths = self.depths()
        except Exception as exc:
            logger.warning("cannot read the queue depth: %s", exc)
            return
        for queue, depth in depths.items():
            family.add_metric([queue], depth)
        yield family


class NodeLabelled(Collector):
    """Every metric of ``registry`` with a ``node`` label (``D2R_NODE_NAME``), so the series of
    several active nodes behind one address stay apart."""

    def __init__(self, registry: CollectorRegistry, node: str) -> None:
        self._registry = registry
        self._node = node

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labelled.add_sample(
                    sample.name,
                    {**sample.labels, "node": self._node},
                    sample.value,
                    sample.timestamp,
                    sample.exemplar,
                )
            yield labelled


def build_registry(
    multiprocess_dir: Path | None,
    collectors: Iterable[Collector] = (),
    *,
    node: str | None = None,
) -> CollectorRegistry:
    """The registry the HTTP endpoint serves.

    With ``multiprocess_dir`` (the ``PROMETHEUS_MULTIPROC_DIR`` this process was started with)
    a fresh registry aggregating every process's metric files; otherwise this process's default
    registry. ``collectors`` (the scrape-time gauges) are registered on it. With ``node`` every
    series carries that ``node`` label.
    """
    if multiprocess_dir is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]
    else:
        registry = REGISTRY
    for collector in collectors:
        registry.register(collector)
    if node is None:
        return registry
    labelled = CollectorRegistry(auto_describe=False)
    labelled.register(NodeLabelled(registry, node))
    return labelled
