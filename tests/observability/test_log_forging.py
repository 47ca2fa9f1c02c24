"""No peer-supplied text can start a line of the text log: control characters in messages and
bound ids are escaped, exception texts are indented, JSON lines stay one object each."""

from __future__ import annotations

import io
import json
import logging
import re

from observability.logs import TEXT_FORMAT, ContextFilter, JsonFormatter, TextFormatter, bind

FORGED = '1.2.3\n2026-01-01 00:00:00,000 INFO MainProcess d2r.audit: {"event": "forged"}'
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def _log(formatter: logging.Formatter) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(formatter)
    log = logging.getLogger("tests.log_forging")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        with bind(sop_instance_uid=FORGED):
            log.warning("instance %s refused", FORGED)
            try:
                raise ValueError(f"bad UID {FORGED}\r\x1b[2K")
            except ValueError:
                log.exception("reading %s failed", "\u2028" + FORGED)
    finally:
        log.removeHandler(handler)
    return stream.getvalue()


def test_text_lines_cannot_be_forged() -> None:
    out = _log(TextFormatter(TEXT_FORMAT))
    lines = out.splitlines()
    records = [line for line in lines if STAMP.match(line)]
    assert len(records) == 2  # one line per record begins with a time stamp
    assert all(line.startswith("  ") for line in lines if not STAMP.match(line))
    assert "d2r.audit" in out and "\\n2026-01-01" in out  # the text is there, escaped
    assert "\x1b" not in out and "\u2028" not in out and "\r" not in out


def test_json_lines_stay_one_object_each() -> None:
    out = _log(JsonFormatter())
    lines = out.splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["sop_instance_uid"] == FORGED
