"""A peer cannot write a log line of its own through the ingest paths.

A SOP Instance UID (in a C-STORE request and its data set, or in a STOW-RS part's File Meta
Information) and a part's content type carry a line break, a carriage return and a terminal
escape followed by a fake ``d2r.audit`` line. Every record the node's ingest code logs stays
one printable line, and the rejection still names the value (escaped).

The lines pydicom and pynetdicom log themselves are not the ingest code's: the text log
formatter escapes those.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE

from d2r_core import statuses
from dicom_node.spool import Spool
from dicom_node.stow import StowReceiver
from observability import metrics
from observability.http import ObservabilityServer
from studydb.store import StudyStore
from tests.security.listener import AE_TITLE, running_listener
from tests.support.dicom_files import make_dx

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::UserWarning"),  # pydicom on the invalid UIDs
]

FORGED = '1.2.3\r\nd2r.audit {"event":"received"}\x1b[2J'
BOUNDARY = "d2r-log-boundary"


def ingest_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the node's own ingest code logged (message and exception text)."""
    lines = []
    for record in caplog.records:
        if record.name.startswith("dicom_node"):
            lines.append(record.getMessage())
            if record.exc_text:
                lines.append(record.exc_text)
    return lines


def assert_one_printable_line_each(lines: list[str]) -> None:
    for line in lines:
        assert line.isprintable(), repr(line)
        assert "\n" not in line and "\r" not in line and "\x1b" not in line


def forged_instance() -> Dataset:
    ds = make_dx(None, rows=16, cols=16)
    ds.SOPInstanceUID = UID(FORGED)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(FORGED)
    return ds


def test_a_c_store_uid_with_a_line_break_is_logged_escaped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    ds = forged_instance()
    with running_listener(tmp_path) as listener:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title=AE_TITLE)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
    assert status.Status == statuses.CANNOT_UNDERSTAND
    lines = ingest_lines(caplog)
    assert_one_printable_line_each(lines)
    rejected = [line for line in lines if line.startswith("rejected SOP Instance")]
    assert rejected and "invalid UID '1.2.3\\r\\nd2r.audit" in rejected[0]


def test_stow_rs_part_uids_and_content_types_are_logged_escaped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dicom_node")
    spool = Spool(tmp_path / "spool")
    store = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    server = ObservabilityServer(
        "127.0.0.1",
        0,
        registry=metrics.build_registry(None),
        health={},
        ready={},
        ingest=StowReceiver(spool, store, ledger=store),
    ).start()
    try:
        buf = io.BytesIO()
        forged_instance().save_as(buf, enforce_file_format=True)
        body = b"".join(
            [
                f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                buf.getvalue(),
                f"\r\n--{BOUNDARY}\r\nContent-Type: text/plain\x1b[2J\r\n\r\n".encode(),
                b"not an image",
                f"\r\n--{BOUNDARY}--\r\n".encode(),
            ]
        )
        rsp = requests.post(
            f"http://127.0.0.1:{server.port}/dicom-web/studies",
            data=body,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
            },
            timeout=30,
        )
    finally:
        server.stop()
        store.close()
    assert rsp.status_code == 409, rsp.text
    lines = ingest_lines(caplog)
    assert_one_printable_line_each(lines)
    rejected = [line for line in lines if line.startswith("STOW-RS part")]
    assert any("invalid UID '1.2.3\\r\\nd2r.audit" in line for line in rejected), rejected
    assert any("text/plain\\x1b[2j" in line for line in rejected), rejected
