"""Socket options of the DICOM connections (both directions).

pynetdicom writes a C-STORE as several PDUs (command, then data set) and leaves Nagle's
algorithm on, so on loopback and LANs each small message waits for the peer's delayed ACK
(about 40 ms a round). :func:`no_delay` turns it off as the connection opens: a small SR sent
to a PACS, or a C-STORE response to a modality, leaves at once.

pynetdicom reads a PDU 4 KiB at a time, one Python call and one copy per 4 KiB (2,500 for a
10 MB radiograph). :func:`large_reads` gives the listener's connections a reader that fills
the PDU's buffer directly with as much as the socket holds.
"""

from __future__ import annotations

import contextlib
import socket
import types
from typing import Any

__all__ = ["large_reads", "no_delay"]


def no_delay(event: Any) -> None:
    """``EVT_CONN_OPEN`` handler: set ``TCP_NODELAY`` on the association's socket."""
    transport = getattr(event.assoc.dul, "socket", None)
    sock = getattr(transport, "socket", None)
    if sock is None:
        return
    with contextlib.suppress(OSError):  # not a TCP socket, or already closed
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _recv(transport: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv``: ``nr_bytes`` read into one buffer (fewer if the peer closes)."""
    sock = transport.socket
    buffer = bytearray(nr_bytes)
    read = 0
    with memoryview(buffer) as view:
        while read < nr_bytes:
            count = sock.recv_into(view[read:])
            if not count:  # the connection is broken: return what came, as pynetdicom does
                break
            read += count
    if read < nr_bytes:
        del buffer[read:]
    return buffer


def large_reads(event: Any) -> None:
    """``EVT_CONN_OPEN`` handler: read this association's PDUs with :func:`_recv`."""
    transport = getattr(event.assoc.dul, "socket", None)
    if transport is not None and hasattr(transport, "recv"):
        transport.recv = types.MethodType(_recv, transport)
