"""Settings of the signed-report listener and the FHIR endpoint: :class:`FeedbackSettings`,
built once by ``d2r node`` (each declared once in :data:`SETTINGS`).

The listener listens on the node's address (``D2R_HOST``); with ``D2R_HL7_LISTEN_TLS`` it
speaks TLS with the node's certificate and key (``D2R_TLS_CERT``, ``D2R_TLS_KEY``; clients
checked against ``D2R_TLS_CA`` as the DICOM listener checks them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from d2r_core.config import (
    int_at_least,
    non_negative_float,
    parse_bool,
    parse_port,
    positive_float,
)
from d2r_core.errors import ConfigError
from d2r_core.settings_spec import Group, Setting

__all__ = ["SETTINGS", "FeedbackSettings"]


def _listen_port(text: str) -> int:
    return 0 if text == "0" else parse_port(text, "D2R_HL7_LISTEN_PORT")


HL7_LISTEN_PORT = Setting(
    "D2R_HL7_LISTEN_PORT",
    0,
    _listen_port,
    "port of the HL7 v2 MLLP listener (`d2r node`) that takes signed reports (ORU^R01) back "
    'from the RIS; `0`: off (docs/operations.md, "Signed reports and agreement")',
    Group.FEEDBACK,
)
HL7_LISTEN_TLS = Setting(
    "D2R_HL7_LISTEN_TLS",
    False,
    parse_bool,
    "the HL7 listener speaks TLS with the node's certificate and key (`D2R_TLS_CERT`, "
    "`D2R_TLS_KEY`)",
    Group.FEEDBACK,
)
HL7_MAX_MESSAGE_BYTES = Setting(
    "D2R_HL7_MAX_MESSAGE_BYTES",
    1 << 20,
    int_at_least(1024),
    "the largest HL7 message the listener reads; a larger one is answered `AR` and the "
    "connection closed",
    Group.FEEDBACK,
    shown="`1048576` (1 MiB)",
)
HL7_IDLE_SECONDS = Setting(
    "D2R_HL7_IDLE_SECONDS",
    60.0,
    positive_float,
    "the HL7 listener closes a connection that sends nothing for this long (also mid-message)",
    Group.FEEDBACK,
)
HL7_MAX_CONNECTIONS = Setting(
    "D2R_HL7_MAX_CONNECTIONS",
    16,
    int_at_least(1),
    "connections the HL7 listener serves at once; further ones wait in the listen queue",
    Group.FEEDBACK,
)
FEEDBACK_SCORE_SECONDS = Setting(
    "D2R_FEEDBACK_SCORE_SECONDS",
    60.0,
    non_negative_float,
    "`d2r node` scores new signed reports against the drafts this often, where the labeler "
    "of `d2r evaluate` is installed (`0`: only `d2r feedback score` does)",
    Group.FEEDBACK,
)
FEEDBACK_WINDOW_DAYS = Setting(
    "D2R_FEEDBACK_WINDOW_DAYS",
    30.0,
    positive_float,
    "the sliding window of the agreement figures in `/metrics` and on the status page "
    "(beside all time), in days",
    Group.FEEDBACK,
)
FHIR_MAX_BYTES = Setting(
    "D2R_FHIR_MAX_BYTES",
    1 << 20,
    int_at_least(1024),
    "the largest FHIR DiagnosticReport `POST /fhir/DiagnosticReport` takes (role `feedback`, "
    "on `D2R_HTTP_PORT`); a larger body gets 413",
    Group.FEEDBACK,
    shown="`1048576` (1 MiB)",
)
#: the most studies a drift window or baseline holds (bounds what a scrape reads)
MAX_DRIFT_STUDIES = 100_000


def _studies(text: str) -> int:
    value = int_at_least(1)(text)
    if value > MAX_DRIFT_STUDIES:
        raise ValueError(f"must be at most {MAX_DRIFT_STUDIES}, got {text}")
    return value


DRIFT_WINDOW_STUDIES = Setting(
    "D2R_DRIFT_WINDOW_STUDIES",
    500,
    _studies,
    "the drift figures in `/metrics` (`d2r_drift_*`) cover the latest this many reported "
    "studies of the current model and input-gate calibration (1 to 100000; "
    'docs/operations.md, "Drift and alerts")',
    Group.FEEDBACK,
)
DRIFT_BASELINE_STUDIES = Setting(
    "D2R_DRIFT_BASELINE_STUDIES",
    500,
    _studies,
    "the first this many studies a model reports are the baseline of its findings' positive "
    "rates (`d2r_drift_positive_reference_ratio`, exported once complete; 1 to 100000)",
    Group.FEEDBACK,
)
DRIFT_MIN_STUDIES = Setting(
    "D2R_DRIFT_MIN_STUDIES",
    100,
    _studies,
    "the drift figures are exported once the window holds this many studies (the gate's "
    "score shift: this many scored studies); at most `D2R_DRIFT_WINDOW_STUDIES`",
    Group.FEEDBACK,
)
#: every setting :class:`FeedbackSettings` reads
SETTINGS: tuple[Setting[Any], ...] = (
    HL7_LISTEN_PORT,
    HL7_LISTEN_TLS,
    HL7_MAX_MESSAGE_BYTES,
    HL7_IDLE_SECONDS,
    HL7_MAX_CONNECTIONS,
    FEEDBACK_SCORE_SECONDS,
    FEEDBACK_WINDOW_DAYS,
    FHIR_MAX_BYTES,
    DRIFT_WINDOW_STUDIES,
    DRIFT_BASELINE_STUDIES,
    DRIFT_MIN_STUDIES,
)


@dataclass(frozen=True)
class FeedbackSettings:
    """How the signed-report listener listens (port 0: off)."""

    port: int = HL7_LISTEN_PORT.default
    tls: bool = HL7_LISTEN_TLS.default
    max_message_bytes: int = HL7_MAX_MESSAGE_BYTES.default
    idle_seconds: float = HL7_IDLE_SECONDS.default
    max_connections: int = HL7_MAX_CONNECTIONS.default
    score_seconds: float = FEEDBACK_SCORE_SECONDS.default
    window_days: float = FEEDBACK_WINDOW_DAYS.default
    #: the largest FHIR DiagnosticReport body read (413 beyond)
    fhir_max_bytes: int = FHIR_MAX_BYTES.default
    #: the drift figures: the window, the positive rates' baseline, the least to export
    drift_window_studies: int = DRIFT_WINDOW_STUDIES.default
    drift_baseline_studies: int = DRIFT_BASELINE_STUDIES.default
    drift_min_studies: int = DRIFT_MIN_STUDIES.default

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FeedbackSettings:
        """Build from ``D2R_*`` variables.

        Raises
        ------
        ConfigError
            Naming the first invalid setting (``D2R_HL7_LISTEN_TLS`` without the node's
            certificate and key; ``D2R_DRIFT_MIN_STUDIES`` above the window).
        """
        settings = cls(
            port=HL7_LISTEN_PORT.read(env),
            tls=HL7_LISTEN_TLS.read(env),
            max_message_bytes=HL7_MAX_MESSAGE_BYTES.read(env),
            idle_seconds=HL7_IDLE_SECONDS.read(env),
            max_connections=HL7_MAX_CONNECTIONS.read(env),
            score_seconds=FEEDBACK_SCORE_SECONDS.read(env),
            window_days=FEEDBACK_WINDOW_DAYS.read(env),
            fhir_max_bytes=FHIR_MAX_BYTES.read(env),
            drift_window_studies=DRIFT_WINDOW_STUDIES.read(env),
            drift_baseline_studies=DRIFT_BASELINE_STUDIES.read(env),
            drift_min_studies=DRIFT_MIN_STUDIES.read(env),
        )
        if settings.drift_min_studies > settings.drift_window_studies:
            raise ConfigError(
                "D2R_DRIFT_MIN_STUDIES",
                f"{settings.drift_min_studies} is more than the window holds "
                f"(D2R_DRIFT_WINDOW_STUDIES={settings.drift_window_studies})",
            )
        if settings.tls and not (env.get("D2R_TLS_CERT") and env.get("D2R_TLS_KEY")):
            raise ConfigError(
                "D2R_HL7_LISTEN_TLS", "needs the node's certificate: D2R_TLS_CERT and D2R_TLS_KEY"
            )
        return settings
