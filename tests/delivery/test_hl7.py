"""The ORU^R01 as built, escaped and acknowledged: pure functions, no peer.

Messages are read back with hl7apy's parser (strict, against the v2.5.1 structure) and our
:func:`delivery.hl7.unescape`, never by looking at our own string building.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from d2r_core.classes import VINDR_CLASSES
from delivery.content import DeliveryContent, FindingBox
from delivery.destinations import StudyResults
from delivery.errors import PermanentSendError, TransientSendError
from delivery.hl7 import (
    Ack,
    build_oru,
    check_ack,
    control_id,
    encode,
    escape,
    patient_identifiers,
    unescape,
)
from report.codes import FINDING_CODES, PRIVATE_SCHEME_DESIGNATOR

STUDY = "1.2.826.0.1.3680043.8.498.1"
NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
SEPARATORS = "a | b ^ c ~ d \\ e & f \\F\\ g"


def header(**values: Any) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Zoë^Anna^Dr.^Jr."
    ds.PatientID = "PAT-0001"
    ds.PatientBirthDate = "19700102"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC-42"
    ds.StudyDate, ds.StudyTime = "20260101", "101112.123456"
    ds.StudyInstanceUID = STUDY
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def content(**values: Any) -> DeliveryContent:
    fields: dict[str, Any] = {
        "findings": "Small left pleural effusion.\nNo pneumothorax.",
        "impression": "Left pleural effusion.",
        "lesions": (
            FindingBox("Pleural effusion", 0.4712, (10.0, 20.0, 30.0, 40.0)),
            FindingBox("Aortic enlargement", 0.25, (1.0, 2.0, 3.0, 4.0)),
        ),
        "model_name": "d2r-net",
        "model_version": "3.1.0",
        "sr_sop_instance_uid": "1.2.826.0.1.3680043.8.498.2",
    }
    fields.update(values)
    return DeliveryContent(**fields)


def oru(ds: Dataset | None = None, report: DeliveryContent | None = None) -> bytes:
    results = StudyResults(STUDY, (ds or header(),), report or content())
    return encode(build_oru(results, sending_application="D2R", now=NOW))


def parsed(data: bytes) -> Any:
    text = data.decode("utf-8")
    return parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)


def parsed_segments(data: bytes, name: str) -> list[Any]:
    message = parse_message(
        data.decode("utf-8"), validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False
    )
    return [c for c in message.children if c.name == name]


def segments(data: bytes, name: str) -> list[list[str]]:
    """Fields of every ``name`` segment as hl7apy serialises each parsed segment (it writes
    ``\\.br\\`` back as ``\\E\\.br\\E\\``: read FT values with :func:`text`)."""
    return [c.to_er7().split("|") for c in parsed_segments(data, name)]


def text(segment: Any, field: str) -> str:
    """The text of a one-component field (FT, TX, ST) as received, unescaped."""
    return unescape(getattr(segment, field).children[0].children[0].value.value)


def texts(data: bytes) -> dict[str, str]:
    """OBX-3 text -> OBX-5 text of the FT observations."""
    return {
        o.obx_3.to_er7().split("^")[1]: text(o, "obx_5")
        for o in parsed_segments(data, "OBX")
        if o.obx_2.to_er7() == "FT"
    }


def observations(data: bytes) -> list[list[str]]:
    return segments(data, "OBX")


# -- escaping -------------------------------------------------------------------------------


def test_escape_follows_the_hl7_rules() -> None:
    assert escape(SEPARATORS) == "a \\F\\ b \\S\\ c \\R\\ d \\E\\ e \\T\\ f \\E\\F\\E\\ g"
    assert escape("one\r\ntwo\nthree", formatted=True) == "one\\.br\\two\\.br\\three"
    assert escape("one\rtwo") == "one two"  # a CR never reaches the wire: no segment injection
    assert escape("tab\there\x00") == "tab here "


@given(st.text())
def test_unescape_inverts_escape(text: str) -> None:
    # a line break (CR LF, CR or LF) becomes one space, any other control character too
    one_line = text.replace("\r\n", "\n")
    assert unescape(escape(text)) == one_line.translate({c: " " for c in range(32)} | {127: " "})


def test_separators_in_the_text_arrive_as_text() -> None:
    data = oru(report=content(findings=SEPARATORS + "\nsecond line", impression="x|y"))
    assert texts(data) == {"Findings": SEPARATORS + "\nsecond line", "Impressions": "x|y"}
    assert b"\\.br\\second line" in data
    assert len(segments(data, "OBX")) == 8  # the text split no segment


# -- character set --------------------------------------------------------------------------


def test_non_ascii_names_are_utf8_with_msh18() -> None:
    data = oru(header(PatientName="Müller^Zoë=山田^太郎=やまだ^たろう"))
    (msh,) = segments(data, "MSH")
    assert msh[17] == "UNICODE UTF-8"
    (pid,) = segments(data, "PID")
    names = pid[5].split("~")
    assert names == [
        "Müller^Zoë^^^^^^A",
        "山田^太郎^^^^^^I",
        "やまだ^たろう^^^^^^P",
    ]


def test_ascii_message_has_no_msh18_and_encodes_as_ascii() -> None:
    data = oru(header(PatientName="DOE^JANE"))
    data.decode("ascii")
    (msh,) = segments(data, "MSH")
    assert len(msh) < 18 or msh[17] == ""


def test_separator_characters_in_a_name_are_escaped() -> None:
    data = oru(header(PatientName="O|Brien&Co^An~ne", PatientID="ID^1"))
    (pid,) = segments(data, "PID")
    family, given = pid[5].split("^")[:2]
    assert (unescape(family), unescape(given)) == ("O|Brien&Co", "An~ne")
    assert unescape(pid[3].split("^")[0]) == "ID^1"


# -- content --------------------------------------------------------------------------------


def test_message_validates_against_251_and_carries_the_report() -> None:
    data = oru(header(IssuerOfPatientID="HOSP-A"))
    message = parsed(data)
    assert message.name == "ORU_R01"
    message.validate()
    (msh,) = segments(data, "MSH")
    assert msh[8] == "ORU^R01^ORU_R01" and msh[10] == "P" and msh[11] == "2.5.1"
    assert msh[2] == "D2R"
    assert msh[9] == control_id(STUDY, "d2r-net", "3.1.0")
    (pid,) = segments(data, "PID")
    assert pid[3] == "PAT-0001^^^HOSP-A"
    assert pid[5] == "Müller^Zoë^Anna^Jr.^Dr."  # XPN: family^given^middle^suffix^prefix
    assert (pid[7], pid[8]) == ("19700102", "F")
    (orc,) = segments(data, "ORC")
    assert orc[1:4] == ["RE", "ACC-42", "ACC-42"]
    (obr,) = segments(data, "OBR")
    assert obr[2] == obr[3] == obr[18] == "ACC-42"
    assert obr[4] == "399208008^Plain chest X-ray^SCT"
    assert obr[7] == "20260101101112.1234"
    assert obr[25] == "P"
    assert len(obr) < 33 or obr[32] == ""  # no person poses as the interpreter
    obx = observations(data)
    assert all(o[11] == "P" for o in obx)
    assert all(o[18] == "d2r-net 3.1.0" for o in obx)
    by_id = {o[3].split("^")[1]: o for o in obx if not o[4]}
    assert by_id["Study Instance UID"][5] == f"^{STUDY}^ISO"
    assert by_id["SR Instance UID"][5] == "^1.2.826.0.1.3680043.8.498.2^ISO"
    assert texts(data) == {
        "Findings": "Small left pleural effusion.\nNo pneumothorax.",
        "Impressions": "Left pleural effusion.",
    }
    (nte,) = parsed_segments(data, "NTE")
    assert "not verified by a physician" in text(nte, "nte_3")


def test_one_finding_and_score_per_lesion_grouped_by_sub_id() -> None:
    obx = [o for o in observations(oru()) if o[4]]
    assert [(o[2], o[3], o[4]) for o in obx] == [
        ("CWE", "121071^Finding^DCM", "1"),
        ("NM", "111012^Certainty of finding^DCM", "1"),
        ("CWE", "121071^Finding^DCM", "2"),
        ("NM", "111012^Certainty of finding^DCM", "2"),
    ]
    effusion = FINDING_CODES["Pleural effusion"].finding
    assert obx[0][5].split("^") == [
        effusion.value,
        effusion.meaning,
        effusion.scheme_designator,
        str(VINDR_CLASSES.index("Pleural effusion")),
        "Pleural effusion",
        PRIVATE_SCHEME_DESIGNATOR,
    ]
    assert (obx[1][5], obx[1][6]) == ("47.1", "%^percent^UCUM")
    assert obx[2][5] == f"{VINDR_CLASSES.index('Aortic enlargement')}^Aortic enlargement^99D2R"
    assert obx[3][5] == "25.0"


def test_every_class_has_a_finding_code() -> None:
    lesions = tuple(FindingBox(name, 0.5, (0.0, 0.0, 1.0, 1.0)) for name in VINDR_CLASSES)
    obx = [o for o in observations(oru(report=content(lesions=lesions))) if o[2] == "CWE"]
    assert [o[5].split("^")[-2] for o in obx] == list(VINDR_CLASSES)


def test_abstention_says_who_did_not_assess_and_why() -> None:
    report = content(
        findings="",
        impression="",
        lesions=(),
        abstained=True,
        abstain_reason="the image is not a frontal chest radiograph",
    )
    data = oru(report=report)
    said = texts(data)
    assert "not assessed by the AI model d2r-net version 3.1.0" in said["Findings"]
    assert "not a frontal chest radiograph" in said["Findings"]
    assert "Not assessed" in said["Impressions"]
    assert not [o for o in observations(data) if o[4]]  # no lesion OBX


def test_input_gate_off_is_said() -> None:
    notes = [
        text(n, "nte_3") for n in parsed_segments(oru(report=content(input_gate=False)), "NTE")
    ]
    assert any("input gate was off" in n for n in notes)


def test_procedure_code_from_the_study_when_present() -> None:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "RPID17", "99LOCAL", "CXR PA"
    (obr,) = segments(oru(header(ProcedureCodeSequence=[item])), "OBR")
    assert obr[4] == "RPID17^CXR PA^99LOCAL"


def test_anonymous_patient_name_is_a_name_of_unknown_type() -> None:
    (pid,) = segments(oru(header(PatientName="")), "PID")
    assert pid[5] == "^^^^^^U"


def test_no_patient_id_or_content_is_permanent() -> None:
    with pytest.raises(PermanentSendError, match="PatientID"):
        oru(header(PatientID=""))
    with pytest.raises(PermanentSendError, match="reprocess"):
        build_oru(StudyResults(STUDY, (header(),), None), sending_application="D2R")


def test_control_id_is_stable_per_study_and_model_version() -> None:
    first, again = oru(), oru(report=content(findings="other words"))
    assert segments(first, "MSH")[0][9] == segments(again, "MSH")[0][9]
    ids = {
        control_id(STUDY, "d2r-net", "3.1.0"),
        control_id(STUDY, "d2r-net", "3.2.0"),
        control_id(STUDY + "1", "d2r-net", "3.1.0"),
        control_id(STUDY, "other", "3.1.0"),
    }
    assert len(ids) == 4
    assert all(len(i) <= 20 for i in ids)  # MSH-10 is ST(20) in v2.5.1


# -- acknowledgements -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "errors", "outcome"),
    [
        ("AA", (), None),
        ("CA", (), None),
        ("AE", (), PermanentSendError),
        ("AE", ("101",), PermanentSendError),
        ("AE", ("207",), TransientSendError),
        ("AE", ("206",), TransientSendError),
        ("AR", (), TransientSendError),
        ("AR", ("207",), TransientSendError),
        ("AR", ("200",), PermanentSendError),
        ("AR", ("203",), PermanentSendError),
        ("CE", (), TransientSendError),
        ("CR", (), PermanentSendError),
        ("", (), PermanentSendError),
    ],
)
def test_ack_mapping(code: str, errors: tuple[str, ...], outcome: type[Exception] | None) -> None:
    ack = Ack(code, "C1", "why", errors)
    if outcome is None:
        check_ack(ack, "C1", name="mllp://ris:2575", secrets=[])
        return
    with pytest.raises(outcome) as caught:
        check_ack(ack, "C1", name="mllp://ris:2575", secrets=[])
    assert type(caught.value) is outcome
    assert "why" in str(caught.value)


def test_ack_for_another_message_is_transient() -> None:
    with pytest.raises(TransientSendError, match="not 'C1'"):
        check_ack(Ack("AA", "C2", ""), "C1", name="mllp://ris:2575", secrets=[])


def test_ack_text_is_recorded_without_patient_identifiers() -> None:
    ds = header()
    ack = Ack("AE", "C1", "patient müller (PAT-0001, born 19700102) has no order ACC-42", ())
    with pytest.raises(PermanentSendError) as caught:
        check_ack(ack, "C1", name="mllp://ris:2575", secrets=patient_identifiers(ds))
    text = str(caught.value)
    assert "has no order" in text
    for secret in ("Müller", "müller", "PAT-0001", "19700102", "ACC-42"):
        assert secret not in text


def test_operations_sample_is_what_d2r_sends() -> None:
    from tests.support.hl7_sample import sample
    from tests.support.processes import REPO

    docs = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    block = docs.split("<!-- hl7-sample -->\n```text\n", 1)[1].split("\n```", 1)[0]
    assert block == sample().rstrip("\n")


def test_the_node_does_not_load_hl7apy() -> None:
    """Only the worker's send task opens the HL7 sender; the node's imports stay light."""
    import subprocess
    import sys

    from tests.support.processes import REPO, base_env

    code = (
        "import sys\n"
        "import cli.runtime, dicom_node.assembler, dicom_node.scp, worker.celery_app\n"
        "import worker.messages, worker.settings\n"
        "from delivery.settings import DeliverySettings\n"
        "DeliverySettings.from_env({'D2R_DESTINATIONS': 'P@h:104,mllp://ris:2575'})\n"
        "assert 'hl7apy' not in sys.modules, 'hl7apy imported'\n"
    )
    env = base_env(PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
