"""Two active ``d2r node`` processes behind HAProxy, under faults: a scenario runner shared by
``tests/reliability/test_ha.py`` and ``bench/ha/run.py``.

Topology, every process real and on loopback: HAProxy (TCP mode, round robin, connect checks)
in front of ``node-a`` and ``node-b`` (their own DICOM and HTTP ports, one PostgreSQL study
database and one spool folder between them), one Redis (or a Sentinel-managed pair) as the
broker, one ``d2r worker`` and Orthanc as the PACS the SRs go to.

:func:`run_scenario` sends studies through HAProxy from concurrent senders that behave like a
PACS forwarding queue (a refused or aborted association, or a failure status, is retried after
1-2 s for up to a minute), injects faults at a chosen moment while they send (``kill -9`` of
node A's process group, a PostgreSQL restart on the same port, a Redis Sentinel failover, or
several at once), waits until every acknowledged study is finished, and then compares what the
senders saw acknowledged with the study database and with Orthanc. The :class:`HaResult` holds
the evidence per instance and per study; :meth:`HaResult.table` prints it.

"Nothing lost" means: every instance answered Success is recorded in the study database, every
study with an acknowledged instance ends ``done``, and Orthanc holds exactly one set of SRs for
it (as many SR instances and series as the warm-up study got, one ``reported`` event). The SRs'
UIDs derive from the study and the model, so a second report generation would replace the first
in Orthanc under the same UIDs: the study database's ``reported`` events are what tell two
generations apart.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.reliability.stack import stack_env
from tests.support.dicom_files import make_dx
from tests.support.haproxy import Backend, Connection, HaProxy
from tests.support.orthanc import OrthancServer
from tests.support.postgres import PostgresServer
from tests.support.processes import Process, d2r_cmd, free_port, run_d2r, start_redis, wait_for

KILL_NODE_A = "kill-node-a"
RESTART_POSTGRES = "restart-postgres"
FAILOVER_REDIS = "failover-redis"
FAULTS = (KILL_NODE_A, RESTART_POSTGRES, FAILOVER_REDIS)
FINAL_STATES = frozenset({"done", "failed", "skipped"})
NODE_NAMES = ("node-a", "node-b")

OrthancFactory = Callable[..., OrthancServer]


def ha_env(model_dir: Path, tmp: Path, **overrides: str) -> dict[str, str]:
    """The settings both nodes and the worker share (:func:`stack_env`'s, plus study timers
    that let a study's second association arrive before it completes)."""
    env = stack_env(
        model_dir,
        tmp,
        D2R_STUDY_QUIET_SECONDS="3",
        D2R_STUDY_FORCE_SECONDS="60",
        D2R_SEND_RETRY_DELAY="1",
        D2R_LOG_LEVEL="INFO",
    )
    env.update(overrides)
    return env


# ------------------------------------------------------------------------------- topology
@dataclass
class NodeProcess:
    name: str
    port: int
    http_port: int
    env: dict[str, str]
    process: Process | None = None
    killed_at: float | None = None


class HaStack:
    """PostgreSQL, the broker, Orthanc, the nodes, a worker and HAProxy in ``tmp``.

    ``sentinel=True`` uses ``tests.support.redis_sentinel.redis_sentinel_cluster`` as the broker
    instead of one Redis. ``env`` overrides the shared settings (:func:`ha_env`).
    """

    def __init__(
        self,
        tmp: Path,
        model_dir: Path,
        orthanc_factory: OrthancFactory,
        *,
        sentinel: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.model_dir = model_dir
        self.orthanc_factory = orthanc_factory
        self.sentinel_wanted = sentinel
        self.overrides = dict(env or {})
        self.exits = contextlib.ExitStack()
        self.postgres: PostgresServer | None = None
        self.redis: Process | None = None
        self.sentinel: Any = None
        self.orthanc: OrthancServer | None = None
        self.env: dict[str, str] = {}
        self.nodes: dict[str, NodeProcess] = {}
        self.workers: list[Process] = []
        self.proxy: HaProxy | None = None
        self._proxies = 0
        self._engine: sa.engine.Engine | None = None

    # -- life cycle ----------------------------------------------------------------------
    def start(
        self, nodes: Sequence[str] = NODE_NAMES, *, workers: int = 1, ready_timeout: float = 120
    ) -> HaStack:
        """Start everything; the nodes named in ``nodes`` and HAProxy in front of them."""
        try:
            self._start(nodes, workers, ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, nodes: Sequence[str], workers: int, ready_timeout: float) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.postgres = PostgresServer()  # its own folder: the 'postgres' user must reach it
        self.exits.callback(self.postgres.close)
        self.postgres.start()
        broker: dict[str, str]
        if self.sentinel_wanted:
            from tests.support.redis_sentinel import (  # type: ignore[import-not-found,unused-ignore]
                redis_sentinel_cluster,
            )

            (self.tmp / "sentinel").mkdir(exist_ok=True)
            self.sentinel = self.exits.enter_context(
                redis_sentinel_cluster(self.tmp / "sentinel", master_name="d2r")
            )
            broker = dict(self.sentinel.env())
        else:
            (self.tmp / "redis").mkdir(exist_ok=True)
            self.redis, url = start_redis(self.tmp / "redis")
            self.exits.callback(self.redis.stop)
            broker = {"D2R_BROKER_URL": url}
        self.orthanc = self.orthanc_factory(dicom_port=free_port())
        self.env = ha_env(
            self.model_dir,
            self.tmp,
            D2R_DATABASE_URL=self.postgres.url,
            D2R_DESTINATIONS=f"{self.orthanc.aet}@127.0.0.1:{self.orthanc.dicom_port}",
            **broker,
        )
        self.env.update(self.overrides)
        # as an operator does before starting a second node: migrate once, then start both
        upgraded = run_d2r("db", "upgrade", env=self.env)
        if upgraded.returncode != 0:
            raise RuntimeError(f"d2r db upgrade failed: {upgraded.stderr[-2000:]}")
        self.exits.callback(self._stop_processes)
        for name in nodes:
            self.start_node(name, wait=False)
        for name in nodes:
            self.wait_node_ready(name, ready_timeout)
        for _ in range(workers):
            self.start_worker()
        self.start_proxy(nodes)

    def node_env(self, name: str) -> dict[str, str]:
        node = self.nodes.get(name)
        port = node.port if node else free_port()
        http_port = node.http_port if node else free_port()
        data = self.tmp / "data"
        return {
            **self.env,
            "D2R_PORT": str(port),
            "D2R_HTTP_PORT": str(http_port),
            "D2R_HTTP_HOST": "127.0.0.1",
            "D2R_NODE_NAME": name,
            "D2R_AUDIT_LOG": str(data / f"audit-{name}.jsonl"),
        }

    def start_node(self, name: str, *, wait: bool = True, timeout: float = 120) -> NodeProcess:
        env = self.node_env(name)
        node = NodeProcess(name, int(env["D2R_PORT"]), int(env["D2R_HTTP_PORT"]), env)
        node.process = Process(d2r_cmd("node"), env=env, log=self.tmp / f"{name}.log")
        self.nodes[name] = node
        if wait:
            self.wait_node_ready(name, timeout)
        return node

    def wait_node_ready(self, name: str, timeout: float = 120) -> None:
        node = self.nodes[name]
        url = f"http://127.0.0.1:{node.http_port}/readyz"

        def ready() -> bool:
            if node.process is None or not node.process.alive():
                raise RuntimeError(f"{name} exited:\n{self.log_tail(name)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - loopback
                    return bool(answer.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        try:
            wait_for(ready, timeout, f"{name} ready ({url})", interval=0.2)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{self.log_tail(name)}") from None

    def start_worker(self, **env: str) -> Process:
        n = len(self.workers)
        worker = Process(
            d2r_cmd("worker", f"--hostname=w{n}@%h"),
            env={**self.env, **env},
            log=self.tmp / f"worker{n}.log",
        )
        self.workers.append(worker)
        return worker

    def start_proxy(self, nodes: Sequence[str], **config: Any) -> HaProxy:
        """(Re)start HAProxy, on a new port, in front of ``nodes``."""
        if self.proxy is not None:
            self.proxy.stop()
        self._proxies += 1
        self.proxy = HaProxy(
            [Backend(n, self.nodes[n].port) for n in nodes],
            workdir=self.tmp,
            name=f"haproxy{self._proxies}",
            **config,
        )
        self.proxy.wait_servers_up()
        return self.proxy

    def kill_node(self, name: str) -> float:
        """SIGKILL the node's whole process group (its listener processes too); the time."""
        node = self.nodes[name]
        assert node.process is not None
        node.killed_at = time.time()
        node.process.kill9()
        return node.killed_at

    def stop_node(self, name: str) -> None:
        node = self.nodes[name]
        if node.process is not None:
            node.process.stop()

    def _stop_processes(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for node in self.nodes.values():
            if node.process is not None:
                node.process.stop()
        for worker in self.workers:
            worker.stop()
        if self._engine is not None:
            self._engine.dispose()

    def stop(self) -> None:
        self.exits.close()

    def __enter__(self) -> HaStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observation ---------------------------------------------------------------------
    def log_tail(self, name: str, chars: int = 4000) -> str:
        if name in self.nodes and self.nodes[name].process is not None:
            return self.nodes[name].process.log_tail(chars)  # type: ignore[union-attr]
        if name.startswith("worker"):
            return self.workers[int(name[6:] or 0)].log_tail(chars)
        return ""

    def logs(self, chars: int = 3000) -> str:
        parts = [f"--- {n}\n{self.log_tail(n, chars)}" for n in self.nodes]
        parts += [f"--- worker{k}\n{w.log_tail(chars)}" for k, w in enumerate(self.workers)]
        if self.proxy is not None:
            parts.append(f"--- haproxy\n{self.proxy.process.log_tail(chars)}")
        return "\n".join(parts)

    @property
    def engine(self) -> sa.engine.Engine:
        if self._engine is None:
            assert self.postgres is not None
            self._engine = sa.create_engine(self.postgres.url, pool_pre_ping=True)
        return self._engine

    def query(self, sql: str, retry_for: float = 60.0, **params: Any) -> list[Any]:
        """Rows of ``sql`` on the study database, retried while it is unreachable."""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                with self.engine.connect() as conn:
                    stmt = sa.text(sql)
                    for name, value in params.items():
                        if isinstance(value, (list, tuple)):
                            stmt = stmt.bindparams(sa.bindparam(name, expanding=True))
                    return list(conn.execute(stmt, params).all())
            except sa.exc.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def states(self, study_uids: Sequence[str]) -> dict[str, str]:
        if not study_uids:
            return {}
        rows = self.query(
            "SELECT study_instance_uid, state FROM studies WHERE study_instance_uid IN :uids",
            uids=list(study_uids),
        )
        return {str(r[0]): str(r[1]) for r in rows}

    def sr_sets(self) -> dict[str, tuple[int, int]]:
        """Study UID -> (SR instances, SR series) in Orthanc."""
        assert self.orthanc is not None
        studies = {
            s["ID"]: s["MainDicomTags"].get("StudyInstanceUID") for s in self._get_all("/studies")
        }
        out: dict[str, tuple[int, int]] = {}
        for series in self._get_all("/series"):
            if series.get("MainDicomTags", {}).get("Modality") != "SR":
                continue
            uid = studies.get(series.get("ParentStudy"))
            if uid is None:
                continue
            instances, count = out.get(uid, (0, 0))
            out[uid] = (instances + len(series.get("Instances", [])), count + 1)
        return out

    def _get_all(self, path: str) -> list[dict[str, Any]]:
        assert self.orthanc is not None
        got: list[dict[str, Any]] = self.orthanc.get(f"{path}?expand", timeout=120)
        return got


# ------------------------------------------------------------------------------- senders
@dataclass
class Attempt:
    at: float  # time.time() when the association was requested
    status: int | None  # the C-STORE response status, None when there was none
    local_port: int | None
    detail: str
    ended: float = 0.0
    server: str | None = None  # from HAProxy's log


@dataclass
class InstanceOutcome:
    sop_uid: str
    study_uid: str
    index: int  # 0: the study's first image, 1: its second (on a second association)
    attempts: list[Attempt] = field(default_factory=list)
    acknowledged_at: float | None = None
    recorded: bool = False
    recorded_node: str | None = None  # the database's node column, where there is one

    @property
    def acknowledged(self) -> bool:
        return self.acknowledged_at is not None

    @property
    def retries(self) -> int:
        return max(0, len(self.attempts) - 1)

    @property
    def server(self) -> str | None:
        """The node that answered Success (through HAProxy), if known."""
        for attempt in reversed(self.attempts):
            if attempt.status is not None and _accepted(attempt.status):
                return attempt.server
        return None


@dataclass
class StudyOutcome:
    study_uid: str
    instances: list[InstanceOutcome]
    state: str | None = None
    reason: str | None = None
    generation: int = 0
    finished_at: float | None = None
    reported_events: int = 0
    sr_instances: int = 0
    sr_series: int = 0
    queued_at: list[float] = field(default_factory=list)  # every 'queued' event
    phase: str = "before"  # "before", or "after" (sent across or after the fault)

    @property
    def acknowledged(self) -> bool:
        return any(i.acknowledged for i in self.instances)

    @property
    def last_ack(self) -> float | None:
        acks = [i.acknowledged_at for i in self.instances if i.acknowledged_at is not None]
        return max(acks) if acks else None

    @property
    def first_attempt(self) -> float:
        return min(a.at for i in self.instances for a in i.attempts)

    @property
    def seconds_to_sr(self) -> float | None:
        if self.finished_at is None or self.last_ack is None or self.state != "done":
            return None
        return self.finished_at - self.last_ack

    def servers(self) -> set[str | None]:
        return {i.server for i in self.instances if i.acknowledged}


def _accepted(status: int) -> bool:
    """Success, or a storage warning (the SCP kept the instance)."""
    return status == 0x0000 or status == 0x0001 or (status & 0xF000) == 0xB000


def store_once(address: tuple[str, int], ds: Dataset, *, aet: str = "MODALITY") -> Attempt:
    """One C-STORE of ``ds`` on a new association; never raises."""
    ae = AE(ae_title=aet)
    ae.acse_timeout = 15
    ae.dimse_timeout = ae.network_timeout = 90
    ae.add_requested_context(ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID))
    ports: list[int] = []

    def opened(event: evt.Event) -> None:
        with contextlib.suppress(Exception):
            ports.append(int(event.assoc.dul.socket.socket.getsockname()[1]))  # type: ignore[union-attr]

    attempt = Attempt(at=time.time(), status=None, local_port=None, detail="")
    try:
        assoc = ae.associate(
            address[0], address[1], ae_title="D2R", evt_handlers=[(evt.EVT_CONN_OPEN, opened)]
        )
        if not assoc.is_established:
            attempt.detail = "rejected" if assoc.is_rejected else "aborted or refused"
        else:
            try:
                response = assoc.send_c_store(ds)
                if "Status" in response:
                    attempt.status = int(response.Status)
                    attempt.detail = f"status 0x{attempt.status:04X}"
                else:
                    attempt.detail = "no response (aborted or timed out)"
            finally:
                if assoc.is_established:
                    assoc.release()
    except Exception as exc:  # noqa: BLE001 - the sender only trusts what it saw acknowledged
        attempt.detail = f"{type(exc).__name__}: {exc}"
    attempt.local_port = ports[0] if ports else None
    attempt.ended = time.time()
    return attempt


def echo_once(address: tuple[str, int], *, timeout: float = 2.0) -> bool:
    """Whether a C-ECHO through ``address`` got Success."""
    ae = AE(ae_title="PROBE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    try:
        assoc = ae.associate(address[0], address[1], ae_title="D2R")
        if not assoc.is_established:
            return False
        try:
            response = assoc.send_c_echo()
            return "Status" in response and int(response.Status) == 0
        finally:
            if assoc.is_established:
                assoc.release()
    except Exception:  # noqa: BLE001
        return False


@dataclass
class StudyPlan:
    study_uid: str
    images: list[Dataset]


def plan_studies(
    n: int, *, seed: int, rows: int, cols: int, second_every: int = 2
) -> list[StudyPlan]:
    """``n`` one-image studies; every ``second_every``-th one has a second image."""
    plans = []
    for k in range(n):
        first = make_dx(None, rows=rows, cols=cols, seed=seed * 100000 + 2 * k)
        images = [first]
        if second_every and k % second_every == 0:
            images.append(
                make_dx(
                    None,
                    study_uid=str(first.StudyInstanceUID),
                    rows=rows,
                    cols=cols,
                    view_position="LL",
                    seed=seed * 100000 + 2 * k + 1,
                )
            )
        plans.append(StudyPlan(str(first.StudyInstanceUID), images))
    return plans


# ------------------------------------------------------------------------------- the run
@dataclass
class HaConfig:
    """One scenario. Times in seconds; ``fault_after`` counts from the start of sending."""

    name: str = "ha"
    studies: int = 100
    senders: int = 4
    second_every: int = 2  # every 2nd study has a second image, on a second association
    second_image_delay: float = 0.3
    send_seconds: float = 30.0  # the sending is paced over this long (0: as fast as possible)
    rows: int = 128
    cols: int = 128
    faults: tuple[str, ...] = ()
    fault_after: float | None = None  # default: 40 % of send_seconds
    postgres_down_seconds: float = 3.0
    postgres_stop_mode: str = "fast"  # fast, immediate or kill
    retry_delay: tuple[float, float] = (1.0, 2.0)
    retry_for: float = 60.0
    settle_timeout: float = 180.0
    # stop waiting early once only studies absent from the database are left, this long
    # (longer than the reconciler's period, in case it recovers them)
    absent_grace: float = 45.0
    probe_after_kill: bool = True
    probe_seconds: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")


@dataclass
class FaultRecord:
    name: str
    at: float  # time.time() when it began
    seconds: float = 0.0  # how long it lasted (PostgreSQL unreachable, failover), 0 for a kill
    error: str | None = None


@dataclass
class ProbeResult:
    """C-ECHO through HAProxy every ~100 ms after node A's kill."""

    first_accepted_after: float | None  # seconds from the kill to the first Success
    probes: int
    failed: int
    marked_down_after: float | None  # seconds from the kill to HAProxy's "node-a is DOWN"


@dataclass(repr=False)
class HaResult:
    config: HaConfig
    started_at: float  # time.time() when sending began
    sending_seconds: float
    settle_seconds: float
    expected_sr_instances: int
    expected_sr_series: int
    studies: list[StudyOutcome]
    faults: list[FaultRecord]
    probe: ProbeResult | None
    node_column: str | None
    connections: int  # associations HAProxy logged
    redispatched: int  # of which HAProxy redispatched to another node
    settled: bool
    diagnostics: str = ""

    def __repr__(self) -> str:
        return (
            f"HaResult({self.config.name!r}: {len(self.studies)} studies, "
            f"{len(self.acknowledged_studies())} acknowledged, {len(self.in_state('done'))} done)"
        )

    # -- selections -----------------------------------------------------------------------
    @property
    def expected_sr(self) -> tuple[int, int]:
        return (self.expected_sr_instances, self.expected_sr_series)

    @property
    def fault_at(self) -> float | None:
        return min((f.at for f in self.faults), default=None)

    @property
    def instances(self) -> list[InstanceOutcome]:
        return [i for s in self.studies for i in s.instances]

    @property
    def unacknowledged(self) -> list[str]:
        """Studies no instance of which was ever acknowledged (the sender gave up)."""
        return [s.study_uid for s in self.studies if not s.acknowledged]

    @property
    def unrecorded(self) -> list[str]:
        """Instances answered Success that the study database does not hold: lost."""
        return [i.sop_uid for i in self.instances if i.acknowledged and not i.recorded]

    def acknowledged_studies(self) -> list[StudyOutcome]:
        return [s for s in self.studies if s.acknowledged]

    def in_state(self, state: str) -> list[str]:
        return [s.study_uid for s in self.acknowledged_studies() if s.state == state]

    @property
    def stuck(self) -> list[str]:
        """Acknowledged studies not finished (or not even in the database) when waiting ended."""
        return [s.study_uid for s in self.acknowledged_studies() if s.state not in FINAL_STATES]

    @property
    def duplicates(self) -> list[str]:
        """Studies with more than one set of SRs (in Orthanc, or ``reported`` more than once)."""
        return [
            s.study_uid
            for s in self.studies
            if s.sr_instances > self.expected_sr_instances
            or s.sr_series > self.expected_sr_series
            or s.reported_events > 1
        ]

    @property
    def missing_sr(self) -> list[str]:
        """Done studies whose SRs are not all in Orthanc."""
        return [
            s.study_uid
            for s in self.studies
            if s.state == "done" and s.sr_instances < self.expected_sr_instances
        ]

    @property
    def not_exactly_once(self) -> list[str]:
        """Acknowledged studies that did not end ``done`` with exactly one set of SRs."""
        return [
            s.study_uid
            for s in self.acknowledged_studies()
            if not (
                s.state == "done"
                and s.sr_instances == self.expected_sr_instances
                and s.sr_series == self.expected_sr_series
                and s.reported_events == 1
            )
        ]

    def fully_received_by(self, server: str, before: float) -> list[StudyOutcome]:
        """Studies every instance of which ``server`` acknowledged (per HAProxy) before
        ``before``: what that node alone held when it died."""
        return [
            s
            for s in self.studies
            if s.instances
            and all(
                i.acknowledged_at is not None and i.acknowledged_at < before and i.server == server
                for i in s.instances
            )
        ]

    def attempts_overlapping(self, start: float, end: float) -> list[Attempt]:
        """Associations that were open at some moment between ``start`` and ``end``."""
        return [a for i in self.instances for a in i.attempts if a.at <= end and a.ended >= start]

    def kill_time(self) -> float | None:
        return next((f.at for f in self.faults if f.name == KILL_NODE_A), None)

    # -- numbers --------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One row per phase (before / after the fault, then all), as printed by :meth:`table`."""
        groups: list[tuple[str, list[StudyOutcome]]] = []
        if self.faults:
            groups.append(("before fault", [s for s in self.studies if s.phase == "before"]))
            groups.append(("across/after fault", [s for s in self.studies if s.phase == "after"]))
        groups.append(("all", self.studies))
        out = []
        for label, studies in groups:
            acked = [s for s in studies if s.acknowledged]
            times = [t for s in acked if (t := s.seconds_to_sr) is not None]
            dup = set(self.duplicates)
            out.append(
                {
                    "phase": label,
                    "sent": len(studies),
                    "acknowledged": len(acked),
                    "done": sum(s.state == "done" for s in acked),
                    "failed": sum(s.state == "failed" for s in acked),
                    "skipped": sum(s.state == "skipped" for s in acked),
                    "stuck": sum(s.state not in FINAL_STATES for s in acked),
                    "unrecorded instances": sum(
                        i.acknowledged and not i.recorded for s in studies for i in s.instances
                    ),
                    "duplicates": sum(s.study_uid in dup for s in studies),
                    "p50 s to SR": _pct(times, 50),
                    "p95 s to SR": _pct(times, 95),
                }
            )
        return out

    def throughput(self) -> dict[str, float]:
        """Studies acknowledged and done per second, from the start of sending."""
        acks = [t for s in self.studies if (t := s.last_ack) is not None]
        done = [s.finished_at for s in self.studies if s.state == "done" and s.finished_at]
        ack_span = max(acks) - self.started_at if acks else 0.0
        done_span = max(done) - self.started_at if done else 0.0
        return {
            "acknowledged/s": round(len(acks) / ack_span, 2) if ack_span > 0 else 0.0,
            "done/s": round(len(done) / done_span, 2) if done_span > 0 else 0.0,
            "acknowledge seconds": round(ack_span, 1),
            "done seconds": round(done_span, 1),
        }

    def per_server(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for i in self.instances:
            if i.acknowledged:
                key = i.server or "unknown"
                counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def per_recorded_node(self) -> dict[str, int] | None:
        if self.node_column is None:
            return None
        counts: dict[str, int] = {}
        for i in self.instances:
            if i.recorded:
                key = i.recorded_node or "(empty)"
                counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def table(self) -> str:
        rows = self.rows()
        head = list(rows[0])
        lines = [
            f"### {self.config.name}: faults {', '.join(self.config.faults) or 'none'}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        lines += ["| " + " | ".join(_fmt(r[h]) for h in head) + " |" for r in rows]
        sent = sum(len(i.attempts) for i in self.instances)
        acked = sum(i.acknowledged for i in self.instances)
        retried = sum(i.retries for i in self.instances)
        lines += [
            "",
            f"- instances: {len(self.instances)} planned, {sent} C-STORE associations, "
            f"{acked} acknowledged, {retried} retries; HAProxy logged {self.connections} "
            f"connections ({self.redispatched} redispatched)",
            f"- acknowledged by (HAProxy log): {json.dumps(self.per_server())}",
        ]
        recorded = self.per_recorded_node()
        lines.append(
            f"- recorded by (instances.{self.node_column}): {json.dumps(recorded)}"
            if recorded is not None
            else "- recorded by: the study database has no node column"
        )
        lines.append(
            f"- SR set expected per study: {self.expected_sr_instances} instance(s) in "
            f"{self.expected_sr_series} series (the warm-up study's)"
        )
        for f in self.faults:
            extra = f" (lasted {f.seconds:.1f} s)" if f.seconds else ""
            error = f" ERROR {f.error}" if f.error else ""
            hit = self.attempts_overlapping(f.at, f.at + max(f.seconds, 0.5))
            lines.append(
                f"- fault {f.name} at {f.at - self.started_at:.1f} s{extra}{error}; "
                f"{len(hit)} association(s) open during it, "
                f"{sum(a.status is not None and _accepted(a.status) for a in hit)} of them "
                f"acknowledged"
            )
        durations = [a.ended - a.at for i in self.instances for a in i.attempts]
        if durations:
            lines.append(
                f"- C-STORE association (associate, store, release): p50 "
                f"{_fmt(_pct(durations, 50))} s, max {_fmt(max(durations))} s"
            )
        if self.probe is not None:
            p = self.probe
            lines.append(
                "- after the kill: first association accepted through HAProxy "
                f"{_fmt(p.first_accepted_after)} s, HAProxy marked node-a down "
                f"{_fmt(p.marked_down_after)} s; {p.failed} of {p.probes} C-ECHO probes failed"
            )
        kill = self.kill_time()
        if kill is not None:
            held = self.fully_received_by("node-a", kill)
            lines.append(
                f"- studies node-a alone had acknowledged before its kill: {len(held)}, done "
                f"exactly once {sum(s.study_uid not in self.not_exactly_once for s in held)}, "
                f"queued after the kill (by the survivor) "
                f"{sum(any(q > kill for q in s.queued_at) for s in held)}"
            )
        t = self.throughput()
        lines.append(
            f"- sending {self.sending_seconds:.1f} s, waiting {self.settle_seconds:.1f} s"
            f"{'' if self.settled else ' (timed out)'}; {t['acknowledged/s']} studies "
            f"acknowledged/s, {t['done/s']} done/s"
        )
        return "\n".join(lines)

    def problems(self, limit: int = 10) -> str:
        """What went wrong, per study, for an assertion message."""
        bad = [
            s
            for s in self.studies
            if s.study_uid in set(self.not_exactly_once) | set(self.unacknowledged)
            or any(i.acknowledged and not i.recorded for i in s.instances)
        ]
        lines = [f"{len(bad)} problem studies (first {limit}):"]
        for s in bad[:limit]:
            lines.append(
                f"  {s.study_uid}: state={s.state} reason={s.reason} gen={s.generation} "
                f"reported={s.reported_events} SR={s.sr_instances}/{s.sr_series} "
                f"phase={s.phase} queued_at={[round(q - self.started_at, 1) for q in s.queued_at]}"
            )
            for i in s.instances:
                acked = None if i.acknowledged_at is None else i.acknowledged_at - self.started_at
                lines.append(
                    f"    image {i.index}: acked={_fmt(acked)}"
                    f" recorded={i.recorded} node={i.server}/{i.recorded_node} attempts="
                    + "; ".join(
                        f"{a.at - self.started_at:.1f}s {a.server or '?'} {a.detail}"
                        for a in i.attempts
                    )
                )
        return "\n".join(lines)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


class _Faults:
    """Injects the configured faults at once, each in a thread; probes after a kill."""

    def __init__(self, stack: HaStack, config: HaConfig) -> None:
        self.stack = stack
        self.config = config
        self.records: list[FaultRecord] = []
        self.probe: ProbeResult | None = None
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def inject(self) -> None:
        for name in self.config.faults:
            thread = threading.Thread(target=self._one, args=(name,), name=name, daemon=True)
            self.threads.append(thread)
            thread.start()

    def _one(self, name: str) -> None:
        record = FaultRecord(name, time.time())
        with self._lock:
            self.records.append(record)
        try:
            if name == KILL_NODE_A:
                assert self.stack.proxy is not None
                downs = self.stack.proxy.state_changes().count(("node-a", "DOWN"))
                record.at = self.stack.kill_node("node-a")
                if self.config.probe_after_kill:
                    self.probe = probe_after_kill(
                        self.stack, record.at, self.config.probe_seconds, downs_before=downs
                    )
            elif name == RESTART_POSTGRES:
                assert self.stack.postgres is not None
                record.seconds = self.stack.postgres.restart(
                    down_seconds=self.config.postgres_down_seconds,
                    mode=self.config.postgres_stop_mode,
                )
            elif name == FAILOVER_REDIS:
                assert self.stack.sentinel is not None, "the failover needs sentinel=True"
                record.seconds = float(self.stack.sentinel.failover(timeout=60.0))
        except Exception as exc:  # noqa: BLE001 - reported in the result and asserted on
            record.error = f"{type(exc).__name__}: {exc}"

    def join(self, timeout: float = 120.0) -> None:
        for thread in self.threads:
            thread.join(timeout)


def probe_after_kill(
    stack: HaStack, killed_at: float, seconds: float, *, downs_before: int = 0
) -> ProbeResult:
    """C-ECHO through HAProxy every ~100 ms from ``killed_at`` for ``seconds`` (and until one
    succeeds, for up to a minute); ``downs_before``: "node-a is DOWN" lines logged before."""
    assert stack.proxy is not None
    address = stack.proxy.address
    first: float | None = None
    down: float | None = None
    probes = failed = 0
    while time.time() - killed_at < seconds or first is None:
        if time.time() - killed_at > max(seconds, 60.0):
            break
        began = time.time()
        ok = echo_once(address, timeout=2.0)
        probes += 1
        if ok and first is None:
            first = time.time() - killed_at
        failed += not ok
        if down is None and stack.proxy.state_changes().count(("node-a", "DOWN")) > downs_before:
            down = time.time() - killed_at
        time.sleep(max(0.0, 0.1 - (time.time() - began)))
    if down is None:
        with contextlib.suppress(Exception):
            wait_for(
                lambda: (
                    stack.proxy is not None
                    and stack.proxy.state_changes().count(("node-a", "DOWN")) > downs_before
                ),
                5,
                "HAProxy marking node-a down",
                interval=0.05,
            )
            down = time.time() - killed_at
    return ProbeResult(first, probes, failed, down)


def warm_up(stack: HaStack, *, rows: int, cols: int, timeout: float = 180.0) -> tuple[int, int]:
    """One study through HAProxy to the PACS: loads the worker's model; returns its SR set's
    (instances, series) in Orthanc, the count every study must end with."""
    assert stack.proxy is not None
    ds = make_dx(None, rows=rows, cols=cols, seed=999_999)
    uid = str(ds.StudyInstanceUID)
    deadline = time.monotonic() + timeout
    while True:
        attempt = store_once(stack.proxy.address, ds)
        if attempt.status is not None and _accepted(attempt.status):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up study refused: {attempt.detail}\n{stack.logs()}")
        time.sleep(1)
    try:
        wait_for(
            lambda: stack.states([uid]).get(uid) in FINAL_STATES,
            max(1.0, deadline - time.monotonic()),
            "the warm-up study",
            interval=0.5,
        )
    except TimeoutError as exc:
        raise RuntimeError(f"{exc}\n{stack.logs()}") from None
    state = stack.states([uid]).get(uid)
    if state != "done":
        raise RuntimeError(f"warm-up study ended {state}\n{stack.logs()}")
    sets = wait_for(lambda: stack.sr_sets().get(uid), 30, "the warm-up SRs in Orthanc")
    return int(sets[0]), int(sets[1])


def run_scenario(
    stack: HaStack,
    config: HaConfig,
    *,
    expected: tuple[int, int] | None = None,
    log: Callable[[str], None] = print,
) -> HaResult:
    """Send ``config.studies`` studies through HAProxy while injecting ``config.faults``.

    ``expected``: the (SR instances, SR series) of one study's report, from an earlier run's
    :attr:`HaResult.expected_sr`; without it a warm-up study is sent first to learn them.
    """
    assert stack.proxy is not None
    if expected is None:
        expected = warm_up(stack, rows=config.rows, cols=config.cols)
        log(
            f"[{config.name}] warm-up done: SR set of {expected[0]} instance(s), "
            f"{expected[1]} series"
        )
    plans = plan_studies(
        config.studies,
        seed=config.seed + 1,
        rows=config.rows,
        cols=config.cols,
        second_every=config.second_every,
    )
    outcomes = {
        p.study_uid: StudyOutcome(
            p.study_uid,
            [
                InstanceOutcome(str(ds.SOPInstanceUID), p.study_uid, k)
                for k, ds in enumerate(p.images)
            ],
        )
        for p in plans
    }
    address = stack.proxy.address
    per_sender = [plans[k :: config.senders] for k in range(config.senders)]
    longest = max(len(p) for p in per_sender)
    interval = config.send_seconds / longest if config.send_seconds > 0 else 0.0
    started = time.time()
    rng_lock = threading.Lock()
    rng = random.Random(config.seed)

    def pause() -> float:
        with rng_lock:
            return rng.uniform(*config.retry_delay)

    def send(instance: InstanceOutcome, ds: Dataset) -> None:
        first = time.monotonic()
        while True:
            attempt = store_once(address, ds)
            instance.attempts.append(attempt)
            if attempt.status is not None and _accepted(attempt.status):
                instance.acknowledged_at = attempt.ended
                return
            if time.monotonic() - first > config.retry_for:
                return
            time.sleep(pause())

    def sender(k: int, batch: list[StudyPlan]) -> None:
        for n, plan in enumerate(batch):
            due = started + (n + k / config.senders) * interval
            time.sleep(max(0.0, due - time.time()))
            study = outcomes[plan.study_uid]
            for index, ds in enumerate(plan.images):
                if index:
                    time.sleep(config.second_image_delay)
                send(study.instances[index], ds)

    faults = _Faults(stack, config)
    fault_after = (
        config.fault_after if config.fault_after is not None else 0.4 * config.send_seconds
    )
    timer = None
    if config.faults:
        timer = threading.Timer(fault_after, faults.inject)
        timer.daemon = True
    threads = [
        threading.Thread(target=sender, args=(k, batch), name=f"sender{k}", daemon=True)
        for k, batch in enumerate(per_sender)
    ]
    log(
        f"[{config.name}] sending {len(plans)} studies "
        f"({sum(len(p.images) for p in plans)} instances) from {config.senders} senders over "
        f"~{config.send_seconds:g} s; faults {list(config.faults)} at {fault_after:.1f} s"
    )
    for t in threads:
        t.start()
    if timer is not None:
        timer.start()
    for t in threads:
        t.join(config.send_seconds + config.retry_for * 4 + 120)
    if timer is not None:
        timer.join()
    faults.join()
    sending = time.time() - started
    log(f"[{config.name}] sending ended after {sending:.1f} s; waiting for the studies")

    acked = [s.study_uid for s in outcomes.values() if s.acknowledged]
    settle_began = time.monotonic()
    settled = _settle(stack, acked, config.settle_timeout, config.absent_grace)
    if settled:  # the last SRs may still be on their way from the worker's send thread
        time.sleep(1.0)
    settle = time.monotonic() - settle_began
    log(f"[{config.name}] waited {settle:.1f} s (settled: {settled}); collecting")

    result = _collect(stack, config, outcomes, started, sending, settle, settled, expected, faults)
    if not settled or result.not_exactly_once or result.unrecorded:
        result.diagnostics = stack.logs()
    return result


def _settle(stack: HaStack, uids: list[str], timeout: float, absent_grace: float) -> bool:
    """Wait until every study of ``uids`` is finished; False on ``timeout``, or once only
    studies the database does not hold at all are left and stay so for ``absent_grace``."""
    deadline = time.monotonic() + timeout
    only_absent_since: float | None = None
    while True:
        states = stack.states(uids)
        pending = [u for u in uids if states.get(u) not in FINAL_STATES]
        if not pending:
            return True
        now = time.monotonic()
        if all(u not in states for u in pending):
            only_absent_since = only_absent_since or now
            if now - only_absent_since > absent_grace:
                return False
        else:
            only_absent_since = None
        if now > deadline:
            return False
        time.sleep(1.0)


def _collect(
    stack: HaStack,
    config: HaConfig,
    outcomes: dict[str, StudyOutcome],
    started: float,
    sending: float,
    settle: float,
    settled: bool,
    expected: tuple[int, int],
    faults: _Faults,
) -> HaResult:
    uids = list(outcomes)
    for row in stack.query(
        "SELECT study_instance_uid, state, reason, generation, finished_at FROM studies "
        "WHERE study_instance_uid IN :uids",
        uids=uids,
    ):
        s = outcomes[str(row[0])]
        s.state, s.reason, s.generation, s.finished_at = row[1], row[2], int(row[3]), row[4]
    for row in stack.query(
        "SELECT study_instance_uid, kind, at FROM events WHERE study_instance_uid IN :uids "
        "AND kind IN ('reported', 'queued') ORDER BY id",
        uids=uids,
    ):
        s = outcomes[str(row[0])]
        if row[1] == "reported":
            s.reported_events += 1
        else:
            s.queued_at.append(float(row[2]))
    column = "received_by"
    by_sop = {i.sop_uid: i for s in outcomes.values() for i in s.instances}
    for row in stack.query(
        "SELECT sop_instance_uid, received_by FROM instances WHERE study_instance_uid IN :uids",
        uids=uids,
    ):
        instance = by_sop.get(str(row[0]))
        if instance is not None:
            instance.recorded = True
            instance.recorded_node = None if row[1] is None else str(row[1])
    for uid, (count, series) in stack.sr_sets().items():
        if uid in outcomes:
            outcomes[uid].sr_instances, outcomes[uid].sr_series = count, series
    logged: list[Connection] = stack.proxy.connections() if stack.proxy else []
    connections = [c for c in logged if c.accepted_at >= started - 0.5]  # this run's only
    by_port: dict[int, list[Connection]] = {}
    for c in connections:
        by_port.setdefault(c.client_port, []).append(c)
    for instance in by_sop.values():
        for attempt in instance.attempts:
            if attempt.local_port is None:
                continue
            candidates = by_port.get(attempt.local_port, [])
            if candidates:
                # a port may be reused within a run: the connection accepted closest to it
                best = min(candidates, key=lambda c: abs(c.accepted_at - attempt.at))
                attempt.server = best.server if best.server != "<NOSRV>" else None
    fault_at = min((f.at for f in faults.records), default=None)
    for s in outcomes.values():
        if fault_at is None:
            s.phase = "before"
            continue
        ends = [a.ended for i in s.instances for a in i.attempts]
        s.phase = "before" if ends and max(ends) < fault_at else "after"
    return HaResult(
        config=config,
        started_at=started,
        sending_seconds=sending,
        settle_seconds=settle,
        expected_sr_instances=expected[0],
        expected_sr_series=expected[1],
        studies=list(outcomes.values()),
        faults=sorted(faults.records, key=lambda f: f.at),
        probe=faults.probe,
        node_column=column,
        connections=len(connections),
        redispatched=sum(c.redispatched for c in connections),
        settled=settled,
    )


@contextlib.contextmanager
def ha_stack(
    tmp: Path,
    model_dir: Path,
    orthanc_factory: OrthancFactory,
    *,
    nodes: Sequence[str] = NODE_NAMES,
    sentinel: bool = False,
    env: dict[str, str] | None = None,
) -> Iterator[HaStack]:
    """A started :class:`HaStack`, stopped afterwards."""
    stack = HaStack(tmp, model_dir, orthanc_factory, sentinel=sentinel, env=env)
    stack.start(nodes)
    try:
        yield stack
    finally:
        stack.stop()
