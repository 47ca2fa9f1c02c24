"""Addresses found by the fuzzing campaign (``fuzz/destination.py``, inputs in
fuzz/regressions/destination): a destination's name must parse back into the same destination,
or the address must be refused.

Both are known gaps, marked ``xfail(strict=True)``: once fixed, remove the marker here and the
matching ``KNOWN_GAPS`` entry in fuzz/destination.py.
"""

from __future__ import annotations

import pytest

from delivery.destinations import parse_destination, parse_destinations


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


@pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="the host of a DICOM destination is not checked"
)
def test_a_dicom_host_is_a_host_name() -> None:
    # accepted as host "a://b"; its name "PACS@a://b:104" then reads as an unknown scheme
    _round_trips_or_is_refused("dicom://PACS@a://b:104")


@pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="HttpEndpoint.name writes the file name unquoted"
)
def test_a_credential_file_name_round_trips() -> None:
    # the file is "/run/a&b"; the name "...?token_file=/run/a&b" has an unknown parameter "b"
    _round_trips_or_is_refused("dicomweb+https://pacs/dicom-web?token_file=/run/a%26b")


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
