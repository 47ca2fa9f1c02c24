"""ACKs found by the fuzzing campaign (``fuzz/hl7_ack.py``; inputs in fuzz/regressions/hl7_ack).

A RIS's answer is untrusted input: it parses or is refused with ``ValueError``, and what reaches
an error message (and so the worker's log) is one bounded line of printable, redacted text.
"""

from __future__ import annotations

import pytest

from delivery.errors import PermanentSendError, TransientSendError
from delivery.hl7 import Ack, check_ack, parse_ack

CONTROL_ID = "D2R7F3A9C1E2B4D6"


def test_an_msh_with_five_encoding_characters_and_few_fields_is_refused() -> None:
    # hl7apy reads MSH-12 of a five-separator MSH (v2.7) and raised IndexError on a short one
    data = b"MSH|^A~\\&|RIS|HOSP|D&000|P|2.5.1\rMSA|AE|" + CONTROL_ID.encode() + b"|busy\r"
    with pytest.raises(ValueError, match="unreadable acknowledgement"):
        parse_ack(data)


@pytest.mark.parametrize(
    ("ack", "kind"),
    [
        (Ack("AE", CONTROL_ID, "busy; 207 internal\x00\x00 error\x1b[2J"), PermanentSendError),
        (Ack("A\x1bR\x00", CONTROL_ID, "no"), PermanentSendError),
        (Ack("AR", CONTROL_ID, "patient Doe PID4711 unknown\u2028next line"), TransientSendError),
    ],
)
def test_ack_text_reaches_the_error_as_one_printable_redacted_line(
    ack: Ack, kind: type[Exception]
) -> None:
    with pytest.raises(kind) as caught:
        check_ack(ack, CONTROL_ID, name="mllp://ris:2575", secrets=["Doe", "PID4711"])
    message = str(caught.value)
    assert message.startswith("mllp://ris:2575 answered ")
    assert message.isprintable(), repr(message)
    assert "Doe" not in message and "PID4711" not in message


def test_a_long_foreign_control_id_is_quoted_short_and_printable() -> None:
    ack = Ack("AA", "X\x00" * 5000, "")
    with pytest.raises(TransientSendError) as caught:
        check_ack(ack, CONTROL_ID, name="mllp://ris:2575", secrets=[])
    message = str(caught.value)
    assert len(message) < 200
    assert "\\x00" not in message and "\x00" not in message
