"""The append-only audit log: who sent what, and what d2r sent where.

One JSON object per line, in a file opened with ``O_APPEND`` (the node and the workers may share
it); each line is written with a single ``write()`` and never rewritten. Three kinds of line:

``association``
    ``calling_ae_title``, ``called_ae_title``, ``peer_address``, ``peer_port``, ``result``
    (``accepted`` or ``rejected``), ``reason``, ``start``, ``end``, ``instances``.
``received``
    ``sop_instance_uid``, ``study_instance_uid``, ``sop_class_uid``, ``calling_ae_title``,
    ``peer_address``, ``outcome`` (stored, duplicate, conflict, rejected, failed), ``status``
    (the DIMSE status answered, ``0x0000``), ``reason``. An instance stored over STOW-RS has
    ``calling_ae_title`` ``STOW-RS``, its status is the part's FailureReason (or ``0x0000``),
    and ``user`` names the authenticated sender.
``sent``
    ``sop_instance_uid``, ``study_instance_uid``, ``sop_class_uid``, ``destination``, ``status``
    (the peer's DIMSE status, or null when none came back), ``error``.

Every line also has ``time`` (ISO 8601, UTC), ``event`` and ``pid``. No PHI: UIDs, AE titles,
addresses, statuses and reasons only.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "audit.jsonl"
>>> log = AuditLog(path)
>>> log.record(SENT, sop_instance_uid="1.2.3", destination="PACS@h:104", status="0x0000")
>>> [e["event"] for e in read_audit(path)]
['sent']
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

__all__ = [
    "ASSOCIATION",
    "AUDIT_EVENTS",
    "RECEIVED",
    "SENT",
    "STUDY_FAILED",
    "AuditLog",
    "read_audit",
]

logger = logging.getLogger(__name__)

ASSOCIATION: Final = "association"
RECEIVED: Final = "received"
SENT: Final = "sent"
#: a study ended ``failed`` after its last attempt (stage, exception class, reason; no PHI)
STUDY_FAILED: Final = "study-failed"
AUDIT_EVENTS: Final = (ASSOCIATION, RECEIVED, SENT, STUDY_FAILED)


def _iso(at: float | None = None) -> str:
    moment = datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC)
    return moment.isoformat(timespec="milliseconds")


class AuditLog:
    """An append-only JSON-lines file.

    Parameters
    ----------
    path : Path
        The file; created (with its folder) if missing, never truncated.
    fsync : bool
        Also fsync after every line (each line is always flushed to the kernel).
    """

    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = -1

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._pid = os.getpid()
        return self._fd

    def record(self, event: str, *, at: float | None = None, **fields: Any) -> None:
        """Append one line ``{"time", "event", "pid", **fields}``.

        Raises
        ------
        ValueError
            For an unknown ``event``.
        OSError
            When the line cannot be written (the caller decides whether that is fatal).
        """
        if event not in AUDIT_EVENTS:
            raise ValueError(f"event must be one of {', '.join(AUDIT_EVENTS)}, not {event!r}")
        line = {"time": _iso(at), "event": event, "pid": os.getpid(), **fields}
        data = (json.dumps(line, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            fd = self._descriptor()
            written = os.write(fd, data)
            if written != len(data):  # a regular file takes it whole unless the disk is full
                raise OSError(f"short write to the audit log {self.path}")
            if self.fsync:
                os.fsync(fd)

    def try_record(self, event: str, **fields: Any) -> None:
        """:meth:`record`, logging (not raising) a failure: auditing must not stop a transfer."""
        try:
            self.record(event, **fields)
        except OSError:
            logger.exception("could not write the audit log %s", self.path)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None


def read_audit(path: Path) -> Iterator[dict[str, Any]]:
    """The lines of an audit log as dicts, oldest first; an unparsable line is skipped."""
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 - closed below, generator
    except FileNotFoundError:
        return
    with f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield json.loads(raw)
            except json.JSONDecodeError:
                logger.warning("audit log %s line %d is not JSON; skipped", path, number)


# ------------------------------------------------------------------------ listener side
_REJECT_REASONS: Final = {
    (1, 2): "application_context_not_supported",
    (1, 3): "calling_ae_not_recognised",
    (1, 7): "called_ae_not_recognised",
    (2, 2): "protocol_version_not_supported",
    (3, 1): "temporary_congestion",
    (3, 2): "local_limit_exceeded",
}


def association_reject_reason(source: int | None, diagnostic: int | None) -> str:
    """A short token for an A-ASSOCIATE-RJ (PS3.8 Table 9-21 source and diagnostic)."""
    if source is None or diagnostic is None:
        return "rejected"
    return _REJECT_REASONS.get((source, diagnostic), "no_reason_given")


class ListenerAudit:
    """pynetdicom event handlers and a study-recorder wrapper that audit and count the listener.

    Bind :meth:`handlers` as ``extra_handlers`` of :func:`dicom_node.scp.start_server` and pass
    :meth:`recorder` of the study store as its store: association requests, every C-STORE
    response (with the status actually answered) and the instance outcome recorded by the
    handler then produce one audit line each and move the metrics.

    Parameters
    ----------
    audit : AuditLog or None
        Where to write; None counts metrics only.
    """

    def __init__(self, audit: AuditLog | None) -> None:
        from observability import metrics

        self._metrics = metrics
        self.audit = audit
        self._lock = threading.Lock()
        self._associations: dict[int, dict[str, Any]] = {}
        self._instances: dict[tuple[int, str], dict[str, Any]] = {}

    # -- pynetdicom notification handlers (association threads) --
    def handlers(self) -> list[Any]:
        from pynetdicom import evt

        return [
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_DIMSE_SENT, self.on_dimse_sent),
        ]

    @staticmethod
    def _peer(assoc: Any) -> dict[str, Any]:
        requestor = assoc.requestor
        primitive = getattr(requestor, "primitive", None)
        called = getattr(primitive, "called_ae_title", None) or assoc.acceptor.ae_title
        return {
            "calling_ae_title": str(requestor.ae_title).strip(),
            "called_ae_title": str(called).strip(),
            "peer_address": requestor.address,
            "peer_port": requestor.port,
        }

    def on_accepted(self, event: Any) -> None:
        self._metrics.observe_association(True)
        with self._lock:
            self._associations[id(event.assoc)] = {
                **self._peer(event.assoc),
                "start": _iso(),
                "instances": 0,
            }

    def on_rejected(self, event: Any) -> None:
        primitive = getattr(event.assoc.acceptor, "primitive", None)
        reason = association_reject_reason(
            getattr(primitive, "result_source", None), getattr(primitive, "diagnostic", None)
        )
        self._metrics.observe_association(False, reason)
        logger.warning("association from %s rejected: %s", event.assoc.requestor.address, reason)
        if self.audit is not None:
            now = _iso()
            self.audit.try_record(
                ASSOCIATION,
                **self._peer(event.assoc),
                result="rejected",
                reason=reason,
                start=now,
                end=now,
                instances=0,
            )

    def _finish(self, assoc: Any, reason: str) -> None:
        with self._lock:
            entry = self._associations.pop(id(assoc), None)
            stale = [k for k in self._instances if k[0] == id(assoc)]
            for key in stale:
                del self._instances[key]
        if entry is not None and self.audit is not None:
            self.audit.try_record(
                ASSOCIATION, **entry, result="accepted", reason=reason, end=_iso()
            )

    def on_released(self, event: Any) -> None:
        self._finish(event.assoc, "released")

    def on_aborted(self, event: Any) -> None:
        self._finish(event.assoc, "aborted")

    def on_conn_close(self, event: Any) -> None:
        self._finish(event.assoc, "connection closed")

    def on_dimse_sent(self, event: Any) -> None:
        message = event.message
        if type(message).__name__ != "C_STORE_RSP":
            return
        command = message.command_set
        status = int(command.Status)
        sop_uid = str(command.get("AffectedSOPInstanceUID", ""))
        with self._lock:
            noted = self._instances.pop((id(event.assoc), sop_uid), {})
            entry = self._associations.get(id(event.assoc))
            if entry is not None:
                entry["instances"] += 1
        from d2r_core import statuses

        failed = statuses.is_failure(status)
        outcome = "rejected" if failed and noted else "failed" if failed else noted.get("outcome")
        self._metrics.observe_store_response(status, None if failed else outcome)
        if self.audit is not None:
            self.audit.try_record(
                RECEIVED,
                sop_instance_uid=sop_uid,
                study_instance_uid=noted.get("study_instance_uid"),
                sop_class_uid=str(command.get("AffectedSOPClassUID", "")),
                calling_ae_title=str(event.assoc.requestor.ae_title).strip(),
                peer_address=event.assoc.requestor.address,
                outcome=outcome or "stored",
                status=f"0x{status:04X}",
                reason=noted.get("reason"),
            )

    # -- what the C-STORE handler recorded (same association thread, before the response) --
    def _note(self, sop_uid: str, **fields: Any) -> None:
        # pynetdicom runs the C-STORE handler in the association's own thread (an Association
        # is a Thread), so the current thread identifies the association of EVT_DIMSE_SENT.
        assoc = threading.current_thread()
        with self._lock:
            self._instances[(id(assoc), sop_uid)] = fields

    def stow_instance(self, result: Any, client: str, user: str) -> None:
        """One part of a STOW-RS request answered (a :class:`dicom_node.stow.PartResult`).

        Counted and audited as a C-STORE response: a ``received`` line with ``calling_ae_title``
        ``STOW-RS``, the client address and the authenticated ``user``.
        """
        from d2r_core import statuses

        failed = statuses.is_failure(result.status)
        self._metrics.observe_store_response(result.status, None if failed else result.outcome)
        if self.audit is not None:
            self.audit.try_record(
                RECEIVED,
                sop_instance_uid=result.sop_instance_uid,
                study_instance_uid=result.study_instance_uid,
                sop_class_uid=result.sop_class_uid,
                calling_ae_title="STOW-RS",
                peer_address=client,
                user=user,
                outcome=("rejected" if failed else result.outcome) or "stored",
                status=f"0x{result.status:04X}",
                reason=result.reason,
            )

    def recorder(self, store: Any) -> AuditingRecorder:
        """Wrap ``store`` (a :class:`~studydb.store.StudyStore`) for the C-STORE handler."""
        return AuditingRecorder(store, self)


class AuditingRecorder:
    """The study recorder the C-STORE handler sees: records in the store, notes the outcome."""

    def __init__(self, store: Any, audit: ListenerAudit) -> None:
        self._store = store
        self._audit = audit

    def record_instance(self, record: Any, *, outcome: str) -> str:
        recorded = str(self._store.record_instance(record, outcome=outcome))
        self._audit._note(
            record.sop_instance_uid,
            outcome=recorded,
            study_instance_uid=record.study_instance_uid,
        )
        return recorded

    def record_rejection(
        self,
        *,
        sop_instance_uid: str,
        study_instance_uid: str | None,
        reason: str,
        calling_ae_title: str,
    ) -> None:
        self._audit._note(sop_instance_uid, study_instance_uid=study_instance_uid, reason=reason)
        self._store.record_rejection(
            sop_instance_uid=sop_instance_uid,
            study_instance_uid=study_instance_uid,
            reason=reason,
            calling_ae_title=calling_ae_title,
        )
