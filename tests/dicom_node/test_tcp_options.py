"""Socket options of the DICOM connections: the sender acknowledges a peer's data at once."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from d2r_core.tcp import quick_ack


class _Socket:
    def __init__(self) -> None:
        self.options: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))


class _Transport:
    def __init__(self) -> None:
        self.socket = _Socket()
        self.reads: list[int] = []

    def recv(self, nr_bytes: int) -> bytes:
        self.reads.append(nr_bytes)
        return b"\x00" * nr_bytes


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="Linux only")
def test_quick_ack_is_set_before_every_read() -> None:
    transport = _Transport()
    quick_ack(SimpleNamespace(assoc=SimpleNamespace(dul=SimpleNamespace(socket=transport))))
    assert transport.recv(6) == b"\x00" * 6
    transport.recv(200)
    assert transport.reads == [6, 200]  # the reads themselves are unchanged
    quick = (socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    assert transport.socket.options == [quick, quick]


def test_a_connection_without_a_socket_is_left_alone() -> None:
    quick_ack(SimpleNamespace(assoc=SimpleNamespace(dul=SimpleNamespace(socket=None))))
