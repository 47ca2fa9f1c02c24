"""Early completion on association release, on the real ``d2r node`` process and its database.

A study is complete a grace period after the association that brought its last instance was
released, when no other association of it is open; the quiet period still covers a PACS that
sends one study over several associations, and the rule lives in the database, so a node
restarted between the release and the completion still completes the study. No worker runs:
a completed study stays ``queued``, which is what these tests look at. Every wait is bounded
by a quiet period (10 min) no test reaches, so only the release rule can complete a study.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pynetdicom import AE
from pynetdicom.association import Association

from studydb.tables import studies_table
from tests.reliability.stack import Stack, make_stack
from tests.support.dicom_files import make_dx
from tests.support.processes import wait_for

pytestmark = [pytest.mark.integration]

LONG_QUIET = {"D2R_STUDY_QUIET_SECONDS": "600", "D2R_STUDY_FORCE_SECONDS": "1200"}


@pytest.fixture
def stack(model_dir: Path, tmp_path: Path) -> Iterator[Any]:
    created: list[Stack] = []

    def build(**env: str) -> Stack:
        s = make_stack(None, model_dir, tmp_path, **{**LONG_QUIET, **env})
        created.append(s)
        return s

    yield build
    for s in created:
        s.stop()


def _associate(port: int, ds: Any) -> Association:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="D2R")
    assert assoc.is_established
    return assoc


def _store(assoc: Association, ds: Any) -> None:
    status = assoc.send_c_store(ds)
    assert int(status.Status) == 0


def _released_at(s: Stack, uid: str) -> float | None:
    c = studies_table.c
    with s.store.engine.connect() as conn:
        value = conn.execute(
            sa.select(c.released_at).where(c.study_instance_uid == uid)
        ).scalar_one_or_none()
    return None if value is None else float(value)


def _queued_detail(s: Stack, uid: str) -> str:
    return next(e.detail for e in s.store.events(uid) if e.kind == "queued")


def test_study_completes_on_release_of_its_last_open_association(stack: Any) -> None:
    s: Stack = stack(D2R_STUDY_RELEASE_GRACE_SECONDS="1")
    s.start_node()
    first = make_dx(None, rows=64, cols=64, seed=1)
    second = make_dx(None, study_uid=first.StudyInstanceUID, rows=64, cols=64, seed=2)
    uid = str(first.StudyInstanceUID)
    a = _associate(s.node_port, first)
    b = _associate(s.node_port, second)
    _store(a, first)
    _store(b, second)  # a second association of the same study, still open
    a.release()
    # Well past the grace period the study still waits for association B.
    s.wait_states([uid], {"receiving"}, timeout=5)
    time.sleep(4)
    assert s.state(uid) == "receiving", s.logs()
    third = make_dx(None, study_uid=first.StudyInstanceUID, rows=64, cols=64, seed=3)
    _store(b, third)
    b.release()
    s.wait_states([uid], {"queued"}, timeout=60)
    assert "association released" in _queued_detail(s, uid)
    view = s.view(uid)
    assert view is not None and view.instance_count == 3


def test_node_restarted_between_release_and_completion_completes_the_study(stack: Any) -> None:
    s: Stack = stack(D2R_STUDY_RELEASE_GRACE_SECONDS="6")
    node = s.start_node()
    ds = make_dx(None, rows=64, cols=64, seed=7)
    uid = str(ds.StudyInstanceUID)
    assoc = _associate(s.node_port, ds)
    _store(assoc, ds)
    assoc.release()
    # The node records the release just after answering it; then it crashes within the grace.
    wait_for(lambda: _released_at(s, uid) is not None, 10, "the release recorded")
    node.kill9()
    assert s.state(uid) == "receiving"
    s.start_node()
    s.wait_states([uid], {"queued"}, timeout=90)
    assert "association released" in _queued_detail(s, uid)
