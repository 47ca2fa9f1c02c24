"""Socket options of the DICOM connections (both directions).

pynetdicom writes a C-STORE as several PDUs (command, then data set) and leaves Nagle's
algorithm on, so on loopback and LANs each small message waits for the peer's delayed ACK
(about 40 ms a round). :func:`no_delay` turns it off as the connection opens: a small SR sent
to a PACS, or a C-STORE response to a modality, leaves at once.

Nagle's algorithm is on at most peers too (dcmtk, Orthanc): a PACS writes its C-STORE response
in pieces, and the last one waits for our ACK of the first, which Linux delays by up to 40 ms
once a connection has settled into request-response. :func:`quick_ack` has the sender
acknowledge at once (``TCP_QUICKACK`` before every read, since Linux clears it again): the
second SR of a study no longer waits 40 ms for its response.

pynetdicom reads a PDU 4 KiB at a time, one Python call and one copy per 4 KiB (2,500 for a
10 MB radiograph). :func:`large_reads` gives the listener's connections a reader that fills
the PDU's buffer directly with as much as the socket holds.
"""

from __future__ import annotations

import contextlib
import socket
import types
from typing import Any

__all__ = ["large_reads", "no_delay", "quick_ack"]


def no_delay(event: Any) -> None:
    """``EVT_CONN_OPEN`` handler: set ``TCP_NODELAY`` on the association's socket."""
    transport = getattr(event.assoc.dul, "socket", None)
    sock = getattr(transport, "socket", None)
    if sock is None:
        return
    with contextlib.suppress(OSError):  # not a TCP socket, or already closed
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def quick_ack(event: Any) -> None:
    """``EVT_CONN_OPEN`` handler: acknowledge what the peer sends at once (Linux
    ``TCP_QUICKACK``, set before each read of this association; nothing elsewhere)."""
    option = getattr(socket, "TCP_QUICKACK", None)
    transport: Any = getattr(event.assoc.dul, "socket", None)
    sock = getattr(transport, "socket", None)
    if option is None or sock is None or not hasattr(transport, "recv"):
        return
    read = transport.recv

    def recv(nr_bytes: int) -> Any:
        with contextlib.suppress(OSError):  # closed meanwhile: the read reports it
            sock.setsockopt(socket.IPPROTO_TCP, option, 1)
        return read(nr_bytes)

    transport.recv = recv


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
