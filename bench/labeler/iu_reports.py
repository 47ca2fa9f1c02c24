"""Indiana University chest X-ray reports with the NLM indexers' MeSH terms (even ids only).

The reports ship inside the PyPI ``torchxrayvision`` wheel as ``NLMCXR_reports.tgz`` (licence
CC BY-NC-ND 4.0). They are fetched at run time with ``pip download`` into a cache folder and
never committed. Only reports with an **even** numeric id are read: the odd ids are kept as an
independent check of the labeler, so their members are skipped by name before any parsing.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

WHEEL_MEMBER = "torchxrayvision/data/NLMCXR_reports.tgz"
_MEMBER_ID = re.compile(r"(?:^|/)(\d+)\.xml$")


@dataclass(frozen=True)
class IUReport:
    """One report: numeric id, findings + impression text and its MeSH major headings."""

    id: int
    text: str
    mesh: tuple[str, ...]


def fetch_archive(cache: Path) -> Path:
    """The reports archive, extracted from a ``pip download``-ed torchxrayvision wheel (cached)."""
    archive = cache / "NLMCXR_reports.tgz"
    if archive.exists():
        return archive
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("torchxrayvision-*.whl"))
    if not wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--dest",
                str(cache),
                "torchxrayvision",
            ],
            check=True,
        )
        wheels = sorted(cache.glob("torchxrayvision-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(WHEEL_MEMBER) as src:
        tmp = archive.with_suffix(".part")
        tmp.write_bytes(src.read())
        tmp.replace(archive)
    return archive


def member_id(name: str) -> int | None:
    """Numeric report id of an archive member name (``ecgen-radiology/12.xml`` -> 12)."""
    m = _MEMBER_ID.search(name)
    return int(m.group(1)) if m else None


def _parse(report_id: int, data: bytes) -> IUReport:
    root = ET.fromstring(data)
    parts = []
    for node in root.iter("AbstractText"):
        if node.get("Label") in ("FINDINGS", "IMPRESSION") and node.text and node.text.strip():
            parts.append(node.text.strip())
    mesh = tuple(m.text.strip() for m in root.iter("major") if m.text and m.text.strip())
    return IUReport(report_id, "\n".join(parts), mesh)


def even_reports(archive: Path) -> Iterator[IUReport]:
    """Reports with an even id, in id order; odd-id members are never read."""
    with tarfile.open(archive, "r:gz") as tar:
        members = []
        for member in tar:
            rid = member_id(member.name)
            if member.isfile() and rid is not None and rid % 2 == 0:
                members.append((rid, member))
        for rid, member in sorted(members, key=lambda x: x[0]):
            f = tar.extractfile(member)
            if f is not None:
                yield _parse(rid, f.read())
