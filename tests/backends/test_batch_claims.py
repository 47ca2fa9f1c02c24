"""How a batching worker takes studies: ``D2R_BATCH_MAX`` / ``D2R_BATCH_WAIT_MS``, claims of
queued studies from the study database (SQLite), and one heartbeat renewing every claim."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from d2r_core.errors import ConfigError
from studydb.records import InstanceRecord
from studydb.store import StudyStore
from studydb.tables import studies_table
from tests.support.processes import wait_for
from worker.claims import claim_more
from worker.lease import LeaseHeartbeat as BatchHeartbeat
from worker.settings import WorkerSettings
from worker.stages import Stage, StageTracker


def test_batch_settings_follow_the_device() -> None:
    assert WorkerSettings.from_env({}).batch_max == 1
    assert WorkerSettings.from_env({"D2R_DEVICE": "cuda"}).batch_max == 8
    assert WorkerSettings.from_env({"D2R_DEVICE": "cuda:1"}).batch_max == 8
    custom = WorkerSettings.from_env(
        {"D2R_DEVICE": "cuda", "D2R_BATCH_MAX": "3", "D2R_BATCH_WAIT_MS": "50"}
    )
    assert (custom.batch_max, custom.batch_wait_seconds) == (3, 0.05)
    assert WorkerSettings.from_env({}).batch_wait_seconds == 0.02
    assert WorkerSettings.from_env({"D2R_BATCH_WAIT_MS": "0"}).batch_wait_seconds == 0.0
    for setting, value in [
        ("D2R_BATCH_MAX", "0"),
        ("D2R_BATCH_MAX", "many"),
        ("D2R_BATCH_WAIT_MS", "-1"),
        ("D2R_BATCH_WAIT_MS", "nan"),
        ("D2R_BATCH_WAIT_MS", "60000"),
    ]:
        with pytest.raises(ConfigError, match=setting):
            WorkerSettings.from_env({setting: value})


def _record(study: str, sop: str) -> InstanceRecord:
    return InstanceRecord(
        study_instance_uid=study,
        series_instance_uid=study + ".1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CR",
        body_part_examined="CHEST",
        view_position="PA",
        series_description="",
        path=f"/spool/{sop}.dcm",
        size=10,
        sha256="0" * 64,
        calling_ae_title="PACS",
        received_at=datetime.now(UTC),
    )


@pytest.fixture
def store(tmp_path: Path) -> StudyStore:
    s = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    for n in range(5):
        s.record_instance(_record(f"1.2.{n}", f"1.2.{n}.1.1"), outcome="stored")
        assert s.mark_queued(f"1.2.{n}") == 1
    return s


def _settings(**env: str) -> WorkerSettings:
    return WorkerSettings.from_env({"D2R_BATCH_MAX": "4", **env})


def test_claim_more_takes_queued_studies_with_their_own_claims(store: StudyStore) -> None:
    settings = _settings(D2R_BATCH_WAIT_MS="0")
    assert store.claim("1.2.0", generation=1, owner="task-a", lease_seconds=30)
    jobs = claim_more(store, settings, owner="task-a", want=3, exclude=["1.2.0"])
    assert [j.study_instance_uid for j in jobs] == ["1.2.1", "1.2.2", "1.2.3"]
    for job in jobs:
        assert job.generation == 1
        (inst,) = job.instances
        assert inst.path == f"/spool/{job.study_instance_uid}.1.1.dcm"
        view = store.get(job.study_instance_uid)
        assert view is not None and view.state == "processing" and view.attempts == 1
    # the claimed studies' own messages are stale; another worker gets only what is left
    assert not store.claim("1.2.1", generation=1, owner="task-b", lease_seconds=30)
    rest = claim_more(store, settings, owner="task-b", want=3, exclude=[])
    assert [j.study_instance_uid for j in rest] == ["1.2.4"]
    assert claim_more(store, settings, owner="task-c", want=3, exclude=[]) == []


def test_claim_more_skips_studies_out_of_attempts(store: StudyStore) -> None:
    settings = _settings(D2R_BATCH_WAIT_MS="0", D2R_MAX_ATTEMPTS="1")
    assert store.claim("1.2.0", generation=1, owner="task-a", lease_seconds=30)
    state = store.record_failed_attempt(
        "1.2.0", owner="task-a", stage="predict", reason="predict: boom", max_attempts=2
    )
    assert state == "queued"  # attempts 1, queued again
    jobs = claim_more(store, settings, owner="task-b", want=8, exclude=[])
    assert "1.2.0" not in {j.study_instance_uid for j in jobs}


def test_one_heartbeat_renews_every_claim_of_the_batch(store: StudyStore) -> None:
    settings = WorkerSettings.from_env(
        {"D2R_CLAIM_LEASE_SECONDS": "30", "D2R_CLAIM_HEARTBEAT_SECONDS": "0.05"}
    )
    uids = ["1.2.0", "1.2.1", "1.2.2"]
    for uid in uids:
        assert store.claim(uid, generation=1, owner="task-a", lease_seconds=1)
    stages = {uid: StageTracker() for uid in uids}
    stages["1.2.2"].enter(Stage.PREDICT)
    store.mark_failed("1.2.1", "cannot decode the image: test", owner="task-a")

    def leases() -> dict[str, float | None]:
        c = studies_table.c
        with store.engine.connect() as conn:
            rows = conn.execute(sa.select(c.study_instance_uid, c.lease_expires_at)).all()
        return {r.study_instance_uid: r.lease_expires_at for r in rows}

    before = leases()
    with BatchHeartbeat(store, "task-a", settings, stages):
        wait_for(
            lambda: all((leases()[u] or 0.0) > (before[u] or 0.0) + 20 for u in ("1.2.0", "1.2.2")),
            10,
            "every held claim renewed",
            interval=0.05,
        )
    assert leases()["1.2.1"] is None  # no longer this owner's: never renewed
    view = store.get("1.2.2")
    assert view is not None and view.stage == "predict" and view.state == "processing"
