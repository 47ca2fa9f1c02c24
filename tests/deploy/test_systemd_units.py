"""systemd units, sysusers.d and tmpfiles.d snippets, the example environment file, and the
example HAProxy configuration for two nodes.

``systemd-analyze verify`` runs on every unit with ``ExecStart`` pointed at a stub executable
(the product's path, ``/opt/d2r/venv/bin/d2r``, does not exist on a build machine); the
sysusers and tmpfiles snippets are applied by the real systemd tools to a scratch root; HAProxy
(Debian package ``haproxy``, where installed) checks its example with ``haproxy -c``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from d2r_core.config import read_config_file
from dicom_node.settings import NodeSettings
from observability.settings import ObservabilitySettings
from tests.deploy.readme import documented_settings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
UNITS = sorted(SYSTEMD.glob("*.service"))
HAPROXY_EXAMPLE = SYSTEMD / "haproxy-d2r.cfg.example"
HAPROXY_SECTIONS = ("global", "defaults", "frontend", "backend", "listen")
# The settings of several nodes on one database, commented out in d2r.env.example.
HA_SETTINGS = (
    "D2R_NODE_NAME",
    "D2R_NODE_HEARTBEAT_SECONDS",
    "D2R_NODE_EXPIRE_SECONDS",
    "D2R_DB_RETRY_SECONDS",
    "D2R_DB_INGEST_WAIT_SECONDS",
    "D2R_BROKER_URL",
    "D2R_BROKER_SENTINEL_MASTER",
)
INSTALLED_D2R = "/opt/d2r/venv/bin/d2r"
SANDBOX = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ReadWritePaths": "/var/lib/d2r",
    "CapabilityBoundingSet": "",
    "User": "d2r",
    "EnvironmentFile": "/etc/d2r/d2r.env",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
}


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Key -> [values]`` of a unit file, repeated keys kept in order (sections merged)."""
    values: dict[str, list[str]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        values.setdefault(key.strip(), []).append(value.strip())
    return values


def _duration_seconds(text: str) -> float:
    units = {"s": 1, "min": 60}
    for suffix, factor in sorted(units.items(), key=lambda i: -len(i[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@pytest.fixture
def rendered(tmp_path: Path) -> Path:
    """The units with ExecStart pointed at a stub ``d2r`` executable in ``tmp_path``."""
    stub = tmp_path / "bin" / "d2r"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stub.chmod(0o755)
    for unit in UNITS:
        text = unit.read_text(encoding="utf-8")
        assert INSTALLED_D2R in text, unit.name
        (tmp_path / unit.name).write_text(text.replace(INSTALLED_D2R, str(stub)), encoding="utf-8")
    return tmp_path


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path.parent,
    )


def test_the_three_units_exist() -> None:
    assert [u.name for u in UNITS] == [
        "d2r-node.service",
        "d2r-serve.service",
        "d2r-worker@.service",
    ]


@pytest.mark.parametrize(
    "unit",
    ["d2r-node.service", "d2r-serve.service", "d2r-worker@0.service", "d2r-worker@3.service"],
)
def test_systemd_analyze_verify_reports_nothing(rendered: Path, unit: str) -> None:
    result = _verify(rendered / unit)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_systemd_analyze_verify_catches_a_broken_unit(rendered: Path) -> None:
    unit = rendered / "d2r-node.service"
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
    result = _verify(unit)
    assert "Unknown key 'ProtectHomes'" in result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_units_run_sandboxed_as_the_d2r_user(unit: Path) -> None:
    values = parse_unit(unit)
    for key, expected in SANDBOX.items():
        assert expected in values.get(key, []), f"{unit.name}: {key}={expected}"
    assert values["ReadWritePaths"] == ["/var/lib/d2r"]
    assert values["RestrictAddressFamilies"]
    assert values["KillMode"] == ["mixed"]


def test_gpu_units_keep_device_access_and_wait_for_a_study() -> None:
    for name in ("d2r-worker@.service", "d2r-serve.service"):
        values = parse_unit(SYSTEMD / name)
        assert "PrivateDevices" not in values, name
        assert "char-nvidia-frontend rw" in values["DeviceAllow"]
        env = read_config_file(SYSTEMD / "d2r.env.example")
        assert _duration_seconds(values["TimeoutStopSec"][0]) > float(env["D2R_TASK_TIME_LIMIT"])
    worker = parse_unit(SYSTEMD / "d2r-worker@.service")
    assert "CUDA_VISIBLE_DEVICES=%i" in worker["Environment"]
    node = parse_unit(SYSTEMD / "d2r-node.service")
    assert node["PrivateDevices"] == ["yes"]


def test_example_env_file_builds_valid_settings() -> None:
    env = read_config_file(SYSTEMD / "d2r.env.example")
    node = NodeSettings.from_env(env)
    worker = WorkerSettings.from_env(env)
    assert node.spool_dir == Path("/var/lib/d2r/spool")
    assert worker.delivery.destinations and node.port == 11112
    assert worker.broker_url.startswith("redis://")
    assert worker.visibility_timeout > worker.task_time_limit
    # Every documented D2R_* setting appears in the example, which names no other.
    documented = documented_settings()
    text = (SYSTEMD / "d2r.env.example").read_text(encoding="utf-8")
    assert {name for name in documented if name not in text} - {"D2R_CONFIG"} == set()
    named = set(re.findall(r"^#? ?(D2R_[A-Z0-9_]+)=", text, flags=re.M))
    assert named - documented == set()


def test_example_env_file_leaves_per_gpu_settings_to_the_worker_unit() -> None:
    # EnvironmentFile= overrides Environment=: a value here would override every instance's own.
    env = read_config_file(SYSTEMD / "d2r.env.example")
    unit = parse_unit(SYSTEMD / "d2r-worker@.service")
    per_instance = {line.partition("=")[0] for line in unit["Environment"]}
    assert {"CUDA_VISIBLE_DEVICES", "D2R_HTTP_PORT", "D2R_DEVICE"} <= per_instance
    assert per_instance & set(env) == set()


def test_sysusers_and_tmpfiles_create_the_user_and_state_dirs(tmp_path: Path) -> None:
    """Needs root (as scripts/test.sh runs): systemd-tmpfiles chowns to the new user."""
    for tool in ("sysusers", "tmpfiles"):
        target = tmp_path / "usr" / "lib" / f"{tool}.d" / "d2r.conf"
        target.parent.mkdir(parents=True)
        shutil.copy(SYSTEMD / f"d2r.{tool}.conf", target)
    (tmp_path / "etc" / "d2r").mkdir(parents=True)
    (tmp_path / "etc" / "group").write_text("video:x:44:\n")
    (tmp_path / "etc" / "d2r" / "d2r.env").write_text("D2R_AE_TITLE=D2R\n")
    for cmd in (["systemd-sysusers"], ["systemd-tmpfiles", "--create"]):
        res = subprocess.run(
            [*cmd, f"--root={tmp_path}"], capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, res.stderr
    passwd = {
        f[0]: f
        for f in (line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines())
    }
    uid = int(passwd["d2r"][2])
    assert passwd["d2r"][5] == "/var/lib/d2r"
    assert "d2r" in (tmp_path / "etc/group").read_text().splitlines()[0]  # member of video
    for path, mode in (("var/lib/d2r", 0o750), ("var/lib/d2r/spool", 0o750)):
        st = (tmp_path / path).stat()
        assert (st.st_uid, st.st_mode & 0o777) == (uid, mode), path
    assert (tmp_path / "etc/d2r/d2r.env").stat().st_mode & 0o777 == 0o640
    for name in ("http-tokens", "http-users"):  # created empty, root only
        st = (tmp_path / "etc/d2r" / name).stat()
        assert (st.st_uid, st.st_mode & 0o777, st.st_size) == (0, 0o600, 0), name


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_units_load_the_http_credentials(unit: Path, tmp_path: Path) -> None:
    values = parse_unit(unit)
    credentials = dict(v.split(":", 1) for v in values["LoadCredential"])
    assert credentials == {
        "http-tokens": "/etc/d2r/http-tokens",
        "http-users": "/etc/d2r/http-users",
    }
    env = dict(v.split("=", 1) for v in values["Environment"])
    assert env["D2R_HTTP_TOKENS_FILE"] == "%d/http-tokens"
    assert env["D2R_HTTP_USERS_FILE"] == "%d/http-users"
    # The empty files tmpfiles creates are valid settings (no credentials yet).
    for name in ("http-tokens", "http-users"):
        (tmp_path / name).write_text("")
    obs = ObservabilitySettings.from_env(
        {
            "D2R_HTTP_HOST": "0.0.0.0",
            "D2R_HTTP_TOKENS_FILE": str(tmp_path / "http-tokens"),
            "D2R_HTTP_USERS_FILE": str(tmp_path / "http-users"),
        }
    )
    assert obs.http_auth_required
    restart_prevent = values["RestartPreventExitStatus"][0].split()
    assert restart_prevent == ["2", "3"]  # configuration error, database schema refused


def test_prometheus_scrape_jobs_match_the_http_ports() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/scrape-configs.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    env_text = (SYSTEMD / "d2r.env.example").read_text(encoding="utf-8")

    def ports(job: str) -> list[str]:
        return [t.rpartition(":")[2] for t in jobs[job]["static_configs"][0]["targets"]]

    assert jobs["d2r-node"]["metrics_path"] == "/metrics"
    node_port = re.search(r"^# D2R_HTTP_PORT=(\d+)$", env_text, flags=re.M)
    assert node_port
    assert ports("d2r-node") == [node_port.group(1)]
    worker_port = next(
        v for v in parse_unit(SYSTEMD / "d2r-worker@.service")["Environment"] if "HTTP_PORT" in v
    )
    pattern = worker_port.partition("=")[2]
    assert ports("d2r-worker") == [pattern.replace("%i", str(i)) for i in range(2)]
    assert jobs["d2r-kubernetes-pods"]["kubernetes_sd_configs"][0]["role"] == "pod"
    for name, job in jobs.items():  # /metrics needs the metrics role's bearer token
        assert job["authorization"] == {
            "type": "Bearer",
            "credentials_file": "/etc/prometheus/secrets/d2r-metrics-token",
        }, name


def _commented_examples(path: Path) -> dict[str, str]:
    """``# D2R_X=value`` lines of an environment file, uncommented (the last one of each name)."""
    found = re.findall(r"^# (D2R_[A-Z0-9_]+)=(\S*)$", path.read_text(encoding="utf-8"), re.M)
    return dict(found)


def test_example_env_file_documents_several_nodes() -> None:
    env_file = SYSTEMD / "d2r.env.example"
    env = read_config_file(env_file)
    examples = _commented_examples(env_file)
    assert set(HA_SETTINGS) <= set(examples)
    # Commented out: a host's own name is its own, and the defaults serve one node as well.
    assert (set(HA_SETTINGS) - {"D2R_BROKER_URL"}) & set(env) == set()
    # Uncommented, the examples build valid settings: two nodes, Redis Sentinel.
    env.update({name: examples[name] for name in HA_SETTINGS})
    env["D2R_DATABASE_URL"] = "postgresql+psycopg://d2r:s3cret-pw@db.example.org/d2r"
    node = NodeSettings.from_env(env)
    worker = WorkerSettings.from_env(env)
    assert node.node_name == examples["D2R_NODE_NAME"]
    assert node.node_expire_seconds >= 2 * node.node_heartbeat_seconds
    assert (node.db_retry_seconds, node.db_ingest_wait_seconds) == (30.0, 5.0)
    assert worker.broker_url.count("sentinel://") == 3
    assert worker.broker_sentinel_master == "d2r"


def test_node_and_workers_wait_for_the_spool_mount() -> None:
    for name in ("d2r-node.service", "d2r-worker@.service"):
        values = parse_unit(SYSTEMD / name)
        env = read_config_file(SYSTEMD / "d2r.env.example")
        assert values["RequiresMountsFor"] == [env["D2R_SPOOL_DIR"]], name


def parse_haproxy(text: str) -> dict[str, list[list[str]]]:
    """``"frontend NAME"`` (or ``"global"``, ``"defaults"``) -> its keyword lines, as words."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] | None = None
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] in HAPROXY_SECTIONS:
            assert not raw[0].isspace(), raw
            current = sections.setdefault(" ".join(words[:2]), [])
        else:
            assert current is not None and raw[0].isspace(), raw
            current.append(words)
    return sections


def _lines(section: list[list[str]], keyword: str) -> list[list[str]]:
    return [words[1:] for words in section if words[0] == keyword]


def test_haproxy_example_balances_two_nodes_in_tcp_mode_with_health_checks() -> None:
    sections = parse_haproxy(HAPROXY_EXAMPLE.read_text(encoding="utf-8"))
    env = read_config_file(SYSTEMD / "d2r.env.example")
    http_port = re.search(
        r"^# D2R_HTTP_PORT=(\d+)$", (SYSTEMD / "d2r.env.example").read_text(), re.M
    )
    assert http_port
    assert _lines(sections["defaults"], "mode") == [["tcp"]]
    frontends = {k.split()[1]: v for k, v in sections.items() if k.startswith("frontend ")}
    backends = {k.split()[1]: v for k, v in sections.items() if k.startswith("backend ")}
    assert "listen" not in {k.split()[0] for k in sections}
    ports = set()
    for name, section in {**frontends, **backends}.items():
        assert _lines(section, "mode") in ([], [["tcp"]]), name  # TCP, never http
    for name, frontend in frontends.items():
        [[target]] = _lines(frontend, "default_backend")
        assert target in backends, name
        [[address]] = _lines(frontend, "bind")
        ports.add(address.rpartition(":")[2])
        # the PACS addresses are checked here: the nodes see the proxy's
        assert [words for words in _lines(frontend, "tcp-request") if "reject" in words], name
    assert ports == {env["D2R_PORT"], http_port.group(1)}
    for name, backend in backends.items():
        servers = _lines(backend, "server")
        # two nodes or more, each on a host of its own
        assert len({s[1].rpartition(":")[0] for s in servers}) == len(servers) >= 2, name
        # health checks ask /readyz on the nodes' HTTP port
        assert ["option", "httpchk"] in backend, name
        checks = _lines(backend, "http-check")
        assert checks[0][:5] == ["send", "meth", "GET", "uri", "/readyz"], name
        assert ["expect", "status", "200"] in checks, name
        [default_server] = _lines(backend, "default-server")
        assert "check" in default_server, name
        if "port" in default_server:
            assert default_server[default_server.index("port") + 1] == http_port.group(1)
        else:
            assert {s[1].rpartition(":")[2] for s in servers} == {http_port.group(1)}, name
        assert _lines(backend, "balance") in ([["leastconn"]], [["roundrobin"]]), name
    [dicom] = [
        backend
        for backend in backends.values()
        if {s[1].rpartition(":")[2] for s in _lines(backend, "server")} == {env["D2R_PORT"]}
    ]
    # a node marked down has its associations cut, so the PACS retries on the other
    assert "on-marked-down" in _lines(dicom, "default-server")[0]
    assert ["redispatch", "1"] in _lines(sections["defaults"], "option")


def _haproxy() -> str:
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/bin/haproxy") if Path(p).exists()), None
    )
    if found is None:
        pytest.skip("haproxy is not installed (Debian package haproxy)")
    return found


def _haproxy_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_haproxy(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=60
    )


def test_haproxy_accepts_the_example() -> None:
    result = _haproxy_check(HAPROXY_EXAMPLE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr


def test_haproxy_check_catches_a_broken_example(tmp_path: Path) -> None:
    broken = tmp_path / "haproxy.cfg"
    text = HAPROXY_EXAMPLE.read_text(encoding="utf-8")
    assert "balance leastconn" in text
    broken.write_text(text.replace("balance leastconn", "balance leastconnection", 1))
    result = _haproxy_check(broken)
    assert result.returncode != 0
