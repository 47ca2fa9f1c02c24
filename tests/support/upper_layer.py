"""A raw DICOM upper-layer client (PS3.8): PDUs built byte for byte, nothing validated.

pynetdicom refuses to send what a hostile peer sends (a SOP Instance UID with a newline, a
data set it cannot frame); this client sends exactly the bytes it is given, on a real
association over loopback, and reads back the C-STORE responses. The hostile-client test and
the C-STORE fuzz target both speak through it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "ASSOCIATE_AC",
    "P_DATA",
    "StoreResponse",
    "associate_rq",
    "associate",
    "c_store_rq",
    "p_data",
    "read_pdus",
    "receive_all",
    "release_rq",
    "store_responses",
]

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS = "1.2.826.0.1.3680043.8.498.1"
ASSOCIATE_RQ, ASSOCIATE_AC, P_DATA, RELEASE_RQ = 0x01, 0x02, 0x04, 0x05
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001


def _even(raw: bytes, pad: bytes = b"\x00") -> bytes:
    return raw + pad if len(raw) % 2 else raw


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _pdu(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(payload)) + payload


def associate_rq(
    called: str, calling: str, contexts: Sequence[tuple[int, str, str]], max_pdu: int = 65536
) -> bytes:
    """A-ASSOCIATE-RQ proposing ``contexts`` as (context ID, abstract syntax, transfer syntax)."""
    body = struct.pack(">HH", 1, 0)
    body += called.encode("ascii").ljust(16) + calling.encode("ascii").ljust(16) + b"\x00" * 32
    body += _item(0x10, APPLICATION_CONTEXT.encode("ascii"))
    for context_id, abstract, transfer in contexts:
        sub = _item(0x30, abstract.encode("ascii")) + _item(0x40, transfer.encode("ascii"))
        body += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, IMPLEMENTATION_CLASS.encode())
    body += _item(0x50, user)
    return _pdu(ASSOCIATE_RQ, body)


def release_rq() -> bytes:
    return _pdu(RELEASE_RQ, b"\x00" * 4)


def _element(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def c_store_rq(message_id: int, sop_class: str, sop_instance: str | bytes) -> bytes:
    """A C-STORE-RQ command set (implicit VR little endian, as PS3.7 requires); the instance
    UID as text or as raw bytes (anything a hostile peer may send)."""
    if isinstance(sop_instance, str):
        sop_instance = sop_instance.encode("ascii")
    elements = (
        _element(0, 0x0002, _even(sop_class.encode("ascii")))
        + _element(0, 0x0100, struct.pack("<H", C_STORE_RQ))
        + _element(0, 0x0110, struct.pack("<H", message_id & 0xFFFF))
        + _element(0, 0x0700, struct.pack("<H", 0))
        + _element(0, 0x0800, struct.pack("<H", 0x0000))
        + _element(0, 0x1000, _even(sop_instance))
    )
    return _element(0, 0x0000, struct.pack("<I", len(elements))) + elements


def p_data(context_id: int, data: bytes, *, command: bool, fragment: int = 16000) -> bytes:
    """``data`` as P-DATA-TF PDUs of one PDV each, the last one flagged as such."""
    out = bytearray()
    chunks = [data[i : i + fragment] for i in range(0, len(data), fragment)] or [b""]
    for n, chunk in enumerate(chunks):
        header = (1 if command else 0) | (2 if n == len(chunks) - 1 else 0)
        out += _pdu(P_DATA, struct.pack(">IBB", len(chunk) + 2, context_id, header) + chunk)
    return bytes(out)


def read_pdus(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each complete PDU in ``data``."""
    at = 0
    while at + 6 <= len(data):
        kind, _, length = struct.unpack(">BBI", data[at : at + 6])
        if at + 6 + length > len(data):
            return
        yield kind, data[at + 6 : at + 6 + length]
        at += 6 + length


@contextlib.contextmanager
def associate(
    port: int,
    contexts: Sequence[tuple[int, str, str]],
    *,
    called: str = "D2R",
    calling: str = "HOSTILE",
    timeout: float = 30.0,
) -> Iterator[socket.socket | None]:
    """A connection with an accepted association, or None when the listener refused it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(associate_rq(called, calling, contexts))
        answer = b""
        while len(answer) < 6 or len(answer) < 6 + int.from_bytes(answer[2:6], "big"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        yield sock if answer[:1] == bytes([ASSOCIATE_AC]) else None


def receive_all(sock: socket.socket, *, half_close_after: float | None = None) -> bytes:
    """What the listener sends until it closes; with ``half_close_after``, our side is
    half-closed after that many seconds of silence (an input that ends mid-message)."""
    received = bytearray()
    if half_close_after is not None:
        sock.settimeout(half_close_after)
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            sock.settimeout(30.0)
            half_close_after = None
            continue
        except OSError:
            return bytes(received)
        if not chunk:
            return bytes(received)
        received += chunk


@dataclass(frozen=True)
class StoreResponse:
    """A C-STORE-RSP: its status and the SOP Instance it answers."""

    status: int
    sop_instance_uid: str


def _command_elements(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    at = 0
    while at + 8 <= len(data):
        group, element, length = struct.unpack("<HHI", data[at : at + 8])
        found[(group << 16) | element] = data[at + 8 : at + 8 + length]
        at += 8 + length
    return found


def store_responses(data: bytes) -> list[StoreResponse]:
    """The C-STORE-RSP messages in what the listener sent."""
    responses: list[StoreResponse] = []
    command = b""
    for kind, payload in read_pdus(data):
        if kind != P_DATA:
            continue
        at = 0
        while at + 6 <= len(payload):
            (length,) = struct.unpack(">I", payload[at : at + 4])
            header = payload[at + 5]
            fragment = payload[at + 6 : at + 4 + length]
            at += 4 + length
            if not header & 1:
                continue
            command += fragment
            if header & 2:
                elements = _command_elements(command)
                command = b""
                if struct.unpack("<H", elements.get(0x00000100, b"\0\0")[:2])[0] != C_STORE_RSP:
                    continue
                (status,) = struct.unpack("<H", elements.get(0x00000900, b"\xff\xff")[:2])
                uid = elements.get(0x00001000, b"").rstrip(b"\x00 ").decode("ascii", "replace")
                responses.append(StoreResponse(status, uid))
    return responses
