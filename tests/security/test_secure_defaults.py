"""Secure defaults, said out loud: placeholder secrets stop the start, weak defaults are warned
once, credentials never go in cleartext unless asked, and ``d2r http-user --remove``.

Real ``d2r`` processes where the behaviour is the command's (exit status, stderr, log lines).
"""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest
import yaml

from cli.commands.http_user import when_effective
from cli.exposure import exposure_warnings
from d2r_core.config import (
    TlsSettings,
    has_placeholder,
    refuse_placeholder,
    refuse_placeholder_lines,
)
from d2r_core.errors import ConfigError
from d2r_http.auth import read_users
from d2r_http.credentials import remove_user, units_loading, without_user
from dicom_node.settings import NodeSettings
from observability.settings import ObservabilitySettings
from tests.support.processes import REPO, Process, base_env, d2r_cmd, free_port, wait_for
from worker.settings import WorkerSettings

SECRET_YAML = REPO / "deploy" / "k8s" / "base" / "secret.yaml"


def _shipped_secrets() -> dict[str, dict[str, str]]:
    docs = [d for d in yaml.safe_load_all(SECRET_YAML.read_text()) if d]
    return {d["metadata"]["name"]: d["stringData"] for d in docs}


def _d2r(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        d2r_cmd(*args), env=env, input=stdin, capture_output=True, text=True, timeout=120, cwd=REPO
    )


# ------------------------------------------------------------------------- the placeholder
@pytest.mark.parametrize(
    "text", ["CHANGE-ME-0000", "x-change-me-y", "postgresql://d:Change-Me@h/d"]
)
def test_the_placeholder_is_found_in_any_case(text: str) -> None:
    assert has_placeholder(text)
    with pytest.raises(ConfigError, match=r"^D2R_X: f line 3 still holds the CHANGE-ME") as info:
        refuse_placeholder(text, "D2R_X", "f line 3")
    assert text not in str(info.value)


def test_a_real_secret_passes() -> None:
    token = secrets.token_hex(32)
    assert not has_placeholder(token) and refuse_placeholder(token, "D2R_X") == token


def test_placeholder_lines_name_the_line_and_skip_comments() -> None:
    text = "# replace CHANGE-ME below\n\nprom metrics abcdefabcdefabcdef\nx viewer CHANGE-ME-1\n"
    with pytest.raises(ConfigError, match=r"^D2R_F: /f line 4 ") as info:
        refuse_placeholder_lines(text, "D2R_F", "/f")
    assert "CHANGE-ME-1" not in str(info.value)
    assert refuse_placeholder_lines(text.splitlines()[0], "D2R_F", "/f")  # a comment is kept


def test_database_and_broker_urls_refuse_the_placeholder() -> None:
    with pytest.raises(ConfigError, match="^D2R_DATABASE_URL: ") as info:
        NodeSettings.from_env({"D2R_DATABASE_URL": "postgresql+psycopg://d2r:change-me@db/d2r"})
    assert "d2r:change-me" not in str(info.value)
    with pytest.raises(ConfigError, match="^D2R_BROKER_URL: ") as broker:
        WorkerSettings.from_env({"D2R_BROKER_URL": "redis://:CHANGE-ME@redis:6379/0"})
    assert "redis://" not in str(broker.value)


@pytest.mark.parametrize(
    ("setting", "content", "line"),
    [
        ("D2R_HTTP_TOKENS_FILE", "# prom metrics TOKEN\nprom metrics CHANGE-ME-0123456789ab\n", 2),
        ("D2R_HTTP_USERS_FILE", "ann:viewer:scrypt$CHANGE-ME\n", 1),
    ],
)
def test_credentials_files_refuse_the_placeholder(
    tmp_path: Path, setting: str, content: str, line: int
) -> None:
    path = tmp_path / "credentials"
    path.write_text(content)
    with pytest.raises(ConfigError, match=rf"^{setting}: {path} line {line} still") as info:
        ObservabilitySettings.from_env({setting: str(path)})
    assert "0123456789ab" not in str(info.value)


def test_the_shipped_database_secret_is_refused_until_replaced() -> None:
    url = _shipped_secrets()["d2r-database"]["D2R_DATABASE_URL"]
    with pytest.raises(ConfigError, match="^D2R_DATABASE_URL: "):
        NodeSettings.from_env({"D2R_DATABASE_URL": url})
    real = url.replace("CHANGE-ME", secrets.token_hex(16))
    assert NodeSettings.from_env({"D2R_DATABASE_URL": real}).database_url == real


