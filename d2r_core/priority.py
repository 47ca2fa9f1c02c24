"""A study's priority: ``stat``, ``urgent``, ``routine`` or ``low``.

The node decides it from routing rules, the request's headers and the C-STORE Priority
(:mod:`dicom_node.priority`); the study database stores it, the queue and the claims serve the
highest first (oldest first within one priority), and ``d2r status`` shows it.

>>> Priority.parse(" STAT ").rank, Priority.URGENT.rank, Priority.highest([Priority.LOW, "routine"])
(0, 1, <Priority.ROUTINE: 'routine'>)
>>> Priority.URGENT.higher_than(Priority.ROUTINE), Priority.LOW.higher_than(Priority.LOW)
(True, False)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["PRIORITY_VALUES", "Priority", "PriorityDecision"]


class Priority(StrEnum):
    """A study's priority, highest first (its :attr:`rank`: 0 is the highest)."""

    STAT = "stat"
    URGENT = "urgent"
    ROUTINE = "routine"
    LOW = "low"

    @property
    def rank(self) -> int:
        """0 for ``stat`` ... 3 for ``low``: sorting by rank serves the highest first."""
        return _ORDER.index(self)

    def higher_than(self, other: Priority | str) -> bool:
        """Whether this priority is strictly higher than ``other``."""
        return self.rank < Priority.parse(other).rank

    @classmethod
    def parse(cls, text: str) -> Priority:
        """``stat``, ``urgent``, ``routine`` or ``low``, case-insensitive (else ``ValueError``)."""
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ValueError(
                f"expected one of {', '.join(PRIORITY_VALUES)}, got {text!r}"
            ) from None

    @classmethod
    def highest(cls, priorities: Iterable[Priority | str]) -> Priority:
        """The highest of ``priorities`` (``routine`` when there are none)."""
        parsed = [cls.parse(p) for p in priorities]
        return min(parsed, key=lambda p: p.rank) if parsed else cls.ROUTINE


_ORDER = (Priority.STAT, Priority.URGENT, Priority.ROUTINE, Priority.LOW)
#: the defined terms, highest first
PRIORITY_VALUES = tuple(str(p) for p in _ORDER)


@dataclass(frozen=True)
class PriorityDecision:
    """A priority, the source that decided it, and the header values that were ignored (each
    note sanitised: printable ASCII, quoted values cut short)."""

    priority: Priority
    source: str
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the study's events: ``urgent (C-STORE Priority HIGH)``."""
        return f"{self.priority} ({self.source})" + "".join(f"; {n}" for n in self.notes)
