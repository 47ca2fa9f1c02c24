"""Reading an ORU^R01 and writing its acknowledgement."""

from __future__ import annotations

import pytest

from delivery.hl7 import parse_ack
from feedback.oru import OruRejected, build_ack, read_oru
from tests.support.signed_reports import oru


def test_a_final_report_gives_its_text_status_accession_and_study_uids() -> None:
    data = oru(
        "Lungs clear.\nNo effusion | no pneumothorax.",
        control_id="C-17",
        accession="ACC1",
        study_uid="1.2.3",
        zds_uid="1.2.4",
    )
    report = read_oru(data)
    assert report.control_id == "C-17"
    assert report.result_status == "F"
    assert report.accession_numbers == ("ACC1",)
    assert report.study_uids == ("1.2.3", "1.2.4")
    assert report.text == "Lungs clear.\nNo effusion | no pneumothorax."
    assert report.source == "hl7:RIS^HOSPITAL"
    assert report.sender == ("RIS", "HOSPITAL")


def test_accession_numbers_come_from_obr_then_orc_and_the_status_from_obx_11() -> None:
    text = (
        "MSH|^~\\&|RIS|H|D2R||20260102||ORU^R01|X1|P|2.4\r"
        "ORC|RE|PLACER9|FILLER9\r"
        "OBR|1||FILL^RIS|71045\r"
        "OBX|1|FT|R||Line one\\.br\\Line two\\X41\\||||||C\r"
        "OBX|2|TX|R||second~third||||||C\r"
    )
    report = read_oru(text.encode())
    assert report.accession_numbers == ("FILL", "FILLER9", "PLACER9")
    assert report.result_status == "C"
    assert report.text == "Line one\nLine twoA\nsecond\nthird"


def test_the_message_delimiters_are_its_own() -> None:
    text = (
        "MSH#$*/%#RIS#H#D2R##2026##ORU$R01#X2#P#2.5.1\rOBR#1#A$X#A$X\rOBX#1#TX#R##a/F/b*c#####F\r"
    )
    report = read_oru(text.encode())
    assert report.accession_numbers == ("A",)
    assert report.text == "a#b\nc"


def test_a_study_uid_that_is_not_a_uid_is_left_out() -> None:
    report = read_oru(oru("x", study_uid="not-a-uid", zds_uid="1.2." + "3" * 80))
    assert report.study_uids == ()


@pytest.mark.parametrize(
    ("data", "code", "control_id"),
    [
        (b"hello", "AR", ""),
        (oru("x", message_type="ADT^A01^ADT_A01", control_id="A9"), "AR", "A9"),
        (b"MSH|^~\\&|RIS|H|D2R||2026||ORU^R01|N1|P|2.5.1\rPID|1||X\r", "AE", "N1"),
    ],
    ids=["not-hl7", "not-oru", "no-obr"],
)
def test_what_is_not_a_signed_report_is_refused_with_its_code(
    data: bytes, code: str, control_id: str
) -> None:
    with pytest.raises(OruRejected) as caught:
        read_oru(data)
    assert (caught.value.code, caught.value.control_id) == (code, control_id)


def test_the_ack_echoes_the_control_id_and_says_why() -> None:
    ack = build_ack(
        "AE",
        control_id="C|1",
        reason="no report text " + "x" * 100,
        sending_application="D2R",
        receiver=("RIS", "HOSPITAL"),
    )
    parsed = parse_ack(ack)
    assert (parsed.code, parsed.control_id) == ("AE", "C|1")
    assert parsed.text.startswith("no report text") and len(parsed.text) == 80
    msh = ack.split(b"\r")[0].split(b"|")
    assert msh[2] == b"D2R" and msh[4:6] == [b"RIS", b"HOSPITAL"] and msh[8] == b"ACK^R01^ACK"
