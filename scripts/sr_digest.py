"""Digests of the Structured Reports d2r wrote, for comparing two releases on the same input.

Each SR is read, its dates, times and date-times (VR DA, TM, DT: the moment it was made) are
removed, and the rest is written back out and hashed; two releases that produce the
same objects from the same study and checkpoint print the same lines.

    python scripts/sr_digest.py FILE_OR_FOLDER...

Prints one line per SR: the digest, the SOP Class and the SOP Instance UID.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

#: value representations of the moment an object was made (dates, times, date-times): an SR
#: made a second later differs only in these
VOLATILE_VRS = ("DA", "TM", "DT")


def _strip(ds: Dataset) -> None:
    for element in list(ds):
        if element.VR in VOLATILE_VRS:
            del ds[element.tag]
        elif element.VR == "SQ":
            for item in element.value:
                _strip(item)


def digest(path: Path) -> tuple[str, str, str]:
    """(digest, SOP Class UID, SOP Instance UID) of one SR without its volatile attributes."""
    ds = pydicom.dcmread(path)
    _strip(ds)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return hashlib.sha256(out.getvalue()).hexdigest(), str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def main(argv: list[str]) -> int:
    paths: list[Path] = []
    for arg in argv:
        p = Path(arg)
        paths.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    for path in paths:
        try:
            line = digest(path)
        except Exception as exc:  # not a DICOM file: say so and go on
            print(f"skipped {path.name}: {type(exc).__name__}", file=sys.stderr)
            continue
        print(*line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
