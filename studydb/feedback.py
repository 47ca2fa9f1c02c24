"""Signed reports from the RIS: storage only (:mod:`feedback` reads the messages and matches
them).

A study's signed reports are numbered: version 1 is the first one stored, each later one (a
corrected report, or a final report with other text) gets the next number and supersedes the
one before (``superseded_at``); the current report is the one not superseded. A message
already stored for the study (the same MSH-10, or the current report's text and status again)
is a repeat and stores nothing. Every message, stored or not, is also recorded in
``report_messages`` with the acknowledgement it got.

Scores: the current signed report of a study whose draft exists (findings recorded, or an
abstention) is scored once per version (``report_scores``): the labels of the draft and of the
signed report, computed by the caller (:mod:`feedback.scoring`). The labels are JSON text, so
the per-observation and per-day figures are summed by :mod:`feedback.scoring`, not in SQL:
:meth:`SignedReports.iter_report_scores` reads the scores a page of rows at a time, so that
memory stays bounded however many studies were scored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from studydb.engine import Database, retrying
from studydb.tables import (
    instances_table,
    report_messages_table,
    report_scores_table,
    signed_reports_table,
    studies_table,
)
from studydb.transitions import now_seconds, write_event

__all__ = [
    "ABSTAINED_PREFIX",
    "CORRECTED",
    "REPEAT",
    "SCORE_PAGE",
    "STORED",
    "ReportMessage",
    "ReportScore",
    "ScoringCase",
    "SignedReport",
    "SignedReports",
    "StoredReport",
]

logger = logging.getLogger(__name__)

#: what :meth:`SignedReports.store_signed_report` did
STORED = "stored"
CORRECTED = "corrected"
REPEAT = "repeat"
#: conflicting inserts of the same version (several nodes) are tried again this often
_ATTEMPTS = 3
#: scores read per transaction by :meth:`SignedReports.iter_report_scores`
SCORE_PAGE = 1000
#: a study's ``reason`` when the model abstained (the worker writes it)
ABSTAINED_PREFIX = "abstained:"
Labels = Mapping[str, int | None]


@dataclass(frozen=True)
class SignedReport:
    """One version of a study's signed report."""

    study_instance_uid: str
    version: int
    result_status: str
    report_text: str
    source: str
    received_at: float
    message_control_id: str
    superseded_at: float | None = None


@dataclass(frozen=True)
class StoredReport:
    """What storing a signed report did: ``outcome`` stored, corrected or repeat, and the
    version it is (or repeats)."""

    outcome: str
    version: int


@dataclass(frozen=True)
class ReportMessage:
    """One report message received and the acknowledgement it got."""

    received_at: float
    message_control_id: str
    source: str
    result_status: str
    accession_number: str | None
    study_instance_uid: str | None
    outcome: str
    ack_code: str
    note: str
    report_text: str | None = None


@dataclass(frozen=True)
class ScoringCase:
    """A current signed report not scored yet, with the study's draft."""

    study_instance_uid: str
    version: int
    signed_text: str
    draft_findings: str
    draft_impression: str
    abstained: bool
    #: when the signed report arrived
    received_at: float = 0.0


@dataclass(frozen=True)
class ReportScore:
    """The draft's and the signed report's labels of one study (its current version)."""

    study_instance_uid: str
    version: int
    received_at: float
    abstained: bool
    draft_labels: Labels
    signed_labels: Labels


