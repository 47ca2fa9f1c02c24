"""Association control on the real listener: calling-AE and address allowlists, called AE, limits.

Every refusal must be an A-ASSOCIATE-RJ (not a silent drop), logged with its reason, counted in
``d2r_associations_total{result="rejected"}`` and written to the audit log.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE

from d2r_core.errors import ConfigError
from dicom_node.settings import NodeSettings
from tests.security.listener import AE_TITLE, running_listener, sample, storescu
from tests.support.dicom_files import make_dx
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration

VERIFICATION = "1.2.840.10008.1.1"


def _rejected(reason: str) -> float:
    return sample("d2r_associations_total", {"result": "rejected", "reason": reason})


def _counted(reason: str, expected: float) -> bool:
    """The listener counts right after it answers: give its thread a moment."""
    try:
        wait_for(lambda: _rejected(reason) == expected, 5, f"{reason} counted", interval=0.05)
    except TimeoutError:
        return False
    return True


def _associate(port: int, *, aet: str = "MODALITY", source: str = "127.0.0.1") -> Any:
    ae = AE(ae_title=aet)
    ae.acse_timeout = 5
    ae.network_timeout = 5
    ae.add_requested_context(VERIFICATION)
    return ae.associate("127.0.0.1", port, ae_title=AE_TITLE, bind_address=(source, 0))


def test_settings_parse_allowlists() -> None:
    s = NodeSettings.from_env(
        {
            "D2R_ALLOWED_CALLING_AETS": "PACS_STORE, PACS_QR,PACS_STORE",
            "D2R_ALLOWED_NETWORKS": "10.0.0.0/8, ::1",
        }
    )
    assert s.allowed_calling_aets == ("PACS_STORE", "PACS_QR")
    assert [str(n) for n in s.allowed_networks] == ["10.0.0.0/8", "::1/128"]
    for setting, value in (
        ("D2R_ALLOWED_NETWORKS", "10.0.0.0/33"),
        ("D2R_ALLOWED_NETWORKS", "pacs.example.org"),
        ("D2R_ALLOWED_CALLING_AETS", "A_TITLE_LONGER_THAN_16"),
    ):
        with pytest.raises(ConfigError) as info:
            NodeSettings.from_env({setting: value})
        assert info.value.setting == setting


def test_unknown_calling_ae_is_rejected_and_a_listed_one_stores(tmp_path: Path) -> None:
    image = tmp_path / "dx.dcm"
    ds = make_dx(image, rows=64, cols=48)
    with running_listener(tmp_path, D2R_ALLOWED_CALLING_AETS="PACS_STORE,PACS_QR") as node:
        before = _rejected("calling_ae_not_recognised")
        assoc = _associate(node.port, aet="INTRUDER")
        assert assoc.is_rejected
        primitive = assoc.acceptor.primitive
        assert (primitive.result, primitive.result_source, primitive.diagnostic) == (1, 1, 3)
        assert _counted("calling_ae_not_recognised", before + 1)

        res = storescu(node.port, image, aet="PACS_STORE")
        assert res.returncode == 0, res.stderr
        (record,) = node.store.instances(ds.StudyInstanceUID)
        assert record.calling_ae_title == "PACS_STORE"
        audit = node.audit_lines("association")
        rejected = [x for x in audit if x["result"] == "rejected"]
        assert [(x["calling_ae_title"], x["reason"]) for x in rejected] == [
            ("INTRUDER", "calling_ae_not_recognised")
        ]
        received = node.audit_lines("received")
        assert [x["calling_ae_title"] for x in received] == ["PACS_STORE"]


def test_peer_outside_the_networks_is_rejected_before_negotiation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with running_listener(tmp_path, D2R_ALLOWED_NETWORKS="127.0.0.1/32, 10.0.0.0/8") as node:
        before = _rejected("peer_address_not_allowed")
        outsider = _associate(node.port, source="127.0.0.2")
        assert outsider.is_rejected
        primitive = outsider.acceptor.primitive
        assert (primitive.result, primitive.result_source, primitive.diagnostic) == (1, 1, 1)
        assert _counted("peer_address_not_allowed", before + 1)
        (line,) = [x for x in node.audit_lines("association") if x["result"] == "rejected"]
        assert line["peer_address"] == "127.0.0.2"
        assert line["reason"] == "peer_address_not_allowed"
        assert line["calling_ae_title"] == "MODALITY"
        assert any("peer_address_not_allowed" in r.getMessage() for r in caplog.records)

        insider = _associate(node.port, source="127.0.0.1")
        assert insider.is_established
        insider.release()


def test_both_lists_apply_independently(tmp_path: Path) -> None:
    with running_listener(
        tmp_path, D2R_ALLOWED_NETWORKS="127.0.0.1", D2R_ALLOWED_CALLING_AETS="PACS_STORE"
    ) as node:
        assert _associate(node.port, aet="PACS_STORE", source="127.0.0.2").is_rejected
        assert _associate(node.port, aet="OTHER", source="127.0.0.1").is_rejected
        ok = _associate(node.port, aet="PACS_STORE", source="127.0.0.1")
        assert ok.is_established
        ok.release()


def test_called_ae_and_association_limit(tmp_path: Path) -> None:
    with running_listener(tmp_path, D2R_MAX_ASSOCIATIONS="1") as node:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(VERIFICATION)
        wrong = ae.associate("127.0.0.1", node.port, ae_title="NOT_D2R")
        assert wrong.is_rejected
        primitive = wrong.acceptor.primitive
        assert primitive is not None and primitive.diagnostic == 7
        # pynetdicom counts an association against the limit until its thread has ended
        wait_for(lambda: not node.server.ae.active_associations, 10, "the rejected association")

        before = _rejected("local_limit_exceeded")
        first = _associate(node.port)
        assert first.is_established
        second = _associate(node.port)
        try:
            assert second.is_rejected
            assert second.acceptor.primitive.result == 2  # transient: try again later
            assert _counted("local_limit_exceeded", before + 1)
        finally:
            first.release()
        wait_for(lambda: not node.server.ae.active_associations, 10, "the released associations")
        third = _associate(node.port)
        assert third.is_established
        third.release()


def test_timeouts_and_pdu_are_applied(tmp_path: Path) -> None:
    with running_listener(
        tmp_path,
        D2R_ACSE_TIMEOUT="3",
        D2R_DIMSE_TIMEOUT="4",
        D2R_NETWORK_TIMEOUT="2",
        D2R_MAX_PDU="65536",
    ) as node:
        assoc = _associate(node.port)
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == 65536
        ae = node.server.ae
        assert (ae.acse_timeout, ae.dimse_timeout, ae.network_timeout) == (3, 4, 2)
        # an idle association is closed by the network timeout, not held for ever
        deadline = time.monotonic() + 10
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not assoc.is_established
