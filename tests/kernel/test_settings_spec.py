"""Setting declarations: reading through ``env_setting``, computed defaults, sources, masking."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from d2r_core.config import int_at_least
from d2r_core.errors import ConfigError
from d2r_core.settings_spec import (
    DEFAULT,
    ENVIRONMENT,
    FILE,
    Group,
    Setting,
    catalogue,
    format_value,
    mask_secret,
)

SPOOL = Setting("D2R_SPOOL_DIR", Path("data/spool"), Path, "spool", Group.STORAGE)


def _beside_spool(env: Mapping[str, str]) -> Path:
    return SPOOL.read(env).parent / "audit.jsonl"


AUDIT = Setting(
    "D2R_AUDIT_LOG",
    Path("data/audit.jsonl"),
    Path,
    "audit log",
    Group.AUDIT,
    shown="`<spool>/../audit.jsonl`",
    default_from=_beside_spool,
)
COUNT = Setting("D2R_MAX_ATTEMPTS", 3, int_at_least(1), "attempts", Group.ASSEMBLY)
URL = Setting("D2R_DATABASE_URL", "sqlite:///d.db", str, "db", Group.STORAGE, secret=True)


def test_read_strips_treats_blank_as_unset_and_names_the_setting() -> None:
    assert COUNT.read({"D2R_MAX_ATTEMPTS": " 5 "}) == 5
    assert COUNT.read({"D2R_MAX_ATTEMPTS": "  "}) == 3
    assert COUNT.read({}) == 3
    with pytest.raises(ConfigError) as info:
        COUNT.read({"D2R_MAX_ATTEMPTS": "0"})
    assert (info.value.setting, str(info.value)) == (
        "D2R_MAX_ATTEMPTS",
        "D2R_MAX_ATTEMPTS: must be >= 1, got 0",
    )


def test_default_and_parser_overrides() -> None:
    assert COUNT.read({}, default=9) == 9
    assert COUNT.read({"D2R_MAX_ATTEMPTS": "7"}, default=9) == 7
    assert COUNT.read({"D2R_MAX_ATTEMPTS": "7"}, parse=lambda t: int(t) * 2) == 14


def test_computed_default_follows_the_settings_it_depends_on() -> None:
    assert AUDIT.read({}) == Path("data/audit.jsonl")
    assert AUDIT.read({"D2R_SPOOL_DIR": "/srv/spool"}) == Path("/srv/audit.jsonl")
    assert AUDIT.read({"D2R_AUDIT_LOG": "/a.jsonl"}) == Path("/a.jsonl")
    assert AUDIT.text_default == "" and AUDIT.shown_default == "`<spool>/../audit.jsonl`"
    assert COUNT.text_default == "3" and COUNT.shown_default == "`3`"


def test_source_environment_over_file_over_default() -> None:
    file = {"D2R_MAX_ATTEMPTS": "4"}
    assert COUNT.source(file, {"D2R_MAX_ATTEMPTS": "5"}) == ENVIRONMENT
    assert COUNT.source(file, {}) == FILE
    assert COUNT.source({}, {}) == DEFAULT
    # a blank environment value overrides the file with the default (merged_environment does)
    assert COUNT.source(file, {"D2R_MAX_ATTEMPTS": ""}) == DEFAULT


def test_shown_value_masks_secrets_only() -> None:
    env = {"D2R_DATABASE_URL": "postgresql://d2r:pw123@db/d2r", "D2R_MAX_ATTEMPTS": "4"}
    assert URL.shown_value(env) == "postgresql://d2r:***@db/d2r"
    assert COUNT.shown_value(env) == "4"
    assert URL.shown_value({}) == "sqlite:///d.db"
    assert AUDIT.shown_value({"D2R_SPOOL_DIR": "/srv/spool"}) == "/srv/audit.jsonl"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgresql+psycopg://d2r:pw@db:5432/d2r", "postgresql+psycopg://d2r:***@db:5432/d2r"),
        ("redis://:pw@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://tok3n@redis:6379/0", "rediss://***@redis:6379/0"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        (
            "sentinel://:pw@a:26379;sentinel://:pw@b:26379",
            "sentinel://:***@a:26379;sentinel://:***@b:26379",
        ),
        (
            "postgresql://db/d2r?user=d&password=pw&sslmode=on",
            "postgresql://db/d2r?user=d&password=***&sslmode=on",
        ),
        ("https://h/x?access_token=abc", "https://h/x?access_token=***"),
        ("not a url, maybe a password", "***"),
        ("", ""),
    ],
)
def test_mask_secret(text: str, masked: str) -> None:
    assert mask_secret(text) == masked
    assert "pw" not in mask_secret(text).replace("pwd", "")


def test_format_value() -> None:
    assert format_value(None) == ""
    assert (format_value(False), format_value(1.5), format_value(600.0)) == ("false", "1.5", "600")
    assert format_value(frozenset({"b", "a"})) == "a,b"
    assert format_value(Path("/x")) == "/x"


def test_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="D2R_"):
        Setting("PORT", 1, int, "port", Group.LISTENER)
    with pytest.raises(ValueError, match="one line"):
        Setting("D2R_PORT", 1, int, "a | b", Group.LISTENER)
    with pytest.raises(ValueError, match="declared twice"):
        catalogue([COUNT], [COUNT])
    ordered = catalogue([URL, COUNT, SPOOL])
    assert [s.name for s in ordered] == ["D2R_DATABASE_URL", "D2R_SPOOL_DIR", "D2R_MAX_ATTEMPTS"]
