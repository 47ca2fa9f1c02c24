"""Two active nodes behind HAProxy lose nothing under faults, on real processes.

HAProxy (TCP, round robin, connect checks every 500 ms) in front of ``d2r node`` x 2 sharing
one PostgreSQL study database and one spool, a Redis broker (a Sentinel-managed pair in the
failover test), one ``d2r worker`` and Orthanc as the PACS. Four senders go through HAProxy and
retry like a PACS (1-2 s apart, for up to a minute); half the studies have a second image on a
second association, which HAProxy may send to the other node. A fault hits while they send.

Every scenario asserts the same thing: every instance answered Success is recorded, every study
with an acknowledged instance ends ``done`` with exactly one set of SRs in Orthanc (as many SR
instances and series as a warm-up study got, one ``reported`` event), and no sender gives up.
``tests/reliability/ha.py`` runs the scenario and prints its table; ``bench/ha/run.py`` is the
same run as a benchmark.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.ha import (
    FAILOVER_REDIS,
    KILL_NODE_A,
    RESTART_POSTGRES,
    HaConfig,
    HaResult,
    HaStack,
    run_scenario,
)
from tests.support.haproxy import find_haproxy
from tests.support.postgres import postgres_bindir

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def ha(orthanc_factory: Any, model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., HaStack]]:
    # HAProxy and PostgreSQL are Debian packages scripts/bootstrap.sh installs for the tests
    assert find_haproxy() is not None, "HAProxy is not installed (Debian package 'haproxy')"
    assert postgres_bindir() is not None, "PostgreSQL is not installed (Debian 'postgresql')"
    stacks: list[HaStack] = []

    def start(*, sentinel: bool = False, **env: str) -> HaStack:
        stack = HaStack(
            tmp_path / f"ha{len(stacks)}", model_dir, orthanc_factory, sentinel=sentinel, env=env
        )
        stacks.append(stack)
        return stack.start()

    yield start
    for stack in stacks:
        stack.stop()


def _explain(result: HaResult) -> str:
    return f"\n{result.table()}\n{result.problems()}"


def assert_nothing_lost(result: HaResult) -> None:
    print(result.table())
    if result.diagnostics:  # the processes' log tails, shown with the failure
        print(result.diagnostics)
    assert all(f.error is None for f in result.faults), [f.error for f in result.faults]
    fault = result.fault_at
    if result.config.faults:
        assert fault is not None
        acks = [i.acknowledged_at for i in result.instances if i.acknowledged_at is not None]
        # the fault hit while the senders were sending, not before or after
        assert any(a < fault for a in acks) and any(a > fault for a in acks), _explain(result)
    assert result.expected_sr_instances >= 1
    assert not result.unacknowledged, "a sender gave up" + _explain(result)
    assert not result.unrecorded, "acknowledged but never recorded" + _explain(result)
    assert not result.stuck, "acknowledged but never finished" + _explain(result)
    assert not result.duplicates, "more than one set of SRs" + _explain(result)
    assert not result.not_exactly_once, "not done exactly once" + _explain(result)


def test_node_a_killed_mid_send_loses_nothing(ha: Callable[..., HaStack]) -> None:
    stack = ha()
    result = run_scenario(
        stack,
        HaConfig(name="kill -9 node-a", studies=100, send_seconds=30, faults=(KILL_NODE_A,)),
    )
    assert_nothing_lost(result)
    killed = result.kill_time()
    assert killed is not None
    # the studies node A alone had acknowledged were completed without it, exactly once
    held = result.fully_received_by("node-a", killed)
    assert held, "node-a held no complete study when it died" + _explain(result)
    assert not {s.study_uid for s in held} & set(result.not_exactly_once), _explain(result)
    # the database agrees with HAProxy on who received them
    assert {i.recorded_node for s in held for i in s.instances} == {"node-a"}, _explain(result)
    # the survivor took over: HAProxy marked node-a down and node-b acknowledged afterwards
    assert result.probe is not None and result.probe.first_accepted_after is not None
    assert result.probe.first_accepted_after < 5.0, _explain(result)
    assert result.probe.marked_down_after is not None, _explain(result)
    after = [
        a.server
        for i in result.instances
        for a in i.attempts
        if a.at > killed and a.status is not None and i.acknowledged_at == a.ended
    ]
    assert after and set(after) == {"node-b"}, _explain(result)


@pytest.mark.parametrize("down", [3.0, 9.0], ids=["down3s", "down9s"])
def test_postgres_restart_mid_send_loses_nothing(ha: Callable[..., HaStack], down: float) -> None:
    """Down 3 s: the receivers wait for the database (D2R_DB_INGEST_WAIT_SECONDS, 5 s). Down
    9 s: they refuse with Processing Failure, the senders send again, and what the spool kept
    of a refused instance is recorded then, never answered as a duplicate."""
    stack = ha()
    result = run_scenario(
        stack,
        HaConfig(
            name=f"PostgreSQL restart ({down:g} s down)",
            studies=60,
            send_seconds=24,
            fault_after=10,
            faults=(RESTART_POSTGRES,),
            postgres_down_seconds=down,
            settle_timeout=150,
        ),
    )
    assert_nothing_lost(result)
    (restart,) = result.faults
    assert restart.seconds >= down
    # associations were open while it was down: the outage hit the ingest, not a quiet moment
    assert result.attempts_overlapping(restart.at, restart.at + restart.seconds), _explain(result)
    refused = [
        a
        for i in result.instances
        for a in i.attempts
        if a.status is not None and a.status == 0x0110
    ]
    if down > 5.0:  # longer than the receivers wait: some stores were refused, then retried
        assert refused, _explain(result)


def test_redis_sentinel_failover_mid_send_loses_nothing(ha: Callable[..., HaStack]) -> None:
    stack = ha(sentinel=True)
    result = run_scenario(
        stack,
        HaConfig(
            name="Redis Sentinel failover",
            studies=60,
            send_seconds=24,
            fault_after=10,
            faults=(FAILOVER_REDIS,),
            settle_timeout=150,
        ),
    )
    assert_nothing_lost(result)
    (failover,) = result.faults
    assert failover.seconds > 0


@pytest.mark.parametrize("offset", [0.3, 0.5, 0.7], ids=lambda o: f"at{int(o * 100)}pct")
def test_node_kill_and_postgres_restart_together_lose_nothing(
    ha: Callable[..., HaStack], offset: float
) -> None:
    stack = ha()
    send_seconds = 20.0
    result = run_scenario(
        stack,
        HaConfig(
            name=f"kill -9 node-a + PostgreSQL restart at {offset:.0%}",
            studies=40,
            send_seconds=send_seconds,
            fault_after=send_seconds * offset,
            faults=(KILL_NODE_A, RESTART_POSTGRES),
            postgres_down_seconds=3.0,
            postgres_stop_mode="kill" if offset > 0.5 else "fast",
            seed=int(offset * 100),
            settle_timeout=150,
        ),
    )
    assert_nothing_lost(result)
