"""The MLLP listener on loopback: frames in, acknowledgements out, limits kept."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from delivery.hl7 import parse_ack
from delivery.mllp import END_BLOCK, exchange, frame, unframe
from feedback.hl7_listener import Hl7Listener
from feedback.settings import FeedbackSettings
from studydb.store import StudyStore
from tests.support.signed_reports import add_study, oru


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Hl7Listener]:
    store = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    add_study(store, "1.8.1", accession="ACC1")
    settings = FeedbackSettings(port=0, max_message_bytes=4096, idle_seconds=1.0)
    hl7 = Hl7Listener(store, settings, host="127.0.0.1", sending_application="D2R")
    hl7.start()
    yield hl7
    hl7.stop()
    store.close()


def _read_frame(sock: socket.socket) -> bytes:
    data = b""
    while END_BLOCK not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return unframe(data) if data else b""


def test_each_frame_of_a_connection_is_answered_in_turn(listener: Hl7Listener) -> None:
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
        sock.sendall(b"noise" + frame(oru("Clear.", control_id="K1", accession="ACC1")))
        first = parse_ack(_read_frame(sock))
        sock.sendall(frame(oru("Clear.", control_id="K2", accession="NONE")))
        second = parse_ack(_read_frame(sock))
    assert (first.code, first.control_id, first.text) == ("AA", "K1", "stored as version 1")
    assert (second.code, second.control_id) == ("AA", "K2")
    assert second.text.startswith("recorded; no matching study")


def test_not_an_oru_is_rejected_and_recorded(listener: Hl7Listener) -> None:
    ack = parse_ack(
        exchange("127.0.0.1", listener.port, oru("x", message_type="ADT^A01"), timeout=5)
    )
    assert (ack.code, ack.control_id) == ("AR", "MSG0001")
    assert [m.outcome for m in listener.book.report_messages()] == ["rejected"]  # type: ignore[attr-defined]


def test_an_oversized_message_is_refused_and_the_connection_closed(
    listener: Hl7Listener,
) -> None:
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
        # one byte over the limit: the listener has read all of it when it answers, so its
        # close cannot reset the connection over unread data
        sock.sendall(b"\x0b" + b"x" * 4097)
        ack = parse_ack(_read_frame(sock))
        assert ack.code == "AR" and "larger than 4096 bytes" in ack.text
        assert sock.recv(10) == b""


def test_a_silent_connection_is_closed_after_the_idle_time(listener: Hl7Listener) -> None:
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
        sock.sendall(b"\x0bMSH|")
        started = time.monotonic()
        assert sock.recv(10) == b""
    assert 0.8 < time.monotonic() - started < 4.0


def test_the_listener_speaks_tls_with_the_node_certificate(tmp_path: Path) -> None:
    import ssl

    from d2r_core.config import TlsSettings
    from delivery.dimse import client_ssl_context
    from delivery.errors import TransientSendError
    from tests.security.tls_ca import make_test_ca

    pki = make_test_ca(tmp_path / "pki")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    store = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    add_study(store, "1.8.2", accession="ACC2")
    hl7 = Hl7Listener(
        store,
        FeedbackSettings(port=0, idle_seconds=2.0),
        host="127.0.0.1",
        sending_application="D2R",
        ssl_context=context,
    )
    hl7.start()
    try:
        client = client_ssl_context(TlsSettings(ca=pki.ca))
        message = oru("Clear.", control_id="T1", accession="ACC2")
        ack = parse_ack(exchange("127.0.0.1", hl7.port, message, timeout=5, context=client))
        assert (ack.code, ack.control_id) == ("AA", "T1")
        with pytest.raises(TransientSendError):  # plain MLLP to a TLS listener gets no ACK
            exchange("127.0.0.1", hl7.port, message, timeout=3)
        assert [r.message_control_id for r in store.signed_reports("1.8.2")] == ["T1"]
    finally:
        hl7.stop()
        store.close()
