"""MLLP, the HL7 minimal lower layer protocol: one framed message out, one framed answer back.

A frame is ``0x0B`` + the message + ``0x1C 0x0D`` (HL7 v2.5.1 Appendix C, MLLP release 1).
:func:`exchange` connects (over TLS when given a context), sends one frame and reads one
frame within ``timeout`` seconds for the connection and for every read. Whatever goes wrong
on the wire - refused or reset connection, TLS handshake, timeout, a peer that closes before
answering, an answer that is not a frame - is a :class:`~delivery.errors.TransientSendError`:
the message may arrive on a later attempt.

>>> unframe(frame(b"MSH|^~\\\\&|A"))
b'MSH|^~\\\\&|A'
"""

from __future__ import annotations

import socket
import ssl

from delivery.errors import TransientSendError

__all__ = ["END_BLOCK", "MAX_ANSWER_BYTES", "START_BLOCK", "exchange", "frame", "unframe"]

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
#: an acknowledgement is a few hundred bytes; more than this is not an ACK
MAX_ANSWER_BYTES = 1 << 20


def frame(message: bytes) -> bytes:
    """Wrap one encoded message in the MLLP start and end blocks."""
    return START_BLOCK + message + END_BLOCK


def unframe(data: bytes) -> bytes:
    """The message inside one MLLP frame (bytes before the start block are ignored).

    Raises
    ------
    ValueError
        When ``data`` holds no complete frame.
    """
    start = data.find(START_BLOCK)
    end = data.find(END_BLOCK, start + 1)
    if start < 0 or end < 0:
        raise ValueError("not an MLLP frame")
    return data[start + 1 : end]


def exchange(
    host: str,
    port: int,
    message: bytes,
    *,
    timeout: float,
    context: ssl.SSLContext | None = None,
    name: str | None = None,
) -> bytes:
    """Send ``message`` in one frame and return the message of the answering frame.

    Parameters
    ----------
    host, port : str, int
        The receiver.
    message : bytes
        The encoded HL7 message (segments separated by carriage returns).
    timeout : float
        Seconds for the connection and for each read.
    context : ssl.SSLContext or None
        Reach the receiver over TLS, checking its certificate against ``host``.
    name : str or None
        The destination's name in error messages (default ``host:port``).

    Raises
    ------
    TransientSendError
        For every network failure and for an answer that is not a frame.
    """
    label = name or f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is None:
                return _talk(raw, message, label)
            with context.wrap_socket(raw, server_hostname=host) as tls:
                return _talk(tls, message, label)
    except TimeoutError as exc:
        raise TransientSendError(f"{label}: no acknowledgement within {timeout:g} s") from exc
    except OSError as exc:  # refused, reset, unreachable, TLS (ssl.SSLError is an OSError)
        raise TransientSendError(f"{label}: {exc}") from exc


def _talk(sock: socket.socket, message: bytes, label: str) -> bytes:
    sock.sendall(frame(message))
    received = bytearray()
    while END_BLOCK not in received:
        chunk = sock.recv(65536)
        if not chunk:
            what = "closed the connection without an acknowledgement"
            raise TransientSendError(f"{label}: {what}")
        received += chunk
        if len(received) > MAX_ANSWER_BYTES:
            raise TransientSendError(f"{label}: answer larger than {MAX_ANSWER_BYTES} bytes")
    try:
        return unframe(bytes(received))
    except ValueError:
        raise TransientSendError(f"{label}: the answer is not an MLLP frame") from None
