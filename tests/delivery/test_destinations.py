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
        "mllp://ris:2575, mllp+tls://[::1]:2576,"
        "fhir+http://fhir:8080/fhir?basic_auth_file=/b&insecure=true"
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
    assert got[8] == HttpEndpoint(
        "fhir", "http://fhir:8080/fhir", basic_auth_file=Path("/b"), insecure=True
    )
    assert [a.kind for a in got] == ["dicom"] * 5 + ["dicomweb", "mllp", "mllp", "fhir"]
    names = [a.name for a in got]
    assert names[0] == "PACS@10.0.0.5:104" and names[3] == "tls://P3@h:2762"
    assert names[5] == "dicomweb+https://archive.example.org/dicom-web?token_file=/run/t"
    assert names[7] == "mllp+tls://[::1]:2576"
    assert names[8] == "fhir+http://fhir:8080/fhir?basic_auth_file=/b&insecure=true"
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
        "dicomweb+https://h/dicom-web?insecure=true",
        "fhir+http://h/fhir?token_file=/a&insecure=maybe",
        "fhir+https://h/fhir?token_file=/run/CHANGE-ME",
        "dicomweb+https://u:change-me@h/dicom-web",
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


@pytest.mark.parametrize(
    "item", ["dicomweb+http://h/rs?token_file=/run/t", "fhir+HTTP://h/fhir?basic_auth_file=/b"]
)
def test_a_credential_over_cleartext_is_refused_naming_the_destination(item: str) -> None:
    with pytest.raises(ConfigError, match="D2R_DESTINATIONS") as info:
        parse_destinations(item)
    message = str(info.value)
    assert "cleartext" in message and "insecure=true" in message
    assert item.split("?")[1] in message  # the destination, by its credential file's name


def test_insecure_opts_in_to_cleartext_and_stays_in_the_name() -> None:
    (plain,) = parse_destinations("dicomweb+http://h/rs?insecure=true&token_file=/run/t")
    assert isinstance(plain, HttpEndpoint) and plain.insecure and plain.cleartext
    assert plain.name == "dicomweb+http://h/rs?token_file=/run/t&insecure=true"
    assert parse_destinations(plain.name) == (plain,)
    # no credential, nothing to protect: plain http needs no opt-in
    (open_,) = parse_destinations("fhir+http://h/fhir")
    assert isinstance(open_, HttpEndpoint) and not open_.insecure
    with pytest.raises(ConfigError, match="cleartext"):
        HttpEndpoint("fhir", "http://h/fhir", token_file=Path("/run/t"))


def test_a_placeholder_credential_file_stops_the_start(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("CHANGE-ME-to-the-output-of-openssl-rand-hex-32\n")
    env = {"D2R_DESTINATIONS": f"PACS@h:104,fhir+https://h/fhir?token_file={token}"}
    with pytest.raises(ConfigError, match="D2R_DESTINATIONS") as info:
        DeliverySettings.from_env(env)
    assert str(token) in str(info.value) and "CHANGE-ME placeholder" in str(info.value)
    assert "openssl" not in str(info.value)
    token.write_text("a" * 64)
    assert len(DeliverySettings.from_env(env).destinations) == 2
    # a file the node cannot read is the sender's to report when it opens it
    absent = {"D2R_DESTINATIONS": f"fhir+https://h/fhir?token_file={tmp_path / 'absent'}"}
    assert len(DeliverySettings.from_env(absent).destinations) == 1
