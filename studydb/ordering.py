"""How the queue orders studies: SQL expressions for a priority's rank, the time a study
entered the queue, and the rank the queue serves it at (the starvation guard)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from d2r_core.priority import Priority
from studydb.records import QUEUED
from studydb.tables import studies_table

__all__ = ["BY_RANK", "effective_rank", "rank_of", "waiting_since"]

#: the priorities in rank order (index: rank)
BY_RANK = tuple(sorted(Priority, key=lambda p: p.rank))


def rank_of(column: Any) -> Any:
    """SQL: the rank of a priority column (0 stat ... 3 low; anything else counts as routine)."""
    return sa.case(
        (column == str(Priority.STAT), Priority.STAT.rank),
        (column == str(Priority.URGENT), Priority.URGENT.rank),
        (column == str(Priority.LOW), Priority.LOW.rank),
        else_=Priority.ROUTINE.rank,
    )


def waiting_since() -> Any:
    """SQL: when a queued study entered the queue (a re-sent job does not make it younger)."""
    s = studies_table.c
    return sa.func.coalesce(s.state_changed_at, s.queued_at, 0.0)


def effective_rank(now: float, aging_seconds: float | None) -> Any:
    """SQL: a study's rank as the queue serves it: its own, or ``urgent``'s once a routine or
    low study waited ``aging_seconds`` in the queue (None or 0: no ageing)."""
    s = studies_table.c
    rank = rank_of(s.priority)
    if not aging_seconds:
        return rank
    aged = sa.and_(
        s.state == QUEUED,
        rank > Priority.URGENT.rank,
        waiting_since() <= now - aging_seconds,
    )
    return sa.case((aged, Priority.URGENT.rank), else_=rank)
