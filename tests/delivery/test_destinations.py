"""D2R_DESTINATIONS: every kind of address, the refusals, and the choice of sender."""

from __future__ import annotations

from pathlib import Path

import pytest

from delivery import open_destination
from delivery.destinations import DicomPeer, HttpEndpoint, MllpPeer, by_name, parse_destinations
from delivery.dimse import DicomDestination
from delivery.settings import DeliverySettings
from dicom_node.settings import ConfigError


def test_every_kind_of_address_is_parsed() -> None:
    text = (
        "PACS@10.0.0.5:104, ARCH@[::1]:11113, dicom://P2@h:104, dicom+tls://P3@h:2762,"
        "tls://P4@h:2762, dicomweb+https://archive.example.org/dicom-web/?token_file=/run/t,"
        "mllp://ris:2575, mllp+tls://[::1]:2576, fhir+http://fhir:8080/fhir?basic_auth_file=/b"
    )
    got = parse_destinations(text)
    assert got[:5] == (
        DicomPeer("PACS", "10.0.0.5", 104),
        DicomPeer("ARCH", "::1", 11113),
        DicomPeer("P2", "h", 104),
        DicomPeer("P3", "h", 2762, tls=True),
        DicomPeer("P4", "h", 2762, tls=True),
    )
    assert got[5] == HttpEndpoint(
        "dicomweb", "https://archive.example.org/dicom-web", token_file=Path("/run/t")
    )
    assert got[6:8] == (MllpPeer("ris", 2575), MllpPeer("::1", 2576, tls=True))
    assert got[8] == HttpEndpoint("fhir", "http://fhir:8080/fhir", basic_auth_file=Path("/b"))
    assert [a.kind for a in got] == ["dicom"] * 5 + ["dicomweb", "mllp", "mllp", "fhir"]
    names = [a.name for a in got]
    assert names[0] == "PACS@10.0.0.5:104" and names[3] == "tls://P3@h:2762"
    assert names[5] == "dicomweb+https://archive.example.org/dicom-web?token_file=/run/t"
    assert names[7] == "mllp+tls://[::1]:2576"
    # a name parses back to the same address: deliveries are retried by name
    assert parse_destinations(",".join(names)) == got
    assert by_name(got, names[6]) is got[6]


def test_destinations_tls_applies_to_plain_dicom_items_only() -> None:
    got = parse_destinations("A@h:104,mllp://ris:2575", tls=True)
    assert got == (DicomPeer("A", "h", 104, tls=True), MllpPeer("ris", 2575))


@pytest.mark.parametrize(
    "text",
    [
        "PACS@host",
        "host:104",
        "PACS@host:0",
        "WAY_TOO_LONG_AE_TITLE@host:104",
        "P@h:1,P@h:1",
        "ftp://h/x",
        "dicomweb+https://user:secret@h/dicom-web",
        "fhir+https://:tok@h/fhir",
        "dicomweb+https://h/dicom-web?token=abc",
        "fhir+https://h/fhir?token_file=/a&basic_auth_file=/b",
        "mllp://ris",
        "mllp://ris:99999",
        "mllp://ris:2575/path",
        "dicomweb+ftp://h/x",
    ],
)
def test_bad_destinations_name_the_setting(text: str) -> None:
    with pytest.raises(ConfigError, match="D2R_DESTINATIONS") as info:
        parse_destinations(text)
    assert "secret" not in str(info.value) and "tok@" not in str(info.value)


def test_settings_share_the_node_association_parameters() -> None:
    s = DeliverySettings.from_env(
        {"D2R_AE_TITLE": "CXR_AI", "D2R_DESTINATIONS": "PACS@h:104", "D2R_NETWORK_TIMEOUT": "7"}
    )
    assert s.ae_title == "CXR_AI" and s.timeout == 7
    sender = open_destination(s.destinations[0], s)
    assert isinstance(sender, DicomDestination)
    assert (sender.kind, sender.name, sender.ae_title) == ("dicom", "PACS@h:104", "CXR_AI")
