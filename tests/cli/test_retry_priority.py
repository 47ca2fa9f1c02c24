"""``d2r retry --priority``: an operator raises (or sets) a study's priority; ``d2r status``
shows it, and the queued studies by priority."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.main import main
from studydb.store import StudyStore
from tests.dicom_node.conftest import instance_row


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StudyStore]:
    for name in list(os.environ):
        if name.startswith("D2R_"):
            monkeypatch.delenv(name)
    url = f"sqlite:///{tmp_path / 'd2r.db'}"
    monkeypatch.setenv("D2R_DATABASE_URL", url)
    monkeypatch.setenv("D2R_SPOOL_DIR", str(tmp_path / "spool"))
    store = StudyStore(url)
    for uid in ("1.1", "1.2"):
        store.record_instance(instance_row(uid, uid + ".1", t=time.time()), outcome="stored")
        store.mark_queued(uid)
    try:
        yield store
    finally:
        store.close()


def test_retry_priority_raises_a_queued_study(
    database: StudyStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["retry", "--priority", "stat", "1.2"]) == 0
    assert "1.2: priority routine -> stat" in capsys.readouterr().out
    view = database.get("1.2")
    assert view is not None and (view.state, view.priority) == ("queued", "stat")
    assert [uid for uid, _ in database.queued_studies(limit=5)] == ["1.2", "1.1"]
    assert any(
        e.kind == "priority" and e.detail == "set from routine to stat (operator)"
        for e in database.events("1.2")
    )
    assert main(["retry", "--priority", "stat", "1.2"]) == 0
    assert "already stat" in capsys.readouterr().out

    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "queued by priority: stat=1  urgent=0  routine=1  low=0" in out
    line = next(x for x in out.splitlines() if x.endswith("  1.2"))
    assert " stat " in line
    assert main(["status", "1.2"]) == 0
    assert "Priority  stat" in capsys.readouterr().out


def test_retry_priority_on_a_failed_study_also_retries_it(
    database: StudyStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert database.claim("1.1", generation=1, owner="w", lease_seconds=60)
    database.mark_failed("1.1", "model error")
    assert main(["retry", "--priority", "urgent", "1.1"]) == 0
    out = capsys.readouterr().out
    assert "priority routine -> urgent" in out and "queued for a new report" in out
    view = database.get("1.1")
    assert view is not None and (view.state, view.priority) == ("receiving", "urgent")


def test_retry_priority_names_an_unknown_study_or_priority(
    database: StudyStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["retry", "--priority", "stat", "9.9"]) == 1
    assert "no study 9.9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["retry", "--priority", "asap", "1.1"])
