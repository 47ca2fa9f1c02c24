"""Helpers for the DICOM node tests: a recording study store and a handle on a running node."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dicom_node.settings import NodeSettings
from dicom_node.spool import Spool
from studydb.records import InstanceRecord


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Recorder:
    """Implements the two StudyStore methods the listener calls, and remembers the calls."""

    instances: list[tuple[InstanceRecord, str]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_instance(self, record: InstanceRecord, *, outcome: str) -> str:
        with self.lock:
            self.instances.append((record, outcome))
        return outcome

    def record_rejection(
        self,
        *,
        sop_instance_uid: str,
        study_instance_uid: str | None,
        reason: str,
        calling_ae_title: str,
    ) -> None:
        with self.lock:
            self.rejections.append(
                {
                    "sop_instance_uid": sop_instance_uid,
                    "study_instance_uid": study_instance_uid,
                    "reason": reason,
                    "calling_ae_title": calling_ae_title,
                }
            )

    def outcomes(self, sop_instance_uid: str) -> list[str]:
        return [o for r, o in self.instances if r.sop_instance_uid == sop_instance_uid]


@dataclass
class Node:
    settings: NodeSettings
    spool: Spool
    store: Recorder
    server: Any

    @property
    def port(self) -> int:
        return self.settings.port


NodeFactory = Callable[..., Node]
