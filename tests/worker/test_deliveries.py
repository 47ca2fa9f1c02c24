"""Deliveries: the first send attempt of a reported study runs beside the next study."""

from __future__ import annotations

import logging
import threading

import pytest

from worker.sending import Deliveries


def test_sends_run_in_the_background_and_drain_waits_for_them() -> None:
    release = threading.Event()
    sent: list[tuple[str, str, str]] = []

    def send(uid: str, dest: str) -> None:
        release.wait(10)
        sent.append((uid, dest, threading.current_thread().name))

    deliveries = Deliveries(send)
    deliveries.submit("1.2.3", "PACS@h:104")
    deliveries.submit("1.2.4", "PACS@h:104")
    assert sent == []  # submit returned while the first send still waits
    release.set()
    deliveries.drain(10)
    assert [(u, d) for u, d, _ in sent] == [("1.2.3", "PACS@h:104"), ("1.2.4", "PACS@h:104")]
    assert all(name.startswith("d2r-send") for _, _, name in sent)


def test_a_failing_send_is_logged_and_the_next_one_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent: list[str] = []

    def send(uid: str, dest: str) -> None:
        if uid == "bad":
            raise RuntimeError("database is locked")
        sent.append(uid)

    deliveries = Deliveries(send)
    with caplog.at_level(logging.ERROR, logger="worker.tasks"):
        deliveries.submit("bad", "PACS@h:104")
        deliveries.submit("good", "PACS@h:104")
        deliveries.drain(10)
    assert sent == ["good"]
    assert "send of study bad to PACS@h:104 failed" in caplog.text


def test_drain_without_sends_returns() -> None:
    Deliveries(lambda uid, dest: None).drain(1)
