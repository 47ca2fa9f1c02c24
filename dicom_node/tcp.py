"""Socket options of the DICOM connections (both directions).

pynetdicom writes a C-STORE as several PDUs (command, then data set) and leaves Nagle's
algorithm on, so on loopback and LANs each small message waits for the peer's delayed ACK
(about 40 ms a round). :func:`no_delay` turns it off as the connection opens: a small SR sent
to a PACS, or a C-STORE response to a modality, leaves at once.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

__all__ = ["no_delay"]


def no_delay(event: Any) -> None:
    """``EVT_CONN_OPEN`` handler: set ``TCP_NODELAY`` on the association's socket."""
    transport = getattr(event.assoc.dul, "socket", None)
    sock = getattr(transport, "socket", None)
    if sock is None:
        return
    with contextlib.suppress(OSError):  # not a TCP socket, or already closed
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
