"""The job message: JSON with UIDs and spool paths only, never pixel data or PHI."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from d2r_core.priority import Priority

REPORT_TASK = "d2r.report_study"
SEND_TASK = "d2r.send_reports"
REPORT_QUEUE = "d2r.report"
SEND_QUEUE = "d2r.send"

#: the Celery message priority of each study priority on the Redis transport, where 0 is
#: served first; kombu keeps one list per step of ``priority_steps`` (0, 3, 6, 9), so the four
#: priorities never share a list. The embedded ``filesystem://`` queue ignores it (first in,
#: first out): there only the claims' order serves urgent studies first.
BROKER_PRIORITY_STEPS = (0, 3, 6, 9)
_BROKER_PRIORITY = dict(
    zip(sorted(Priority, key=lambda p: p.rank), BROKER_PRIORITY_STEPS, strict=True)
)


def broker_priority(priority: Priority | str) -> int:
    """The Celery ``priority`` a study's job (or send) is queued with.

    >>> broker_priority("stat"), broker_priority(Priority.ROUTINE), broker_priority("low")
    (0, 6, 9)
    """
    return _BROKER_PRIORITY[Priority.parse(priority)]


@dataclass(frozen=True)
class JobInstance:
    sop_instance_uid: str
    sop_class_uid: str
    path: str


@dataclass(frozen=True)
class ReportJob:
    """One study to report on: the frontal images chosen by the node, best first."""

    study_instance_uid: str
    generation: int
    instances: tuple[JobInstance, ...]
    queued_at: float

    def __post_init__(self) -> None:
        if not self.study_instance_uid:
            raise ValueError("study_instance_uid must not be empty")
        if self.generation < 1:
            raise ValueError(f"generation must be >= 1, got {self.generation}")
        if not self.instances:
            raise ValueError("instances must not be empty")

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "generation": self.generation,
            "instances": [
                {
                    "sop_instance_uid": i.sop_instance_uid,
                    "sop_class_uid": i.sop_class_uid,
                    "path": i.path,
                }
                for i in self.instances
            ],
            "queued_at": self.queued_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReportJob:
        try:
            return cls(
                study_instance_uid=str(data["study_instance_uid"]),
                generation=int(data["generation"]),
                instances=tuple(
                    JobInstance(
                        sop_instance_uid=str(i["sop_instance_uid"]),
                        sop_class_uid=str(i["sop_class_uid"]),
                        path=str(i["path"]),
                    )
                    for i in data["instances"]
                ),
                queued_at=float(data["queued_at"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed report job: missing or invalid {exc}") from exc
