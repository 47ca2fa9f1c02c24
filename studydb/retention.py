"""What the housekeeping of the spool reads: studies whose files may go, and which spooled
files have a row."""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa

from studydb.engine import Database
from studydb.records import RETAINED_STATES, SPOOL_PURGED
from studydb.tables import events_table, instances_table, studies_table

__all__ = ["Retention"]


class Retention(Database):
    """Queries of the retention sweep and the spool check (read-only; no write lock taken)."""

    def retention_candidates(self, cutoff: float, *, limit: int = 100) -> list[str]:
        """``done``/``skipped`` studies finished before ``cutoff`` and not purged since."""
        s = studies_table.c
        e = events_table.c
        purged_since = sa.select(e.id).where(
            e.study_instance_uid == s.study_instance_uid,
            e.kind == SPOOL_PURGED,
            e.at >= s.finished_at,
        )
        query = (
            sa.select(s.study_instance_uid)
            .where(
                s.state.in_(RETAINED_STATES),
                s.finished_at.is_not(None),
                s.finished_at < cutoff,
                ~sa.exists(purged_since),
            )
            .order_by(s.finished_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [str(r[0]) for r in conn.execute(query).all()]

    def recorded_paths_under(self, folder: Path) -> set[str]:
        """Paths of the instances recorded in ``folder`` of the spool (one study's folder)."""
        i = instances_table.c
        prefix = str(folder) + os.sep
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(i.path).where(i.path.startswith(prefix, autoescape=True))
            ).all()
        return {str(r.path) for r in rows}
