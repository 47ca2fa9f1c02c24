"""Requests found by the fuzzing campaign (``fuzz/stow.py``, inputs in fuzz/regressions/stow).

A Content-Length is ASCII digits: "5\u00b3" passes ``str.isdigit()`` but not ``int()``.
"""

from __future__ import annotations

import io
from pathlib import Path

from dicom_node.spool import Spool
from dicom_node.stow import StowReceiver
from studydb.store import StudyStore


def test_content_length_not_ascii_digits(tmp_path: Path) -> None:
    store = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    try:
        receiver = StowReceiver(Spool(tmp_path / "spool"), store)
        headers = {
            "content-type": 'multipart/related; type="application/dicom"; boundary=b',
            "content-length": "5\u00b3",
        }
        body = io.BytesIO(b"--b--\r\n")
        status, _, _ = receiver("POST", "/dicom-web/studies", headers, body, "127.0.0.1", "x")
        assert status == 400
    finally:
        store.close()
