"""HAProxy in TCP mode in front of DICOM listeners, as a load balancer runs it in production.

The Debian package's ``/usr/sbin/haproxy`` runs in the foreground (``-db``) with a generated
configuration: ``mode tcp``, round robin (or leastconn), a TCP connect check on each server every
500 ms (down after 2 failures, up after 1 success), a connection that cannot reach its server is
retried and redispatched to another one, and client/server timeouts long enough for a C-STORE.

Every connection is logged to HAProxy's standard output (the :class:`Process` log) when it
closes, one line each::

    conn 127.0.0.1:40312 1767225600.123 nodes/node-b -- 0/0/812 4711 +1

client address, when HAProxy accepted it (Unix time), backend/server that served it, termination
state, wait/connect/total ms, bytes from the server, and retries (``+`` when redispatched).
:meth:`HaProxy.connections` parses them, so a client that knows its own local port knows which
server took its association.
"""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import Process, free_port, wait_port

HAPROXY_CANDIDATES = ("/usr/sbin/haproxy", "/usr/bin/haproxy")
LOG_FORMAT = "conn %ci:%cp %Ts.%ms %b/%s %ts %Tw/%Tc/%Tt %B %rc"
_CONN = re.compile(
    r"conn (?P<addr>[\d.]+):(?P<port>\d+) (?P<accepted>\d+\.\d+) "
    r"(?P<backend>[^/\s]+)/(?P<server>\S+) (?P<term>\S+) "
    r"(?P<tw>-?\d+)/(?P<tc>-?\d+)/(?P<tt>-?\d+) (?P<bytes>\d+) (?P<retries>\+?\d+)"
)
_STATE = re.compile(
    r"^Server (?P<backend>[^/\s]+)/(?P<server>\S+) is (?P<state>UP|DOWN)", re.MULTILINE
)


def find_haproxy() -> Path | None:
    """The HAProxy binary (Debian package ``haproxy``), or None where it is not installed."""
    for candidate in HAPROXY_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    found = shutil.which("haproxy")
    return Path(found) if found else None


@dataclass(frozen=True)
class Backend:
    """One server behind the proxy: its name in the logs and its loopback port."""

    name: str
    port: int


@dataclass(frozen=True)
class Connection:
    """One logged client connection (see the module docstring)."""

    client_port: int
    accepted_at: float  # Unix time
    server: str
    termination: str
    connect_ms: int
    total_ms: int
    bytes_from_server: int
    retries: int
    redispatched: bool


def build_config(
    port: int,
    backends: Sequence[Backend],
    *,
    balance: str = "roundrobin",
    check_inter_ms: int = 500,
    fall: int = 2,
    rise: int = 1,
    connect_timeout_ms: int = 500,
    data_timeout_s: int = 120,
    retries: int = 3,
) -> str:
    """The text of an HAProxy configuration: TCP, one frontend on ``port``, one backend."""
    if balance not in ("roundrobin", "leastconn"):
        raise ValueError(f"balance must be roundrobin or leastconn, not {balance!r}")
    if not backends:
        raise ValueError("at least one backend server")
    servers = "\n".join(
        f"    server {b.name} 127.0.0.1:{b.port} check inter {check_inter_ms}ms "
        f"fall {fall} rise {rise}"
        for b in backends
    )
    return f"""\
global
    log stdout format raw local0 info
    maxconn 2000

defaults
    mode tcp
    log global
    log-format "{LOG_FORMAT}"
    timeout connect {connect_timeout_ms}ms
    timeout check {connect_timeout_ms}ms
    timeout client {data_timeout_s}s
    timeout server {data_timeout_s}s
    timeout client-fin 5s
    timeout server-fin 5s
    retries {retries}
    option redispatch 1

frontend dicom
    bind 127.0.0.1:{port}
    default_backend nodes

backend nodes
    balance {balance}
    option tcp-check
{servers}
"""


class HaProxy:
    """A running HAProxy on a free loopback port (``port``), in front of ``backends``.

    Use as a context manager, or call :meth:`stop`. The configuration and log live in
    ``workdir`` (a new temporary folder unless given).
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        workdir: Path | None = None,
        port: int | None = None,
        name: str = "haproxy",
        **config: object,
    ) -> None:
        binary = find_haproxy()
        if binary is None:
            raise RuntimeError("HAProxy is not installed (Debian package 'haproxy')")
        self.backends = list(backends)
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="d2r-haproxy-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.config_path = self.workdir / f"{name}.cfg"
        self.config_path.write_text(build_config(self.port, self.backends, **config))  # type: ignore[arg-type]
        check = Process(
            [str(binary), "-c", "-q", "-f", str(self.config_path)],
            env={},
            log=self.workdir / f"{name}-check.log",
        )
        if check.proc.wait(30) != 0:
            check.stop()
            raise RuntimeError(f"invalid HAProxy configuration:\n{check.log_tail()}")
        check.stop()
        self.process = Process(
            [str(binary), "-db", "-f", str(self.config_path)],
            env={},
            log=self.workdir / f"{name}.log",
        )
        try:
            wait_port(self.port, timeout=20)
        except TimeoutError:
            self.process.stop()
            raise RuntimeError(f"HAProxy did not listen:\n{self.process.log_tail()}") from None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def wait_servers_up(self, timeout: float = 30.0) -> None:
        """Wait until a TCP connection to every backend's port succeeds (what the check does)."""
        deadline = time.monotonic() + timeout
        for backend in self.backends:
            while True:
                with socket.socket() as s:
                    s.settimeout(0.5)
                    if s.connect_ex(("127.0.0.1", backend.port)) == 0:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"backend {backend.name} not listening")
                time.sleep(0.1)
        time.sleep(0.6)  # one check interval: HAProxy has seen them too

    def log_text(self) -> str:
        return self.process.log_tail(10**9)

    def connections(self) -> list[Connection]:
        """Every client connection logged so far (closed connections only)."""
        out = []
        for m in _CONN.finditer(self.log_text()):
            retries = m.group("retries")
            out.append(
                Connection(
                    client_port=int(m.group("port")),
                    accepted_at=float(m.group("accepted")),
                    server=m.group("server"),
                    termination=m.group("term"),
                    connect_ms=int(m.group("tc")),
                    total_ms=int(m.group("tt")),
                    bytes_from_server=int(m.group("bytes")),
                    retries=int(retries.lstrip("+")),
                    redispatched=retries.startswith("+"),
                )
            )
        return out

    def state_changes(self) -> list[tuple[str, str]]:
        """``(server, "UP" | "DOWN")`` for each health state change HAProxy logged, in order."""
        return [(m.group("server"), m.group("state")) for m in _STATE.finditer(self.log_text())]

    def stop(self) -> None:
        self.process.stop(timeout=10)

    def __enter__(self) -> HaProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
