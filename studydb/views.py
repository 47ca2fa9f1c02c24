"""Read views of the study database: what ``d2r status``, the status page and the metrics show."""

from __future__ import annotations

import json
import logging
from typing import Any

import sqlalchemy as sa

from d2r_core.priority import PRIORITY_VALUES, Priority
from studydb.engine import Database, retrying
from studydb.records import (
    QUEUED,
    STUDY_STATES,
    UNFINISHED_STATES,
    Event,
    InstanceRecord,
    NodeView,
    StudyView,
)
from studydb.tables import (
    deliveries_table,
    events_table,
    instances_table,
    node_associations_table,
    nodes_table,
    rejections_table,
    studies_table,
)
from studydb.transitions import delivery_view, now_seconds

logger = logging.getLogger(__name__)

__all__ = ["Views"]


class Views(Database):
    """Read-only views: studies, their events and instances, rejections and nodes."""

    @retrying
    def get(self, study_uid: str) -> StudyView | None:
        views = self._views(studies_table.c.study_instance_uid == study_uid, limit=1)
        return views[0] if views else None

    @retrying
    def recent(self, limit: int = 50, *, state: str | None = None) -> list[StudyView]:
        cond = studies_table.c.state == state if state else sa.true()
        return self._views(cond, limit=limit)

    @retrying
    def stuck(
        self, *, older_than: float, now: float | None = None, limit: int = 100
    ) -> list[StudyView]:
        """Unfinished studies that entered their state more than ``older_than`` seconds ago."""
        now = now_seconds() if now is None else now
        s = studies_table.c
        since = sa.func.coalesce(s.state_changed_at, s.updated_at)
        return sorted(
            self._views(
                sa.and_(s.state.in_(UNFINISHED_STATES), since <= now - older_than), limit=limit
            ),
            key=lambda v: v.state_since or 0.0,
        )

    @retrying
    def oldest_unfinished_age(self, now: float | None = None) -> float:
        """Seconds since the oldest unfinished study entered its state (0 when none)."""
        now = now_seconds() if now is None else now
        s = studies_table.c
        since = sa.func.coalesce(s.state_changed_at, s.updated_at)
        with self.transaction() as conn:
            oldest = conn.execute(
                sa.select(sa.func.min(since)).where(s.state.in_(UNFINISHED_STATES))
            ).scalar_one()
        return 0.0 if oldest is None else max(0.0, now - float(oldest))

    @retrying
    def count_by_state(self) -> dict[str, int]:
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(studies_table.c.state, sa.func.count()).group_by(studies_table.c.state)
            ).all()
        counts = dict.fromkeys(STUDY_STATES, 0)
        counts.update({r[0]: int(r[1]) for r in rows})
        return counts

    @retrying
    def priority_of(self, study_uid: str) -> Priority:
        """A study's priority (``routine`` for an unknown study)."""
        s = studies_table.c
        with self.transaction() as conn:
            value = conn.execute(
                sa.select(s.priority).where(s.study_instance_uid == study_uid)
            ).scalar_one_or_none()
        return Priority.ROUTINE if value is None else Priority.parse(value)

    @retrying
    def count_by_priority(self, state: str = QUEUED) -> dict[str, int]:
        """Studies in ``state`` by priority, every priority present (queued ones by default)."""
        s = studies_table.c
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(s.priority, sa.func.count()).where(s.state == state).group_by(s.priority)
            ).all()
        counts = dict.fromkeys(PRIORITY_VALUES, 0)
        for value, n in rows:
            key = value if value in counts else str(Priority.ROUTINE)
            counts[key] += int(n)
        return counts

    # Longer than a screen: the study rows, then for each its instance count, its nodes and its
    # deliveries, assembled into one view; the columns read sit beside the fields they fill
    def _views(self, cond: Any, *, limit: int) -> list[StudyView]:
        s = studies_table.c
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(studies_table)
                .where(cond)
                .order_by(s.last_received_at.desc())
                .limit(limit)
            ).all()
            out = []
            for r in rows:
                uid = r.study_instance_uid
                n = conn.execute(
                    sa.select(sa.func.count()).where(instances_table.c.study_instance_uid == uid)
                ).scalar_one()
                i = instances_table.c
                by_node = conn.execute(
                    sa.select(i.received_by, sa.func.count())
                    .where(i.study_instance_uid == uid)
                    .group_by(i.received_by)
                    .order_by(i.received_by)
                ).all()
                dels = conn.execute(
                    sa.select(deliveries_table)
                    .where(deliveries_table.c.study_instance_uid == uid)
                    .order_by(deliveries_table.c.destination)
                ).all()
                out.append(
                    StudyView(
                        study_instance_uid=uid,
                        state=r.state,
                        reason=r.reason,
                        generation=r.generation,
                        first_received_at=r.first_received_at,
                        last_received_at=r.last_received_at,
                        queued_at=r.queued_at,
                        processed_at=r.processed_at,
                        finished_at=r.finished_at,
                        model_name=r.model_name,
                        model_version=r.model_version,
                        findings=r.findings,
                        impression=r.impression,
                        lesion_count=r.lesion_count,
                        result_paths=tuple(json.loads(r.result_paths or "[]")),
                        instance_count=int(n),
                        deliveries=tuple(delivery_view(d) for d in dels),
                        attempts=int(r.attempts or 0),
                        stage=r.stage,
                        state_since=r.state_changed_at or r.updated_at,
                        received_by=tuple((str(b[0] or ""), int(b[1])) for b in by_node),
                        priority=str(r.priority or Priority.ROUTINE),
                    )
                )
        return out

    @retrying
    def events(self, study_uid: str) -> list[Event]:
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(events_table.c.at, events_table.c.kind, events_table.c.detail)
                .where(events_table.c.study_instance_uid == study_uid)
                .order_by(events_table.c.id)
            ).all()
        return [Event(at=r.at, kind=r.kind, detail=r.detail) for r in rows]

    @retrying
    def instances(self, study_uid: str) -> list[InstanceRecord]:
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(instances_table)
                .where(instances_table.c.study_instance_uid == study_uid)
                .order_by(instances_table.c.received_at)
            ).all()
        return [InstanceRecord.from_row(r) for r in rows]

    @retrying
    def rejections(self, limit: int = 100) -> list[dict[str, Any]]:
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(rejections_table).order_by(rejections_table.c.id.desc()).limit(limit)
            ).all()
        return [dict(r._mapping) for r in rows]

    @retrying
    def nodes(self) -> list[NodeView]:
        """Every node that ever recorded a heartbeat, with its open associations."""
        n = nodes_table.c
        a = node_associations_table.c
        opened = (
            sa.select(sa.func.coalesce(sa.func.sum(a.open), 0))
            .where(a.node == n.name)
            .scalar_subquery()
        )
        with self.transaction() as conn:
            rows = conn.execute(
                sa.select(n.name, n.host, n.pid, n.started_at, n.heartbeat_at, opened).order_by(
                    n.name
                )
            ).all()
        return [
            NodeView(
                name=str(r[0]),
                host=str(r[1]),
                pid=int(r[2]),
                started_at=float(r[3]),
                heartbeat_at=float(r[4]),
                open_associations=int(r[5]),
            )
            for r in rows
        ]
