"""Associations found by the fuzzing campaign (``fuzz/cstore.py``, inputs in
fuzz/regressions/cstore), replayed against a listener started as ``d2r node`` starts it, and
the other ways an association can end with a data set half received.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from types import SimpleNamespace

import pytest
from pydicom.uid import ExplicitVRLittleEndian as EXPLICIT
from pynetdicom import evt
from pynetdicom.dul import DULServiceProvider

from dicom_node.scp import AssociationStudies
from fuzz import REGRESSIONS_DIR
from fuzz._harness import STRICT_ENV
from fuzz.cstore import DX, harness
from tests.dicom_node.node_harness import Node
from tests.support import upper_layer


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_streamed_file_of_a_killed_dul(monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-STORE streamed into spool/tmp, then a PDU of unknown type: pynetdicom's DUL thread
    dies (InvalidEventError, 'Evt15' in 'Sta13') and EVT_CONN_CLOSE never fires; the streamed
    ``.part`` file is removed when the association's thread exits, and every property of the
    target holds."""
    monkeypatch.setenv(STRICT_ENV, "1")
    data = (REGRESSIONS_DIR / "cstore" / "streamed-data-set-then-invalid-pdu").read_bytes()
    with harness() as one_input:
        one_input(data)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_streamed_file_of_a_dead_association_thread(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The association's own thread dies on an exception while a data set streams in: its
    ``.part`` file is removed, its DUL thread stopped and the connection closed."""
    tmp_dir = node.spool.tmp_dir
    checked = DULServiceProvider.idle_timer_expired

    def idle_timer_expired(self: DULServiceProvider) -> bool:
        if self.assoc.is_acceptor and any(tmp_dir.iterdir()):
            raise RuntimeError("the association's thread dies")
        return checked(self)

    monkeypatch.setattr(DULServiceProvider, "idle_timer_expired", idle_timer_expired)
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(
            upper_layer.associate_rq(node.settings.ae_title, "CUTTER", [(1, DX, EXPLICIT)])
        )
        assert sock.recv(65536)[:1] == bytes([upper_layer.ASSOCIATE_AC])
        data_set = upper_layer.p_data(1, bytes(64 * 1024), command=False, fragment=4096)
        sock.sendall(
            upper_layer.p_data(1, upper_layer.c_store_rq(1, DX, "1.2.3.4"), command=True)
            + data_set[: len(data_set) // 2]  # half the data set: the file stays open
        )
        deadline = time.monotonic() + 10
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                closed = sock.recv(65536) == b""
            except ConnectionResetError:
                closed = True
        assert closed, "the listener closes the connection of the dead association"
    deadline = time.monotonic() + 10
    while list(tmp_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list(tmp_dir.iterdir()) == []
    assert node.store.instances == []


class _Ledger:
    """Records what AssociationStudies tells the study database."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...], bool | None]] = []

    def open_association(self, study_uid: str) -> None:
        self.calls.append(("open", (study_uid,), None))

    def close_association(self, study_uids: Sequence[str], *, released: bool) -> None:
        self.calls.append(("close", tuple(study_uids), released))


def test_an_association_whose_thread_dies_stops_counting() -> None:
    """No EVT_ABORTED or EVT_CONN_CLOSE comes from an association whose DUL thread died: the
    study stops counting it when the association's thread exits, and only once."""
    ledger = _Ledger()
    studies = AssociationStudies(ledger)
    handlers = dict(studies.handlers())

    def dies() -> None:
        raise RuntimeError("the DUL thread died")

    assoc = SimpleNamespace(run=dies)
    handlers[evt.EVT_CONN_OPEN](SimpleNamespace(assoc=assoc))
    studies.stored(assoc, "1.2.3")
    with pytest.raises(RuntimeError):
        assoc.run()
    handlers[evt.EVT_CONN_CLOSE](SimpleNamespace(assoc=assoc))  # if it came after all: no-op
    assert ledger.calls == [("open", ("1.2.3",), None), ("close", ("1.2.3",), False)]
