"""Fuzz target: the RIS's answer to an ORU^R01, over MLLP (:mod:`delivery.mllp`,
:func:`delivery.hl7.parse_ack`, :func:`delivery.hl7.check_ack`).

Each input is what a receiver on loopback answers to one :func:`delivery.mllp.exchange`; bytes
that hold no frame are given to :func:`~delivery.hl7.parse_ack` directly. Properties: the
exchange returns a message or raises ``TransientSendError``; the ACK (or, without a frame, the
bytes themselves) parses or is refused with ``ValueError``; :func:`~delivery.hl7.check_ack`
accepts it or raises a send error whose message (what the worker logs) is one bounded line of
printable text without the patient's identifiers.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from fuzz._harness import OneInput, PropertyViolation, check, fuzz_main, instrumented

with instrumented("delivery", "hl7apy"):
    from pydicom.dataset import Dataset

    from delivery import mllp
    from delivery.errors import PermanentSendError, TransientSendError
    from delivery.hl7 import Ack, check_ack, parse_ack, patient_identifiers

#: the control ID of the message the answers acknowledge (the seeds echo it in MSA-2)
CONTROL_ID = "D2R7F3A9C1E2B4D6"
DESTINATION = "mllp://ris.example:2575"
#: longest send-error message accepted (the ACK text part is cut at 300 characters)
MAX_MESSAGE = 1024


def _patient() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Doe^Jane^Q"
    ds.PatientID = "PID4711"
    ds.IssuerOfPatientID = "HOSPITALX"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC0815"
    return ds


SECRETS = patient_identifiers(_patient())


class _Receiver:
    """A receiver on loopback answering every frame with ``answer`` and closing."""

    def __init__(self) -> None:
        self.answer = b""
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, name="fuzz-mllp", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                received = b""
                while mllp.END_BLOCK not in received:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    received += chunk
                with contextlib.suppress(OSError):
                    conn.sendall(self.answer)

    def close(self) -> None:
        self._listener.close()


def _check_message(text: str) -> None:
    check(len(text) <= MAX_MESSAGE, f"send error message of {len(text)} characters")
    bad = sorted({c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0})
    check(not bad, f"control characters {bad!r} in a send error message: {text[:200]!r}")
    lowered = text.lower()
    for secret in SECRETS:
        if len(secret) >= 2:  # what redact() takes for an identifier
            check(secret.lower() not in lowered, f"patient identifier in a send error: {text!r}")


def _judge(ack: Ack) -> None:
    try:
        check_ack(ack, CONTROL_ID, name=DESTINATION, secrets=SECRETS)
    except (TransientSendError, PermanentSendError) as exc:
        _check_message(str(exc))
        return
    check(ack.code in ("AA", "CA"), f"accepted an ACK with code {ack.code!r}")
    check(ack.control_id == CONTROL_ID, f"accepted an ACK for {ack.control_id!r}")


def _parse(message: bytes) -> None:
    try:
        ack = parse_ack(message)
    except ValueError as exc:
        check(str(exc), "ACK refused without a message")
        return
    _judge(ack)


def one_input_with(receiver: _Receiver) -> OneInput:
    def one_input(data: bytes) -> None:
        receiver.answer = data
        try:
            message = mllp.exchange("127.0.0.1", receiver.port, b"MSH|^~\\&|D2R", timeout=5)
        except TransientSendError as exc:
            if "no acknowledgement within" in str(exc):
                raise PropertyViolation(f"the exchange timed out: {exc}") from None
            _check_message(str(exc).replace(f"127.0.0.1:{receiver.port}", DESTINATION))
            _parse(data)  # parse_ack's own input need not be a frame
        else:
            check(message in data, "the unframed message is not in the answer")
            _parse(message)

    return one_input


@contextlib.contextmanager
def harness() -> Iterator[OneInput]:
    receiver = _Receiver()
    try:
        yield one_input_with(receiver)
    finally:
        receiver.close()


if __name__ == "__main__":
    fuzz_main(harness)
