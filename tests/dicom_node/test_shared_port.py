"""One listening socket served by two association servers: spread, stop, refuse a rival bind."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.shared_port import SharedPortServer, start_shared_server

VERIFICATION = "1.2.840.10008.1.1"


def _scp() -> AE:
    ae = AE(ae_title="SHARED")
    ae.add_supported_context(VERIFICATION)
    return ae


def _associate(port: int) -> Association:
    scu = AE(ae_title="SCU")
    scu.add_requested_context(VERIFICATION)
    assoc = scu.associate("127.0.0.1", port, ae_title="SHARED")
    assert assoc.is_established
    return assoc


@pytest.fixture
def servers() -> Iterator[tuple[SharedPortServer, SharedPortServer]]:
    first = start_shared_server(_scp(), ("127.0.0.1", 0))
    assert first.socket is not None
    inherited = socket.socket(fileno=os.dup(first.socket.fileno()))  # as a listener process
    second = start_shared_server(_scp(), ("127.0.0.1", 0), inherited=inherited)
    running = [first, second]
    yield first, second
    for server in running:
        if server.socket is not None and server.socket.fileno() >= 0:
            server.shutdown()


def test_an_idle_server_takes_the_next_association(
    servers: tuple[SharedPortServer, SharedPortServer],
) -> None:
    first, second = servers
    port = first.server_address[1]
    assert second.server_address[1] == port

    def counts() -> list[int]:
        return [len(first.active_associations), len(second.active_associations)]

    held = [_associate(port), _associate(port)]
    try:
        # the server serving the first association waits before accepting: the other takes it
        assert counts() == [1, 1]
        held += [_associate(port) for _ in range(6)]
        assert sum(counts()) == 8
        assert max(counts()) - min(counts()) <= 2, counts()  # left to chance: 7 to 1 happens
        for assoc in held:
            assert assoc.send_c_echo().Status == 0x0000
    finally:
        for assoc in held:
            assoc.release()


def test_a_stopping_listener_leaves_the_shared_socket_to_the_others(
    servers: tuple[SharedPortServer, SharedPortServer],
) -> None:
    first, second = servers
    port = first.server_address[1]
    second.shutdown()  # closes its descriptor only, never shuts the socket down
    for _ in range(3):
        assoc = _associate(port)
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    assert first.socket is not None and first.socket.fileno() >= 0


def test_a_second_node_on_the_same_port_still_fails_to_bind(
    servers: tuple[SharedPortServer, SharedPortServer],
) -> None:
    first, _ = servers
    with pytest.raises(OSError), socket.socket() as rival:
        rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pynetdicom does
        rival.bind(("127.0.0.1", first.server_address[1]))
        rival.listen()
