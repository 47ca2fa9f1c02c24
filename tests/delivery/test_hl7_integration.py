"""The HL7 destination against a real HL7 receiver process (hl7apy's MLLP server) on loopback.

The receiver answers AA, AE, AR, nothing, or an ACK for another message, on demand; the test
parses what it received with hl7apy.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset

from d2r_core.config import TlsSettings
from delivery import DeliverySettings, open_destination
from delivery.destinations import MllpPeer, StudyResults
from delivery.dimse import SendOptions
from delivery.errors import PermanentSendError, TransientSendError
from delivery.hl7 import Hl7Destination, build_oru, control_id, unescape
from tests.security.tls_ca import Pki, make_test_ca
from tests.support.hl7_receiver import Hl7Receiver
from tests.support.hl7_sample import phantom_results
from tests.support.processes import free_port

pytestmark = pytest.mark.integration

FAMILY, GIVEN = "Müller", "Zoë"
SEPARATORS = "Effusion | small ^ left ~ base \\ costophrenic & angle."


@pytest.fixture(scope="module")
def results() -> StudyResults:
    return phantom_results(findings=SEPARATORS + "\nNo pneumothorax.")


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Hl7Receiver]:
    server = Hl7Receiver(tmp_path / "ris", free_port()).start()
    try:
        yield server
    finally:
        server.stop()


def destination(port: int, *, tls: TlsSettings | None = None) -> Hl7Destination:
    """The sender ``d2r`` opens for ``mllp://127.0.0.1:port`` (``mllp+tls://`` with ``tls``)."""
    peer = MllpPeer("127.0.0.1", port, tls=tls is not None)
    options = SendOptions(network_timeout=10, tls=tls or TlsSettings())
    sender = open_destination(peer, DeliverySettings((peer,), ae_title="D2R", options=options))
    assert isinstance(sender, Hl7Destination)
    return sender


def segment(text: str, name: str) -> Any:
    message = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    return next(c for c in message.children if c.name == name)


def test_accepted_oru_arrives_complete(receiver: Hl7Receiver, results: StudyResults) -> None:
    delivered = destination(receiver.port).send(results)
    assert results.content is not None
    expected_id = control_id(results.study_instance_uid, "d2r-net", "3.1.0")
    (item,) = delivered.items
    assert (item.identifier, item.status, item.object_type) == (expected_id, "AA", "ORU^R01")

    (text,) = receiver.received()
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
    message.validate()  # the receiver's view: a valid v2.5.1 ORU_R01
    assert segment(text, "MSH").msh_18.to_er7() == "UNICODE UTF-8"
    pid = segment(text, "PID")
    assert pid.pid_3.to_er7() == "PHANTOM-0007^^^D2R-PHANTOMS"  # IssuerOfPatientID
    assert pid.pid_5.to_er7() == f"{FAMILY}^{GIVEN}"
    assert pid.pid_7.to_er7() == "19800229"
    obr = segment(text, "OBR")
    accession = str(results.reports[0].AccessionNumber)
    assert obr.obr_2.to_er7() == obr.obr_3.to_er7() == accession
    assert obr.obr_25.to_er7() == "P"
    observations = [c for c in parse_message(text, find_groups=False).children if c.name == "OBX"]
    by_text = {o.obx_3.to_er7().split("^")[1]: o for o in observations if not o.obx_4.to_er7()}
    findings = by_text["Findings"].obx_5.children[0].children[0].value.value
    assert unescape(findings) == SEPARATORS + "\nNo pneumothorax."
    assert by_text["SR Instance UID"].obx_5.to_er7() == (
        f"^{results.reports[0].SOPInstanceUID}^ISO"
    )
    lesion = [o for o in observations if o.obx_4.to_er7() == "1"]
    assert [o.obx_2.to_er7() for o in lesion] == ["CWE", "NM"]
    assert "Pleural effusion" in lesion[0].obx_5.to_er7()
    assert lesion[1].obx_5.to_er7() == "62.0"
    assert {o.obx_11.to_er7() for o in observations} == {"P"}

    # a repeated send is the same message: same control ID
    again = destination(receiver.port).send(results)
    assert again.items[0].identifier == expected_id
    first, second = receiver.received()
    assert segment(second, "MSH").msh_10.to_er7() == segment(first, "MSH").msh_10.to_er7()


def test_application_error_is_permanent_with_the_ack_text_without_phi(
    receiver: Hl7Receiver, results: StudyResults
) -> None:
    receiver.answer("AE")
    with pytest.raises(PermanentSendError) as caught:
        destination(receiver.port).send(results)
    error = str(caught.value)
    assert "answered AE" in error and "cannot file the result for patient" in error
    assert "order unknown" in error
    assert FAMILY not in error and FAMILY.lower() not in error


@pytest.mark.parametrize(
    ("mode", "outcome"),
    [
        ("AR", TransientSendError),  # reason left open: maybe the receiver is down inside
        ("AR 203", PermanentSendError),  # unsupported version: the same message fails again
        ("AE 207", TransientSendError),  # application internal error
        ("close", TransientSendError),
        ("wrong-id", TransientSendError),
    ],
)
def test_other_answers(
    receiver: Hl7Receiver, results: StudyResults, mode: str, outcome: type[Exception]
) -> None:
    receiver.answer(mode)
    with pytest.raises(outcome) as caught:
        destination(receiver.port).send(results)
    assert type(caught.value) is outcome
    assert receiver.received()  # it did arrive: the answer decided


def test_receiver_down_is_transient(results: StudyResults) -> None:
    with pytest.raises(TransientSendError):
        destination(free_port()).send(results)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_test_ca(tmp_path_factory.mktemp("pki"))


def test_mllp_over_tls(pki: Pki, tmp_path: Path, results: StudyResults) -> None:
    server = Hl7Receiver(tmp_path / "ris", free_port(), tls=(pki.server.cert, pki.server.key))
    server.start()
    try:
        trusted = TlsSettings(ca=pki.ca)
        delivered = destination(server.port, tls=trusted).send(results)
        assert delivered.items[0].status == "AA"
        assert len(server.received()) == 1
        other = make_test_ca(tmp_path / "other", name="rogue")
        with pytest.raises(TransientSendError, match="certificate"):
            destination(server.port, tls=TlsSettings(ca=other.ca)).send(results)
        assert len(server.received()) == 1
    finally:
        server.stop()


def test_no_patient_data_in_log_lines(
    receiver: Hl7Receiver, results: StudyResults, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    destination(receiver.port).send(results)
    receiver.answer("AE")
    with pytest.raises(PermanentSendError):
        destination(receiver.port).send(results)
    logged = caplog.text + " ".join(str(r.args) for r in caplog.records)
    assert "sent ORU^R01" in logged
    header: Dataset = results.reports[0]
    for value in (FAMILY, GIVEN, str(header.PatientID), str(header.AccessionNumber)):
        assert value not in logged


def test_message_build_is_deterministic_but_for_the_clock(results: StudyResults) -> None:
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    one = build_oru(results, sending_application="D2R", now=when).to_er7()
    two = build_oru(results, sending_application="D2R", now=when).to_er7()
    assert one == two
