"""The settings table of ``README.md``: the one list of documented ``D2R_*`` settings."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_settings() -> set[str]:
    """Every ``D2R_*`` name in the first column of the README's settings table."""
    return {
        word.strip("`")
        for line in README.read_text(encoding="utf-8").splitlines()
        if line.startswith("| `D2R_")
        for word in line.split("|")[1].replace("/", " ").split()
    }
