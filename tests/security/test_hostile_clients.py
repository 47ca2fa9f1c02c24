"""Hostile clients against the real processes (``tests/security/hostile_clients.py``).

One test per topology: ``d2r serve``, and ``d2r node`` + ``d2r worker`` over Redis and
PostgreSQL. Each prints the table (probe, answer, peak resident-set growth of each process),
appends it to ``test-artifacts/hostile-clients.txt``, and holds every probe to its expected
answer, every probe's growth under 200 MiB per process, the processes alive afterwards and every
acknowledged instance in the study database and on disk.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.security.hostile_clients import STACKS, format_table, run, write_table

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("stack", STACKS)
def test_hostile_clients(stack: str, tmp_path: Path) -> None:
    started = time.monotonic()
    rows = run(stack, tmp_path)
    text = format_table(
        rows, f"hostile clients against d2r {stack} ({time.monotonic() - started:.0f} s)"
    )
    print(text)
    write_table(text)
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n".join(
        ["probes failed:", *(f"{r.probe}: {r.answer} {r.growth}" for r in failed), "", text]
    )