class SignedReports(Database):
    """The signed reports of studies and the report messages received."""

    @retrying
    def known_studies(self, study_uids: Sequence[str]) -> list[str]:
        """Those of ``study_uids`` the database holds, in the order given."""
        if not study_uids:
            return []
        with self.transaction() as conn:
            found = set(
                conn.execute(
                    sa.select(studies_table.c.study_instance_uid).where(
                        studies_table.c.study_instance_uid.in_(list(study_uids))
                    )
                ).scalars()
            )
        return [uid for uid in study_uids if uid in found]

    @retrying
    def studies_with_accession(self, accession_number: str) -> list[str]:
        """The studies with an instance of this AccessionNumber, sorted."""
        i = instances_table.c
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(i.study_instance_uid)
                .where(i.accession_number == accession_number)
                .distinct()
                .order_by(i.study_instance_uid)
            ).scalars()
            return list(rows)

    @retrying
    def store_signed_report(self, report: SignedReport) -> StoredReport:
        """Store ``report`` as its study's next version (its own ``version`` and
        ``superseded_at`` are ignored), unless it repeats one already stored."""
        for attempt in range(_ATTEMPTS):
            try:
                with self.transaction() as conn:
                    return _store(conn, report)
            except sa.exc.IntegrityError:  # another node stored a version at the same moment
                if attempt == _ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    @retrying
    def record_report_message(self, message: ReportMessage) -> None:
        """Record one message received and the answer it got."""
        row = {f: getattr(message, f) for f in message.__dataclass_fields__}
        with self.transaction() as conn:
            conn.execute(report_messages_table.insert().values(**row))

    @retrying
    def signed_reports(self, study_uid: str) -> list[SignedReport]:
        """Every version of the study's signed report, oldest first."""
        r = signed_reports_table.c
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(signed_reports_table)
                .where(r.study_instance_uid == study_uid)
                .order_by(r.version)
            ).all()
        return [_signed(row) for row in rows]

    @retrying
    def report_messages(
        self, *, since: float | None = None, limit: int = 1000
    ) -> list[ReportMessage]:
        """The report messages received (since ``since``), oldest first."""
        m = report_messages_table.c
        cond = sa.true() if since is None else m.received_at >= since
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(report_messages_table).where(cond).order_by(m.id).limit(limit)
            ).all()
        fields = ReportMessage.__dataclass_fields__
        return [ReportMessage(**{f: row._mapping[f] for f in fields}) for row in rows]

    @retrying
    def unscored_reports(self, limit: int = 100) -> list[ScoringCase]:
        """Current signed reports of studies with a draft (or an abstention) and no score yet,
        oldest first."""
        r, sc = signed_reports_table.c, report_scores_table.c
        scored = sa.exists().where(
            sc.study_instance_uid == r.study_instance_uid, sc.version == r.version
        )
        return self._cases(~scored, limit)

    @retrying
    def reports_with_drafts(self, *, since: float | None = None) -> list[ScoringCase]:
        """Current signed reports (received since ``since``) of studies with a draft, oldest
        first (``d2r feedback export``)."""
        r = signed_reports_table.c
        return self._cases(sa.true() if since is None else r.received_at >= since, None)

    def _cases(self, cond: sa.ColumnElement[bool], limit: int | None) -> list[ScoringCase]:
        r, s = signed_reports_table.c, studies_table.c
        query = (
            sa.select(
                r.study_instance_uid,
                r.version,
                r.report_text,
                r.received_at,
                s.findings,
                s.impression,
                s.reason,
            )
            .join(studies_table, s.study_instance_uid == r.study_instance_uid)
            .where(r.superseded_at.is_(None), s.findings.is_not(None), cond)
            .order_by(r.id)
            .limit(limit)
        )
        with self.transaction() as conn:
            rows = conn.execute(query).all()
        return [
            ScoringCase(
                study_instance_uid=row.study_instance_uid,
                version=int(row.version),
                signed_text=row.report_text,
                draft_findings=row.findings or "",
                draft_impression=row.impression or "",
                abstained=(row.reason or "").startswith(ABSTAINED_PREFIX),
                received_at=float(row.received_at),
            )
            for row in rows
        ]

    @retrying
    def store_score(
        self,
        case: ScoringCase,
        *,
        draft_labels: Labels,
        signed_labels: Labels,
        labeler: str,
    ) -> None:
        """Store the labels of ``case`` (a score already stored is kept)."""
        row = {
            "study_instance_uid": case.study_instance_uid,
            "version": case.version,
            "scored_at": now_seconds(),
            "abstained": case.abstained,
            "draft_labels": json.dumps(dict(draft_labels)),
            "signed_labels": json.dumps(dict(signed_labels)),
            "labeler": labeler[:64],
        }
        try:
            with self.transaction() as conn:
                conn.execute(report_scores_table.insert().values(**row))
        except sa.exc.IntegrityError:  # scored meanwhile by another node
            logger.debug(
                "score of %s version %d already stored", case.study_instance_uid, case.version
            )

    @retrying
    def report_scores(self, *, since: float | None = None) -> list[ReportScore]:
        """The scores of the current signed reports (received since ``since``), oldest first."""
        return self.report_score_page(since=since, after=None, limit=None)

    def iter_report_scores(
        self, *, since: float | None = None, page: int = SCORE_PAGE
    ) -> Iterator[ReportScore]:
        """:meth:`report_scores`, read ``page`` rows at a time (one short transaction each), so
        that memory stays bounded however many studies were scored."""
        after: tuple[float, str] | None = None
        while True:
            rows = self.report_score_page(since=since, after=after, limit=page)
            yield from rows
            if len(rows) < page:
                return
            after = (rows[-1].received_at, rows[-1].study_instance_uid)

    @retrying
    def report_score_page(
        self, *, since: float | None, after: tuple[float, str] | None, limit: int | None
    ) -> list[ReportScore]:
        """Up to ``limit`` scores of current signed reports received since ``since``, in
        ``(received_at, study)`` order, starting after the key ``after``."""
        r, sc = signed_reports_table.c, report_scores_table.c
        cond: sa.ColumnElement[bool] = r.superseded_at.is_(None)
        if since is not None:
            cond = sa.and_(cond, r.received_at >= since)
        if after is not None:
            at, uid = after
            cond = sa.and_(
                cond,
                sa.or_(
                    r.received_at > at,
                    sa.and_(r.received_at == at, sc.study_instance_uid > uid),
                ),
            )
        query = (
            sa.select(
                sc.study_instance_uid,
                sc.version,
                r.received_at,
                sc.abstained,
                sc.draft_labels,
                sc.signed_labels,
            )
            .join(
                signed_reports_table,
                sa.and_(r.study_instance_uid == sc.study_instance_uid, r.version == sc.version),
            )
            .where(cond)
            .order_by(r.received_at, sc.study_instance_uid)
            .limit(limit)
        )
        with self.transaction() as conn:
            rows = conn.execute(query).all()
        return [
            ReportScore(
                study_instance_uid=row.study_instance_uid,
                version=int(row.version),
                received_at=float(row.received_at),
                abstained=bool(row.abstained),
                draft_labels=json.loads(row.draft_labels),
                signed_labels=json.loads(row.signed_labels),
            )
            for row in rows
        ]