def _refused_start(tmp_path: Path, tokens: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "tokens"
    path.write_text(tokens)
    env = base_env(
        D2R_SPOOL_DIR=str(tmp_path / "data" / "spool"),
        D2R_HTTP_PORT=str(free_port()),
        D2R_PORT=str(free_port()),
        D2R_BROKER_URL="filesystem://",
        D2R_HTTP_TOKENS_FILE=str(path),
    )
    return _d2r("node", env=env)


def test_d2r_node_with_a_placeholder_token_does_not_start(tmp_path: Path) -> None:
    token = "CHANGE-ME-" + secrets.token_hex(8)
    res = _refused_start(tmp_path, f"# metrics scraper\nprometheus metrics {token}\n")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "D2R_HTTP_TOKENS_FILE" in lines[0] and "line 2" in lines[0]
    assert token not in res.stderr + res.stdout
    assert not (tmp_path / "data").exists()  # stopped before anything was created


def test_the_shipped_http_token_is_refused(tmp_path: Path) -> None:
    tokens = _shipped_secrets()["d2r-http-credentials"]["tokens"]
    res = _refused_start(tmp_path, tokens)
    assert res.returncode == 2 and "D2R_HTTP_TOKENS_FILE" in res.stderr, res.stderr
    assert tokens.split()[-1] not in res.stderr


def test_d2r_node_refuses_a_token_over_cleartext(tmp_path: Path) -> None:
    token = tmp_path / "archive-token"
    token.write_text(secrets.token_hex(32))
    address = f"dicomweb+http://archive.example.org/rs?token_file={token}"
    env = base_env(
        D2R_SPOOL_DIR=str(tmp_path / "data" / "spool"),
        D2R_BROKER_URL="filesystem://",
        D2R_DESTINATIONS=address,
    )
    res = _d2r("node", env=env)
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert "D2R_DESTINATIONS" in line and address in line and "cleartext" in line
    assert token.read_text() not in res.stderr + res.stdout


# ------------------------------------------------------------------------- the warnings
def _files(tmp_path: Path, *names: str) -> dict[str, Path]:
    found = {}
    for name in names:
        found[name] = tmp_path / name
        found[name].write_text("-----BEGIN PLACEHOLDER-----\n")
    return found


def test_a_closed_node_warns_of_nothing(tmp_path: Path) -> None:
    f = _files(tmp_path, "cert", "key", "ca")
    node = NodeSettings(
        host="0.0.0.0",
        allowed_networks=NodeSettings.from_env(
            {"D2R_ALLOWED_NETWORKS": "10.0.0.0/8"}
        ).allowed_networks,
        tls=TlsSettings(f["cert"], f["key"], f["ca"], require_client_cert=True),
    )
    obs = ObservabilitySettings(http_host="0.0.0.0", http_tls_cert=f["cert"], http_tls_key=f["key"])
    assert exposure_warnings(node, obs) == ()
    # nothing leaves the host: nothing to warn of
    assert exposure_warnings(NodeSettings(host="::1"), ObservabilitySettings()) == ()


def test_each_open_door_is_one_line(tmp_path: Path) -> None:
    f = _files(tmp_path, "cert", "key", "ca")
    open_node = NodeSettings(host="0.0.0.0", tls=TlsSettings(f["cert"], f["key"]))
    obs = ObservabilitySettings(http_host="0.0.0.0", http_port=8443)
    got = exposure_warnings(open_node, obs)
    assert len(got) == 3 and all("\n" not in w for w in got)
    assert "any calling AE title from any address" in got[0]
    assert "does not check client certificates" in got[1] and "D2R_TLS_CA" in got[1]
    assert "0.0.0.0:8443" in got[2] and "without HTTPS" in got[2]
    optional = NodeSettings(host="127.0.0.1", tls=TlsSettings(f["cert"], f["key"], f["ca"]))
    (line,) = exposure_warnings(optional, ObservabilitySettings())
    assert "accepts clients without a certificate" in line
    https_ca = ObservabilitySettings(
        http_host="0.0.0.0", http_tls_cert=f["cert"], http_tls_key=f["key"], http_tls_ca=f["ca"]
    )
    (ingest,) = exposure_warnings(NodeSettings(host="127.0.0.1"), https_ca)
    assert "every client certificate this CA signs" in ingest and "ingest" in ingest
    # no endpoint, no endpoint warning
    off = ObservabilitySettings(http_host="0.0.0.0", http_port=0, http_tls_ca=f["ca"])
    assert exposure_warnings(NodeSettings(host="127.0.0.1"), off) == ()


@pytest.mark.integration
@pytest.mark.parametrize("processes", [1, 2])
def test_d2r_node_logs_each_warning_once(tmp_path: Path, processes: int) -> None:
    http_port = free_port()
    env = base_env(
        D2R_HOST="0.0.0.0",
        D2R_PORT=str(free_port()),
        D2R_HTTP_HOST="0.0.0.0",
        D2R_HTTP_PORT=str(http_port),
        D2R_SPOOL_DIR=str(tmp_path / "data" / "spool"),
        D2R_MIN_FREE_BYTES="0",
        D2R_BROKER_URL="filesystem://",
        D2R_LISTENER_PROCESSES=str(processes),
    )
    node = Process(d2r_cmd("node"), env=env, log=tmp_path / "node.log")
    try:
        wait_for(lambda: "listening as" in node.log_tail(20000), 60, "the node's start")
        if processes > 1:
            wait_for(lambda: "listener process 2 serving" in node.log_tail(20000), 60, "listener 2")
    finally:
        node.stop()
    log = (tmp_path / "node.log").read_text()
    aet = [line for line in log.splitlines() if "accepts any calling AE title" in line]
    http = [line for line in log.splitlines() if "without HTTPS" in line]
    assert len(aet) == 1 and len(http) == 1, log
    assert "WARNING" in aet[0] and f"0.0.0.0:{http_port}" in http[0]


# ------------------------------------------------------------------------- http-user
def test_without_user_keeps_the_others() -> None:
    lines = ["# admins", "ann:viewer:scrypt$a", "annie:metrics:scrypt$b"]
    assert without_user(lines, "ann") == (["# admins", "annie:metrics:scrypt$b"], True)
    assert without_user(lines, "bob") == (lines, False)


def test_http_user_remove(tmp_path: Path) -> None:
    users = tmp_path / "users"
    env = base_env()
    for name in ("ann", "bob"):
        added = _d2r(
            "http-user", name, "--role", "viewer", "--file", str(users), "--password-stdin",
            env=env, stdin="correct horse battery\n",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert "picks the change up" in added.stdout  # no systemd unit loads this file
    users.chmod(0o640)
    removed = _d2r("http-user", "ann", "--remove", "--file", str(users), env=env)
    assert removed.returncode == 0, removed.stderr
    assert f"removed ann from {users}" in removed.stdout
    assert set(read_users(users)) == {"bob"}
    assert users.stat().st_mode & 0o777 == 0o640  # the mode is kept
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    unknown = _d2r("http-user", "ann", "--remove", "--file", str(users), env=env)
    assert unknown.returncode == 1 and "no user 'ann'" in unknown.stderr
    both = _d2r("http-user", "bob", "--remove", "--role", "viewer", "--file", str(users), env=env)
    assert both.returncode == 2 and set(read_users(users)) == {"bob"}
    missing = _d2r("http-user", "x", "--remove", "--file", str(tmp_path / "none"), env=env)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_http_user_refuses_the_placeholder_password(tmp_path: Path) -> None:
    users = tmp_path / "users"
    res = _d2r(
        "http-user", "ann", "--role", "viewer", "--file", str(users), "--password-stdin",
        env=base_env(), stdin="CHANGE-ME-please\n",
    )  # fmt: skip
    assert res.returncode == 1 and "placeholder" in res.stderr and not users.exists()


def test_remove_user_is_atomic_and_keeps_the_mode(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("ann:viewer:scrypt$a\nbob:viewer:scrypt$b\n")
    users.chmod(0o600)
    remove_user(users, "bob")
    assert users.read_text() == "ann:viewer:scrypt$a\n"
    assert users.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="no user 'bob'"):
        remove_user(users, "bob")


def test_the_message_says_when_a_change_takes_effect() -> None:
    units = {
        "d2r-node.service": "[Service]\nLoadCredential=http-users:/etc/d2r/http-users\n",
        "d2r-worker@.service": "LoadCredential = http-users:/etc/d2r/../d2r/http-users\n",
        "d2r-other.service": "LoadCredential=http-tokens:/etc/d2r/http-tokens\n",
    }
    path = Path("/etc/d2r/http-users")
    loading = units_loading(path, units)
    assert loading == ("d2r-node.service", "d2r-worker@.service")
    message = when_effective(path, loading)
    assert "systemctl restart d2r-node.service 'd2r-worker@*.service'" in message
    assert "re-reads" not in message and "picks the change up" in when_effective(path, ())
    assert units_loading(Path("/srv/users"), units) == ()
