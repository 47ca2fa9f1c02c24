"""The HA scenario's verdicts (``tests.reliability.ha.HaResult``) on hand-made outcomes: each way
of losing a study is caught, so the assertions of ``test_ha.py`` can fail."""

from __future__ import annotations

from tests.reliability.ha import (
    KILL_NODE_A,
    Attempt,
    FaultRecord,
    HaConfig,
    HaResult,
    InstanceOutcome,
    StudyOutcome,
)

T0 = 1_000_000.0


def _instance(
    uid: str, k: int, *, acked: float | None, recorded: bool, server: str
) -> InstanceOutcome:
    status = None if acked is None else 0
    attempt = Attempt(T0 + 1, status, 40000 + k, "", ended=acked or T0 + 2, server=server)
    return InstanceOutcome(f"{uid}.{k}", uid, k, [attempt], acked, recorded)


def _study(
    uid: str,
    *,
    state: str | None = "done",
    sr: tuple[int, int] = (2, 2),
    reported: int = 1,
    acked: float | None = T0 + 2,
    recorded: bool = True,
    server: str = "node-a",
) -> StudyOutcome:
    instance = _instance(uid, 0, acked=acked, recorded=recorded, server=server)
    study = StudyOutcome(uid, [instance], state=state, reported_events=reported)
    study.sr_instances, study.sr_series = sr
    study.finished_at = None if state != "done" or acked is None else acked + 3
    return study


def _result(*studies: StudyOutcome) -> HaResult:
    return HaResult(
        config=HaConfig(name="unit", faults=(KILL_NODE_A,)),
        started_at=T0,
        sending_seconds=10,
        settle_seconds=1,
        expected_sr_instances=2,
        expected_sr_series=2,
        studies=list(studies),
        faults=[FaultRecord(KILL_NODE_A, T0 + 5)],
        probe=None,
        node_column="received_by",
        connections=len(studies),
        redispatched=0,
        settled=True,
    )


def test_a_clean_run_has_no_verdict() -> None:
    result = _result(_study("1.1"), _study("1.2", server="node-b"))
    assert not (result.unacknowledged or result.unrecorded or result.stuck)
    assert not (result.duplicates or result.not_exactly_once or result.missing_sr)
    assert [s.study_uid for s in result.fully_received_by("node-a", T0 + 5)] == ["1.1"]
    assert "| all | 2 | 2 | 2 |" in result.table()


def test_each_kind_of_loss_is_caught() -> None:
    result = _result(
        _study("2.1", acked=None, state=None, sr=(0, 0), reported=0),  # the sender gave up
        _study("2.2", recorded=False, state=None, sr=(0, 0), reported=0),  # acked, not recorded
        _study("2.3", state="queued", sr=(0, 0), reported=0),  # never finished
        _study("2.4", sr=(4, 4), reported=2),  # two report generations
        _study("2.5", sr=(1, 1)),  # done, one SR missing in the PACS
        _study("2.6", state="skipped", sr=(0, 0), reported=0),  # its first image lost
    )
    assert result.unacknowledged == ["2.1"]
    assert result.unrecorded == ["2.2.0"]
    assert result.stuck == ["2.2", "2.3"]
    assert result.duplicates == ["2.4"]
    assert result.missing_sr == ["2.5"]
    assert result.not_exactly_once == ["2.2", "2.3", "2.4", "2.5", "2.6"]
    row = result.rows()[-1]
    assert (row["acknowledged"], row["done"], row["skipped"], row["stuck"]) == (5, 2, 1, 2)
    assert (row["unrecorded instances"], row["duplicates"]) == (1, 1)
    assert "2.4" in result.problems()
