"""D2R_DESTINATIONS: every kind of address, the refusals, and the choice of sender."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2r_core.errors import ConfigError
from delivery import open_destination
from delivery.destinations import (
    DicomPeer,
    HttpEndpoint,
    MllpPeer,
    by_name,
    parse_destination,
    parse_destinations,
)
from delivery.dimse import DicomDestination
from delivery.settings import DeliverySettings


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


@pytest.mark.parametrize(
    "item",
    [
        "dicom://PACS@a://b:104",
        "PACS@pacs host:104",
        "PACS@pacs-:104",
        "PACS@-pacs:104",
        "PACS@pacs.:104",
        "PACS@10.0.0.256:104",
        "PACS@10.1:104",
        "PACS@[10.0.0.5]:104",
        "PACS@[fe80::1%eth0]:104",
        "PACS@[::1:104",
        "PACS@h:+104",
        "PACS@h:65536",
        "mllp://ris host:2575",
        "mllp+tls://[::g]:2576",
        "mllp://a://b:2575",
        "dicomweb+https://pacs$host/dicom-web",
        "fhir+https://h:/fhir",
        "fhir+https://h:0/fhir",
        "fhir+https://[::1/fhir",
        "fhir+https://h/f hir",
        "fhir+https://h/fhir%zz",
    ],
)
def test_a_host_is_a_host_name_an_ipv4_or_a_bracketed_ipv6_address(item: str) -> None:
    with pytest.raises(ConfigError, match="D2R_DESTINATIONS") as info:
        parse_destinations(item)
    assert repr(item) in str(info.value)  # the destination, as written


@pytest.mark.parametrize(
    ("item", "name"),
    [
        ("PACS@pacs_host:104", "PACS@pacs_host:104"),  # a Compose service name
        ("PACS@[::1]:104", "PACS@[::1]:104"),
        ("PACS@::1:104", "PACS@[::1]:104"),  # the form names had before
        ("tls://PACS@[2001:db8::5]:2762", "tls://PACS@[2001:db8::5]:2762"),
        ("PACS@pacs-1.Example.org:104", "PACS@pacs-1.Example.org:104"),
        ("dicom://A://B@h:104", "dicom://A://B@h:104"),
        ("mllp://RIS.example.org:2575/", "mllp://ris.example.org:2575"),
        ("mllp://[FE80::1]:2575", "mllp://[fe80::1]:2575"),
        ("fhir+https://[::1]:8443/fhir/", "fhir+https://[::1]:8443/fhir"),
        ("dicomweb+https://10.0.0.5/dicom-web%20rs", "dicomweb+https://10.0.0.5/dicom-web%20rs"),
    ],
)
def test_names_are_canonical_and_parse_back(item: str, name: str) -> None:
    (address,) = parse_destinations(item)
    assert address.name == name
    assert parse_destinations(name) == (address,)


@pytest.mark.parametrize(
    "file",
    ["/run/a&b", "/run/a#b", "/run/a b", "/run/a+b", "/run/a=b?c", "/run/a%26b", "/run/a,b"]
    + ["/run/clé", "/run/a\udcffb", "relative/t"],
)
def test_a_credential_file_name_round_trips_for_any_file(file: str) -> None:
    for address in (
        HttpEndpoint("dicomweb", "https://h/rs", token_file=Path(file)),
        HttpEndpoint("fhir", "http://h/fhir", basic_auth_file=Path(file), insecure=True),
    ):
        assert parse_destinations(address.name) == (address,), address.name
        assert address.name.isascii() and "," not in address.name


def test_credential_files_are_percent_decoded_query_values() -> None:
    (address,) = parse_destinations("fhir+https://h/fhir?token_file=/run/a%23b+c%2Bd%FF")
    assert isinstance(address, HttpEndpoint)
    assert address.token_file == Path("/run/a#b c+d\udcff")  # non-UTF-8 bytes as os.fsdecode
    assert address.name == "fhir+https://h/fhir?token_file=/run/a%23b%20c%2Bd%FF"


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("fhir+https://h/fhir?token_file=/run/a#b", "fragment"),
        ("fhir+https://h/fhir?token_file=/a&token_file=/b", "given twice"),
        ("fhir+https://h/fhir?token_file=", "must name a file"),
        ("fhir+https://h/fhir?token_file=/run/a%00b", "must name a file"),
        ("fhir+https://h/fhir?token_file=/run/CHANGE%2DME", "CHANGE-ME"),
    ],
)
def test_a_credential_file_is_named_once_and_plainly(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_destinations(item)
    assert "'fhir+https://h/fhir" in str(info.value)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("   @h:104", "1-16 characters"),
        ("SEVENTEEN_CHARS_X@h:104", "1-16 characters"),
        ("A\\B@h:104", "backslash or control"),
        ("A\x07B@h:104", "backslash or control"),
        ("PACSÉ@h:104", "backslash or control"),
    ],
)
def test_an_ae_title_is_checked_naming_the_destination(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_destination(item)
    assert repr(item) in str(info.value)


@pytest.mark.parametrize(
    ("item", "shown"),
    [
        ("mllp://user:s3cret@ris:2575", "mllp://...@ris:2575"),
        ("fhir+https://user:s3cret@h:bad/fhir", "fhir+https://...@h:bad"),
        ("fhir+https://h/fhir?token=s3cret", "'fhir+https://h/fhir'"),
        ("fhir+https://h/fhir?token_file=/t&api_key=s3cret", "'fhir+https://h/fhir'"),
        ("dicomweb+https://bad_host/rs?password=s3cret", "'dicomweb+https://bad_host/rs'"),
        ("fhir+https://h/fhir#s3cret", "'fhir+https://h/fhir'"),
    ],
)
def test_a_refusal_names_the_destination_never_a_secret(item: str, shown: str) -> None:
    with pytest.raises(ConfigError, match="D2R_DESTINATIONS") as info:
        parse_destinations(item)
    assert "s3cret" not in str(info.value) and shown in str(info.value)
