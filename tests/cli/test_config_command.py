"""``d2r config``: the settings reference, and ``--check``: the effective configuration with its
sources, secrets masked, or the one-line error of an invalid value."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli.commands.config import declared_settings
from cli.main import main

DB_PASSWORD = "s3cret-pw-91"
BROKER_TOKEN = "t0ken-redis-77"
OTHER_TOKEN = "tok-not-a-setting-55"


@pytest.fixture(autouse=True)
def _no_d2r_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("D2R_"):
            monkeypatch.delenv(name)


def _rows(out: str) -> dict[str, tuple[str, str]]:
    """``name -> (source, value)`` of the ``--check`` table."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("D2R_"):
            name, source_value = line.split(maxsplit=1)
            source, _, value = source_value.partition("  ")
            rows[name] = (source.strip(), value.strip())
    return rows


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "d2r.env"
    path.write_text(text, encoding="utf-8")
    return path


def test_check_reports_every_setting_and_where_it_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(
        tmp_path, "D2R_AE_TITLE=FROMFILE\nD2R_PORT=104\nD2R_SPOOL_DIR=/srv/d2r/spool\n"
    )
    monkeypatch.setenv("D2R_PORT", "4242")  # the environment overrides the file
    monkeypatch.setenv("D2R_HTTP_HOST", "0.0.0.0")
    monkeypatch.setenv("D2R_LOG_FORMAT", "")  # blank: the default
    assert main(["--config", str(config), "config", "--check"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.splitlines()[0] == f"Configuration file: {config}"
    rows = _rows(captured.out)
    assert set(rows) == {s.name for s in declared_settings()}
    assert rows["D2R_AE_TITLE"] == ("config file", "FROMFILE")
    assert rows["D2R_PORT"] == ("environment", "4242")
    assert rows["D2R_HTTP_HOST"] == ("environment", "0.0.0.0")
    assert rows["D2R_LOG_FORMAT"] == ("default", "text")
    assert rows["D2R_HTTP_PORT"] == ("default", "8080")
    # computed defaults follow the settings they depend on
    assert rows["D2R_DATABASE_URL"] == ("default", "sqlite:////srv/d2r/d2r.db")
    assert rows["D2R_AUDIT_LOG"] == ("default", "/srv/d2r/audit.jsonl")
    assert rows["D2R_VISIBILITY_TIMEOUT"] == ("default", "720")
    assert rows["D2R_ALLOWED_CALLING_AETS"] == ("default", "any")


def test_check_masks_passwords_and_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(
        tmp_path,
        f"D2R_DATABASE_URL=postgresql+psycopg://d2r:{DB_PASSWORD}@db.example.org/d2r\n"
        f"D2R_API_TOKEN={OTHER_TOKEN}\n",
    )
    monkeypatch.setenv("D2R_BROKER_URL", f"redis://:{BROKER_TOKEN}@redis.example.org:6379/0")
    assert main(["config", "--check", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    for secret in (DB_PASSWORD, BROKER_TOKEN, OTHER_TOKEN):
        assert secret not in captured.out + captured.err
    rows = _rows(captured.out)
    assert rows["D2R_DATABASE_URL"] == (
        "config file",
        "postgresql+psycopg://d2r:***@db.example.org/d2r",
    )
    assert rows["D2R_BROKER_URL"] == ("environment", "redis://:***@redis.example.org:6379/0")
    # a D2R_* name no setting reads is listed, without its value
    assert rows["D2R_API_TOKEN"] == ("config file", "(not a d2r setting: ignored)")


def test_check_reads_d2r_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("D2R_CONFIG", str(_config(tmp_path, "D2R_MAX_ATTEMPTS=7\n")))
    assert main(["config", "--check"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["D2R_MAX_ATTEMPTS"] == ("config file", "7")
    assert "D2R_CONFIG" not in rows


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("D2R_PORT=70000\n", "D2R_PORT: port must be in 1..65535, got 70000"),
        (
            "D2R_TASK_TIME_LIMIT=800\nD2R_VISIBILITY_TIMEOUT=700\n",
            "D2R_VISIBILITY_TIMEOUT: must exceed D2R_TASK_TIME_LIMIT (800 s) or a healthy task "
            "runs twice",
        ),
        ("D2R_HTTP_PORT=x\n", "D2R_HTTP_PORT: port must be an integer, got 'x'"),
        ("D2R_DESTINATIONS=PACS@pacs\n", "D2R_DESTINATIONS: "),
        (
            f"D2R_DATABASE_URL=postgresql://d2r:{DB_PASSWORD}-CHANGE-ME@db/d2r\n",
            "D2R_DATABASE_URL: still holds the CHANGE-ME placeholder",
        ),
    ],
)
def test_check_fails_with_the_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    config = _config(tmp_path, text)
    assert main(["--config", str(config), "config", "--check"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"d2r config: configuration error: {expected}")
    assert DB_PASSWORD not in line


def test_check_refuses_an_unreadable_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "--check", "--config", str(tmp_path / "missing.env")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("d2r config: configuration error: D2R_CONFIG: cannot read")


def test_config_lists_every_setting_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for setting in declared_settings():
        assert f"\n{setting.name} (default: " in f"\n{out}"
    assert "D2R_DATABASE_URL (default: sqlite:///<spool>/../d2r.db)" in out
