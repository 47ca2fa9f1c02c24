"""Drift monitoring's storage: what the input gate and the model made of each reported study,
and the aggregate reads that ``/metrics`` makes of them.

One observation per study (``study_observations``, ``observed_findings``): the model that
reported it, the gate calibration that scored it (``gate_references``: threshold, percentile,
and the quantiles of the held-out in-distribution scores), the gate's score, whether the gate
declined it, and each finding (a VinDr-CXR class) its draft states with a box. The worker
writes it in the transaction that records the study as reported
(:meth:`studydb.lifecycle.Lifecycle.mark_reported` calls :func:`write_observation`); a study
reported again replaces its observation.

:func:`drift_window` reads, with aggregate SQL, the figures :mod:`feedback.drift` compares:

* the **window**: the latest ``window_studies`` observations of the model and gate calibration
  of the newest observation (a new model or a re-calibrated gate starts a new window);
* the **baseline**: the first ``baseline_studies`` observations of that model, the reference of
  its findings' positive rates (the calibration does not run the report generator, so the
  positive rates have no reference from it).

The functions take any :class:`~studydb.engine.Database` (the node's or the worker's store).
:func:`agreement_fingerprint` and :func:`last_signed_report_at` are cheap reads of the
signed-report tables for ``/metrics``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from studydb.engine import Database, retrying
from studydb.tables import (
    gate_references_table,
    observed_findings_table,
    report_scores_table,
    signed_reports_table,
    study_observations_table,
)

__all__ = [
    "Counts",
    "DriftWindow",
    "GateReference",
    "Observation",
    "agreement_fingerprint",
    "drift_window",
    "last_signed_report_at",
    "write_observation",
]

#: the longest finding name stored (``observed_findings.finding``)
_FINDING_CHARS = 64


@dataclass(frozen=True)
class GateReference:
    """A calibration of the input gate: its threshold, the percentile of the held-out
    in-distribution scores it is, how many held-out images there were, and their quantiles at
    probabilities ``0, 1/k, ..., 1`` (empty: the gate file predates them)."""

    threshold: float
    percentile: float
    calibration_images: int
    quantiles: tuple[float, ...] = ()

    @property
    def key(self) -> str:
        """A digest of the calibration (``gate_references.id``): 16 hex digits.

        >>> GateReference(19.3, 99.5, 200).key == GateReference(19.3, 99.5, 200, ()).key
        True
        """
        canonical = json.dumps(
            [self.threshold, self.percentile, self.calibration_images, list(self.quantiles)]
        )
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]


@dataclass(frozen=True)
class Observation:
    """What the input gate and the model made of one reported study."""

    model_name: str
    model_version: str
    #: the gate declined the study (an abstention SR was written)
    abstained: bool
    #: the gate's out-of-distribution score (None: not scored)
    gate_score: float | None = None
    #: the calibration of the gate that ran (None: the gate was off)
    gate: GateReference | None = None
    #: the findings the draft states with a box
    findings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Counts:
    """Studies of a set of observations, those the gate declined, and per finding the studies
    whose draft states it."""

    studies: int = 0
    abstentions: int = 0
    positives: Mapping[str, int] = field(default_factory=dict)

    @property
    def assessed(self) -> int:
        """Studies the model reported on (not declined)."""
        return self.studies - self.abstentions


@dataclass(frozen=True)
class DriftWindow:
    """The window and the baseline of the newest observation's model (:func:`drift_window`)."""

    model_name: str
    model_version: str
    window: Counts
    #: the gate scores in the window (studies declined by a header or pixel check have none)
    gate_scores: tuple[float, ...]
    #: the gate calibration of the window (None: the gate was off)
    gate: GateReference | None
    baseline: Counts


def write_observation(
    conn: Connection, study_uid: str, observation: Observation, *, now: float
) -> None:
    """Record ``observation`` of ``study_uid`` in the caller's transaction, replacing an
    earlier one of the study."""
    o, f = study_observations_table.c, observed_findings_table.c
    conn.execute(study_observations_table.delete().where(o.study_instance_uid == study_uid))
    conn.execute(observed_findings_table.delete().where(f.study_instance_uid == study_uid))
    gate = observation.gate
    if gate is not None:
        _insert_reference(conn, gate, now)
    conn.execute(
        study_observations_table.insert().values(
            study_instance_uid=study_uid,
            observed_at=now,
            model_name=observation.model_name[:128],
            model_version=observation.model_version[:64],
            gate_reference=None if gate is None else gate.key,
            gate_score=observation.gate_score,
            abstained=observation.abstained,
        )
    )
    findings = sorted({name[:_FINDING_CHARS] for name in observation.findings})
    if findings:
        conn.execute(
            observed_findings_table.insert(),
            [{"study_instance_uid": study_uid, "finding": name} for name in findings],
        )


