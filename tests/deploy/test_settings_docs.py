"""The settings are declared once in the code: the README's table, the systemd example and the
Kubernetes ConfigMap are generated from the declarations (``scripts/settings_docs.py``) and must
be current; every ``D2R_*`` name the product reads is declared, and every declared default is
what its parser makes of the default's text."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli.commands.config import NOT_SETTINGS, declared_settings
from scripts import settings_docs

ROOT = Path(__file__).resolve().parents[2]
# Python packages of the product: every top-level package but the tests, benchmarks and fuzzers.
PRODUCT_PACKAGES = sorted(
    {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench", "fuzz"}
)
_NAME = re.compile(r"D2R_[A-Z0-9_]+")


def test_generated_settings_documentation_is_current() -> None:
    stale = settings_docs.stale()
    assert stale == [], (
        f"generated from the settings declarations but stale: {', '.join(map(str, stale))}; "
        f"run: {settings_docs.COMMAND}"
    )


def test_check_names_a_stale_file_and_the_command(tmp_path: Path) -> None:
    for target in settings_docs.TARGETS:
        (tmp_path / target.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / target.path, tmp_path / target.path)
    readme = tmp_path / settings_docs.README
    readme.write_text(readme.read_text().replace("| DICOM port |", "| the port |"))
    assert settings_docs.stale(tmp_path) == [settings_docs.README]
    env = tmp_path / settings_docs.ENV_EXAMPLE
    env.write_text(env.read_text().replace("# END GENERATED SETTINGS", "# the end"))
    with pytest.raises(ValueError, match="END GENERATED SETTINGS"):
        settings_docs.generate(tmp_path)


def test_the_check_command_passes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.settings_docs", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_every_setting_the_product_reads_is_declared() -> None:
    declared = {s.name for s in declared_settings()}
    read: dict[str, set[str]] = {}
    for package in PRODUCT_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and _NAME.fullmatch(str(node.value)):
                    read.setdefault(str(node.value), set()).add(str(path.relative_to(ROOT)))
    undeclared = {name: files for name, files in read.items() if name not in declared}
    assert set(undeclared) <= set(NOT_SETTINGS), undeclared


def test_settings_are_read_only_through_their_declarations() -> None:
    for package in PRODUCT_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.parent.name == "d2r_core":
                continue
            assert "env_setting(" not in path.read_text(encoding="utf-8"), path


def test_declared_defaults_parse_back_to_themselves() -> None:
    for setting in declared_settings():
        text = setting.text_default
        if text and setting.name not in {"D2R_NODE_NAME"}:
            assert setting.parse(text) == setting.default, setting.name


def test_the_examples_name_only_declared_settings_and_valid_values() -> None:
    settings = {s.name: s for s in declared_settings()}
    for profile in (settings_docs.SYSTEMD, settings_docs.KUBERNETES):
        for name, example in profile.items():
            if name.endswith(("_FILE", "_CERT", "_KEY", "_CA", "_SHA256")):
                continue  # files that exist only where deployed; a placeholder hash
            values = [example.value] if example.value is not None else []
            values += [value for _, value in example.alternatives]
            for value in values:
                if "CHANGE-ME" not in value:  # a placeholder is refused on purpose
                    settings[name].parse(value)
