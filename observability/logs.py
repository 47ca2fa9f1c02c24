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

A text line cannot be forged by what a peer sends: :class:`TextFormatter` writes control
characters of the message and the ids escaped (a newline as ``\\n``) and indents every line of
an exception's text, so each record starts exactly one line that begins with its time:

>>> record = logging.LogRecord("d2r", logging.WARNING, "", 0, "got %s", ("1.2\\nfake",), None)
>>> print(TextFormatter("%(message)s").format(record))
got 1.2\\nfake
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "CONTEXT_FIELDS",
    "ContextFilter",
    "JsonFormatter",
    "TextFormatter",
    "bind",
    "configure_logging",
    "current_context",
    "escape_controls",
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


#: C0 and C1 controls, DEL and the Unicode line and paragraph separators, as escapes.
_CONTROLS = {
    c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if chr(c) not in "\n\r\t"
}
_CONTROLS |= {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
_CONTROLS |= {0x2028: "\\u2028", 0x2029: "\\u2029"}


_JSON_SEPARATORS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def escape_controls(text: str) -> str:
    """``text`` as one line: control characters escaped (``\\n``, ``\\x1b`` ...).

    >>> print(escape_controls("a\\r\\nb\\x1b[31m"))
    a\\r\\nb\\x1b[31m
    """
    return text.translate(_CONTROLS)


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
        # JSON escapes C0 controls itself; the separators Python's splitlines() also splits on
        # are escaped too, so a record is always one line.
        return json.dumps(out, ensure_ascii=False, default=str).translate(_JSON_SEPARATORS)


class TextFormatter(logging.Formatter):
    """The text format, one line per record: the message and the bound ids with control
    characters escaped, an exception's text indented below it."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        saved = record.message, getattr(record, "d2r_context", None)
        record.message = escape_controls(record.message)
        if saved[1] is not None:
            record.d2r_context = escape_controls(saved[1])
        try:
            return super().formatMessage(record)
        finally:
            record.message = saved[0]
            if saved[1] is not None:
                record.d2r_context = saved[1]

    def formatException(self, ei: Any) -> str:  # noqa: N802
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return _indented(stack_info)


def _indented(text: str) -> str:
    """Each line of ``text`` indented, its control characters escaped."""
    return "\n".join("  " + escape_controls(line) for line in text.splitlines())


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
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
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
