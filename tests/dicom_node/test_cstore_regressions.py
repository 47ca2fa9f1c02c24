"""Associations found by the fuzzing campaign (``fuzz/cstore.py``, inputs in
fuzz/regressions/cstore), replayed against a listener started as ``d2r node`` starts it.

Known gaps, marked ``xfail(strict=True)``: once fixed, remove the marker here and the matching
``KNOWN_GAPS`` entry in fuzz/cstore.py.
"""

from __future__ import annotations

import pytest

from fuzz import REGRESSIONS_DIR
from fuzz._harness import STRICT_ENV, PropertyViolation
from fuzz.cstore import harness


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.xfail(strict=True, raises=PropertyViolation, reason="the .part file is left")
def test_streamed_file_of_a_killed_dul(monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-STORE streamed into spool/tmp, then a PDU of unknown type: pynetdicom's DUL thread
    dies (InvalidEventError, 'Evt15' in 'Sta13') and EVT_CONN_CLOSE never fires, so the
    streamed ``.part`` file is not removed. Every other property of the target holds."""
    monkeypatch.setenv(STRICT_ENV, "1")
    data = (REGRESSIONS_DIR / "cstore" / "streamed-data-set-then-invalid-pdu").read_bytes()
    with harness() as one_input:
        one_input(data)
