"""A Redis Sentinel cluster on loopback for failover tests: one master, one replica and three
sentinels, all real ``redis-server`` processes (the Debian binary; ``--sentinel`` for the
sentinels), no persistence.

The sentinels declare a master down after 1 s (``down-after-milliseconds``), so a failover
completes in a few seconds. :meth:`SentinelCluster.failover` kills the current master with
SIGKILL, waits for the promoted replica, and restarts the old master, which the sentinels turn
into a replica of the new one.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.processes import Process, base_env, free_port, wait_for, wait_port

#: a master unreachable this long is subjectively down (the quorum of 2 makes it objectively so)
DOWN_AFTER_MS = 1000
#: a failover attempt that has not promoted a replica after this long is retried
FAILOVER_TIMEOUT_MS = 5000
QUORUM = 2
SENTINELS = 3


def _exe() -> str:
    return shutil.which("redis-server") or "/usr/bin/redis-server"


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _client(port: int) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def _info(port: int, section: str) -> dict[str, Any] | None:
    """``INFO section`` of the instance on ``port``, or None when it does not answer."""
    try:
        with _client(port) as client:
            return dict(client.info(section))
    except redis.RedisError:
        return None


class SentinelCluster:
    """The running cluster: its broker URL, its master group and the failover."""

    def __init__(self, root: Path, master_name: str) -> None:
        self.root = root
        self.master_name = master_name
        #: data instances (master and replica) by port; a failover swaps their roles
        self.servers: dict[int, Process] = {}
        self.sentinels: dict[int, Process] = {}
        self.sentinel_ports: list[int] = []
        self.broker_url = ""

    # -- the processes -----------------------------------------------------------------------
    def _start_server(self, port: int, replica_of: int | None = None) -> None:
        conf = self.root / f"redis-{port}.conf"
        if not conf.exists():  # a restart keeps what the sentinels may have rewritten
            lines = [
                f"port {port}",
                "bind 127.0.0.1",
                'save ""',
                "appendonly no",
                f'dir "{self.root}"',
                f'dbfilename "dump-{port}.rdb"',
                # full resynchronisation at once (the default waits 5 s for more replicas)
                "repl-diskless-sync yes",
                "repl-diskless-sync-delay 0",
            ]
            if replica_of is not None:
                lines.append(f"replicaof 127.0.0.1 {replica_of}")
            conf.write_text("\n".join(lines) + "\n")
        self.servers[port] = Process(
            [_exe(), str(conf)], env=base_env(), log=self.root / f"redis-{port}.log"
        )
        wait_port(port)

    def _start_sentinel(self, port: int, master_port: int) -> None:
        conf = self.root / f"sentinel-{port}.conf"
        name = self.master_name
        conf.write_text(
            "\n".join(
                [
                    f"port {port}",
                    "bind 127.0.0.1",
                    f'dir "{self.root}"',
                    f"sentinel monitor {name} 127.0.0.1 {master_port} {QUORUM}",
                    f"sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}",
                    f"sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}",
                    f"sentinel parallel-syncs {name} 1",
                ]
            )
            + "\n"
        )
        self.sentinels[port] = Process(
            [_exe(), str(conf), "--sentinel"],
            env=base_env(),
            log=self.root / f"sentinel-{port}.log",
        )
        wait_port(port)

    def stop(self) -> None:
        for proc in [*self.sentinels.values(), *self.servers.values()]:
            proc.stop(timeout=10)

    def logs(self, chars: int = 1500) -> str:
        procs = [*self.servers.items(), *self.sentinels.items()]
        return "\n".join(f"--- {p.log_path.name}\n{p.log_tail(chars)}" for _, p in procs)

    # -- what the sentinels say --------------------------------------------------------------
    def _reported(self) -> list[tuple[str, int]]:
        """The master address each answering sentinel reports."""
        addresses = []
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError), _client(port) as client:
                answer = client.sentinel_get_master_addr_by_name(self.master_name)
                if answer:
                    addresses.append((str(answer[0]), int(answer[1])))
        return addresses

    def master_address(self) -> tuple[str, int]:
        """The master's ``(host, port)`` as most sentinels currently report it."""
        reported = self._reported()
        if not reported:
            raise RuntimeError(f"no sentinel names a master for {self.master_name}")
        return Counter(reported).most_common(1)[0][0]

    def _is_master(self, port: int) -> bool:
        info = _info(port, "replication")
        return info is not None and info.get("role") == "master"

    def _replica_linked(self, port: int, master_port: int) -> bool:
        info = _info(port, "replication")
        return (
            info is not None
            and info.get("role") == "slave"
            and int(info.get("master_port", 0)) == master_port
            and info.get("master_link_status") == "up"
        )

    def _sentinels_ready(self, master_port: int, replica_port: int) -> bool:
        """Every sentinel names the master, knows the replica as healthy, and knows the
        other sentinels: a failover can happen."""
        for port in self.sentinel_ports:
            try:
                with _client(port) as client:
                    master = client.sentinel_master(self.master_name)
                    replicas = client.sentinel_slaves(self.master_name)
                    others = client.sentinel_sentinels(self.master_name)
            except redis.RedisError:
                return False
            if int(master.get("port", 0)) != master_port or not master.get("is_master"):
                return False
            if master.get("is_sdown") or master.get("is_odown"):
                return False
            healthy = [
                r
                for r in replicas
                if int(r.get("port", 0)) == replica_port
                and not r.get("is_sdown")
                and r.get("master-link-status") == "ok"
            ]
            if not healthy or len(others) < SENTINELS - 1:
                return False
        return True

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the replica is in sync with the master the sentinels name, and every sentinel
        could fail it over."""
        _, master = self.master_address()
        (replica,) = [p for p in self.servers if p != master]
        try:
            wait_for(lambda: self._replica_linked(replica, master), timeout, "the replica's sync")
            wait_for(
                lambda: self._sentinels_ready(master, replica),
                timeout,
                "the sentinels to know the master, the replica and each other",
                interval=0.25,
            )
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{self.logs()}") from exc

    # -- the test interface ------------------------------------------------------------------
    def failover(self, timeout: float = 60.0) -> float:
        """Kill the master (SIGKILL), wait for the sentinels to promote the replica, restart
        the old master and wait until it is back as the new master's replica, with every
        sentinel ready for another failover.

        Returns the seconds from the kill until a sentinel named the new master and it
        answered as a master (``role:master``).
        """
        deadline = time.monotonic() + timeout
        _, old = self.master_address()
        self.servers[old].kill9()
        killed = time.monotonic()

        def promoted() -> int | None:
            for _, port in self._reported():
                if port != old and self._is_master(port):
                    return port
            return None

        try:
            new = wait_for(promoted, timeout, "the sentinels to promote a replica", interval=0.05)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{self.logs()}") from exc
        elapsed = time.monotonic() - killed
        # Restart the old master only once every sentinel names the new one: a sentinel still
        # naming the old address would take the restarted, empty server back as the master (as
        # a Redis pod that waits for its Sentinels before it starts does in Kubernetes).
        try:
            wait_for(
                lambda: [port for _, port in self._reported()] == [new] * SENTINELS,
                max(deadline - time.monotonic(), 5.0),
                "every sentinel to name the new master",
            )
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{self.logs()}") from exc
        self.servers[old].stop()
        self._start_server(old)
        self.wait_ready(max(deadline - time.monotonic(), 5.0))
        return elapsed

    def env(self) -> dict[str, str]:
        """The broker settings of a ``d2r`` process using this cluster."""
        return {"D2R_BROKER_URL": self.broker_url, "D2R_BROKER_SENTINEL_MASTER": self.master_name}


@contextmanager
def redis_sentinel_cluster(workdir: Path, *, master_name: str = "d2r") -> Iterator[SentinelCluster]:
    """A master, a replica and three sentinels on free loopback ports, files under
    ``workdir``; all stopped and their files removed on exit."""
    root = Path(tempfile.mkdtemp(prefix="redis-sentinel-", dir=workdir))
    cluster = SentinelCluster(root, master_name)
    try:
        master, replica, *cluster.sentinel_ports = _free_ports(2 + SENTINELS)
        cluster._start_server(master)
        cluster._start_server(replica, replica_of=master)
        for port in cluster.sentinel_ports:
            cluster._start_sentinel(port, master)
        cluster.broker_url = ";".join(
            f"sentinel://127.0.0.1:{port}" for port in cluster.sentinel_ports
        )
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
