"""Log correlation ids and the JSON log format.

Library code logs with ``logging.getLogger(__name__)``; the code handling one study, instance or
task binds its ids with :func:`bind`, and every record logged meanwhile carries them:

>>> import io, json, logging
>>> stream = io.StringIO()
>>> handler = logging.StreamHandler(stream)
>>> handler.setFormatter(JsonFormatter())
>>> log = logging.getLogger("doctest.logs")
>>> log.addHandler(handler); log.propagate = False; log.setLevel(logging.INFO)
>>> with bind(study_instance_uid="1.2.3", task_id="t-1"):
...     log.info("study queued")
>>> line = json.loads(stream.getvalue())
>>> line["message"], line["study_instance_uid"], line["task_id"], "sop_instance_uid" in line
('study queued', '1.2.3', 't-1', False)

Only UIDs and task ids are carried, never patient name, ID or birth date; the formatter writes
the message, the exception text and the ids, nothing else from the record.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

__all__ = [
    "CONTEXT_FIELDS",
    "ContextFilter",
    "JsonFormatter",
    "bind",
    "configure_logging",
    "current_context",
]

study_instance_uid_var: ContextVar[str | None] = ContextVar("study_instance_uid", default=None)
sop_instance_uid_var: ContextVar[str | None] = ContextVar("sop_instance_uid", default=None)
task_id_var: ContextVar[str | None] = ContextVar("task_id", default=None)

_VARS = {
    "study_instance_uid": study_instance_uid_var,
    "sop_instance_uid": sop_instance_uid_var,
    "task_id": task_id_var,
}
#: The correlation ids a record may carry.
CONTEXT_FIELDS = tuple(_VARS)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s%(d2r_context)s"


def current_context() -> dict[str, str]:
    """The ids bound in the current context (unset ones left out)."""
    return {name: value for name, var in _VARS.items() if (value := var.get()) is not None}


@contextmanager
def bind(
    *,
    study_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    task_id: str | None = None,
) -> Iterator[None]:
    """Carry the given ids on every record logged inside the ``with`` block.

    Ids left as None keep their outer value.
    """
    values = {
        "study_instance_uid": study_instance_uid,
        "sop_instance_uid": sop_instance_uid,
        "task_id": task_id,
    }
    tokens = [(_VARS[k], _VARS[k].set(v)) for k, v in values.items() if v is not None]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Copy the bound ids onto each record (``record.study_instance_uid`` ...).

    Also sets ``record.d2r_context``, a ``" [study=... sop=... task=...]"`` suffix for the text
    format (empty when nothing is bound).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        context = current_context()
        for name in CONTEXT_FIELDS:
            setattr(record, name, context.get(name))
        short = {"study_instance_uid": "study", "sop_instance_uid": "sop", "task_id": "task"}
        record.d2r_context = (
            " [" + " ".join(f"{short[k]}={v}" for k, v in context.items()) + "]" if context else ""
        )
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message and the bound ids."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "pid": record.process,
            "message": record.getMessage(),
        }
        context = current_context()
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None) or context.get(name)
            if value:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Configure the root logger of a process (entry points only).

    Parameters
    ----------
    level : str
        A :mod:`logging` level name; an unknown name means INFO.
    log_format : {"text", "json"}
        Human-readable lines, or one JSON object per line.
    """
    if log_format not in ("text", "json"):
        raise ValueError(f"log_format must be text or json, not {log_format!r}")
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # pynetdicom logs every PDU at DEBUG and full dataset summaries (with patient data) at
    # INFO: keep it at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Alembic announces its autogenerate plugins at import: noise in a node's log.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