def _signed(row: sa.Row[tuple[object, ...]]) -> SignedReport:
    return SignedReport(**{f: row._mapping[f] for f in SignedReport.__dataclass_fields__})


def _store(conn: Connection, report: SignedReport) -> StoredReport:
    r = signed_reports_table.c
    uid = report.study_instance_uid
    same_message = conn.execute(
        sa.select(r.version).where(
            r.study_instance_uid == uid, r.message_control_id == report.message_control_id
        )
    ).scalar()
    if same_message is not None:
        return StoredReport(REPEAT, int(same_message))
    current = conn.execute(
        sa.select(r.version, r.report_text, r.result_status)
        .where(r.study_instance_uid == uid)
        .order_by(r.version.desc())
        .limit(1)
    ).first()
    if current is not None and (current.report_text, current.result_status) == (
        report.report_text,
        report.result_status,
    ):
        return StoredReport(REPEAT, int(current.version))
    version = 1 if current is None else int(current.version) + 1
    now = now_seconds()
    conn.execute(
        signed_reports_table.update()
        .where(r.study_instance_uid == uid, r.superseded_at.is_(None))
        .values(superseded_at=now)
    )
    row = {f: getattr(report, f) for f in SignedReport.__dataclass_fields__}
    conn.execute(signed_reports_table.insert().values(**{**row, "version": version}))
    write_event(conn, uid, "signed-report", f"version {version} ({report.result_status}) received")
    return StoredReport(STORED if version == 1 else CORRECTED, version)