def _insert_reference(conn: Connection, gate: GateReference, now: float) -> None:
    """Insert the calibration unless it is stored (also when another worker stores it at the
    same moment: the insert yields to the row already there instead of failing)."""
    row = {
        "id": gate.key,
        "threshold": gate.threshold,
        "percentile": gate.percentile,
        "calibration_images": gate.calibration_images,
        "quantiles": json.dumps(list(gate.quantiles)) if gate.quantiles else None,
        "recorded_at": now,
    }
    backend = conn.dialect.name
    if backend == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        conn.execute(pg_insert(gate_references_table).values(**row).on_conflict_do_nothing())
    elif backend == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        conn.execute(sqlite_insert(gate_references_table).values(**row).on_conflict_do_nothing())
    else:  # another backend: check first
        stored = conn.execute(
            sa.select(gate_references_table.c.id).where(gate_references_table.c.id == gate.key)
        ).first()
        if stored is None:
            conn.execute(gate_references_table.insert().values(**row))


@retrying
def drift_window(db: Database, *, window_studies: int, baseline_studies: int) -> DriftWindow | None:
    """The window and the baseline of the newest observation's model and gate calibration
    (module docstring); None before the first observation. Reads at most ``window_studies``
    scores; everything else is aggregated by the database."""
    o = study_observations_table.c
    with db.transaction() as conn:
        newest = conn.execute(
            sa.select(o.model_name, o.model_version, o.gate_reference)
            .order_by(o.observed_at.desc(), o.study_instance_uid.desc())
            .limit(1)
        ).first()
        if newest is None:
            return None
        same_model = sa.and_(
            o.model_name == newest.model_name, o.model_version == newest.model_version
        )
        same_gate = (
            o.gate_reference.is_(None)
            if newest.gate_reference is None
            else o.gate_reference == newest.gate_reference
        )
        window = (
            sa.select(o.study_instance_uid, o.gate_score, o.abstained)
            .where(same_model, same_gate)
            .order_by(o.observed_at.desc(), o.study_instance_uid.desc())
            .limit(window_studies)
            .subquery("drift_window")
        )
        baseline = (
            sa.select(o.study_instance_uid, o.gate_score, o.abstained)
            .where(same_model)
            .order_by(o.observed_at, o.study_instance_uid)
            .limit(baseline_studies)
            .subquery("drift_baseline")
        )
        scores = conn.execute(
            sa.select(window.c.gate_score).where(window.c.gate_score.is_not(None))
        ).scalars()
        gate_scores = tuple(float(s) for s in scores)
        gate = None if newest.gate_reference is None else _reference(conn, newest.gate_reference)
        return DriftWindow(
            model_name=newest.model_name,
            model_version=newest.model_version,
            window=_counts(conn, window),
            gate_scores=gate_scores,
            gate=gate,
            baseline=_counts(conn, baseline),
        )


def _counts(conn: Connection, observations: sa.Subquery) -> Counts:
    """:class:`Counts` of a subquery of observations (uid, gate score, abstained)."""
    c, f = observations.c, observed_findings_table.c
    row = conn.execute(
        sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(sa.case((c.abstained == sa.true(), 1), else_=0)), 0),
        ).select_from(observations)
    ).one()
    positives = conn.execute(
        sa.select(f.finding, sa.func.count())
        .join(observations, c.study_instance_uid == f.study_instance_uid)
        .where(c.abstained == sa.false())
        .group_by(f.finding)
    ).all()
    return Counts(
        studies=int(row[0]),
        abstentions=int(row[1]),
        positives={str(name): int(count) for name, count in positives},
    )


def _reference(conn: Connection, key: str) -> GateReference | None:
    r = gate_references_table.c
    row = conn.execute(sa.select(gate_references_table).where(r.id == key)).first()
    if row is None:
        return None
    quantiles: Sequence[Any] = json.loads(row.quantiles) if row.quantiles else ()
    return GateReference(
        threshold=float(row.threshold),
        percentile=float(row.percentile),
        calibration_images=int(row.calibration_images),
        quantiles=tuple(float(q) for q in quantiles),
    )


@retrying
def agreement_fingerprint(db: Database, *, since: float) -> tuple[Any, ...]:
    """What changes whenever the agreement figures of ``/metrics`` do (scores of the current
    signed reports, all and those received since ``since``, and supersessions), read as a few
    aggregates: the figures need computing again only when it changes."""
    r, sc = signed_reports_table.c, report_scores_table.c
    current = sa.and_(
        r.study_instance_uid == sc.study_instance_uid,
        r.version == sc.version,
        r.superseded_at.is_(None),
    )
    with db.transaction() as conn:
        scores = conn.execute(
            sa.select(
                sa.func.count(),
                sa.func.max(sc.scored_at),
                sa.func.coalesce(sa.func.sum(sa.case((r.received_at >= since, 1), else_=0)), 0),
            ).select_from(report_scores_table.join(signed_reports_table, current))
        ).one()
        superseded = conn.execute(sa.select(sa.func.max(r.superseded_at))).scalar()
    return (*tuple(scores), superseded)


@retrying
def last_signed_report_at(db: Database) -> float | None:
    """When the newest signed report arrived (None: none yet)."""
    with db.transaction() as conn:
        value = conn.execute(sa.select(sa.func.max(signed_reports_table.c.received_at))).scalar()
    return None if value is None else float(value)
