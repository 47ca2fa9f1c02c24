"""Addresses from the fuzzing campaign (``fuzz/destination.py``, inputs in
fuzz/regressions/destination): a destination's name must parse back into the same destination,
or the address must be refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from d2r_core.errors import ConfigError
from delivery.destinations import HttpEndpoint, parse_destination, parse_destinations


def _round_trips_or_is_refused(text: str) -> None:
    try:
        addresses = parse_destinations(text)
    except ValueError:
        return
    for address in addresses:
        try:
            again = parse_destination(address.name)
        except ValueError as exc:
            raise AssertionError(f"the name {address.name!r} does not parse: {exc}") from None
        assert again == address, address.name


def test_a_dicom_host_is_a_host_name() -> None:
    # "a://b" is no host; named "PACS@a://b:104" it would read as an unknown scheme
    _round_trips_or_is_refused("dicom://PACS@a://b:104")
    with pytest.raises(ConfigError, match="host name") as info:
        parse_destinations("dicom://PACS@a://b:104")
    assert "PACS@a://b:104" in str(info.value)


def test_a_credential_file_name_round_trips() -> None:
    # the file is "/run/a&b"; its name must not read as a parameter "b"
    _round_trips_or_is_refused("dicomweb+https://pacs/dicom-web?token_file=/run/a%26b")
    (address,) = parse_destinations("dicomweb+https://pacs/dicom-web?token_file=/run/a%26b")
    assert isinstance(address, HttpEndpoint) and address.token_file == Path("/run/a&b")


@pytest.mark.parametrize(
    "text",
    [
        "PACS@10.0.0.5:104, tls://ARCHIVE@[::1]:2762",
        "mllp+tls://[fe80::1]:2576",
        "dicomweb+https://pacs/dicom-web?token_file=/run/secrets/token",
        "dicomweb+http://127.0.0.1:8042/dicom-web?basic_auth_file=/run/b&insecure=true",
        "dicom://PACS@host:notaport",  # refused
    ],
)
def test_addresses_round_trip_or_are_refused(text: str) -> None:
    _round_trips_or_is_refused(text)
