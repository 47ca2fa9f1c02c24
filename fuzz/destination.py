"""Fuzz target: the ``D2R_DESTINATIONS`` parser (:func:`delivery.destinations.parse_destinations`).

Property: the text parses into destinations whose canonical names parse back into the same
destinations, or it is refused with a ``ValueError`` (``ConfigError``) that has a message;
no other exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from fuzz._harness import (
    KnownGap,
    OneInput,
    PropertyViolation,
    check,
    describe,
    fuzz_main,
    instrumented,
    tolerating,
)

with instrumented("delivery", "dicom_node", "urllib"):
    from delivery.destinations import parse_destination, parse_destinations

NOT_STABLE = "does not round-trip"


def _unstable(kind: str) -> Callable[[BaseException], bool]:
    def matches(exc: BaseException) -> bool:
        text = str(exc)
        return isinstance(exc, PropertyViolation) and text.startswith(f"{NOT_STABLE}: {kind}(")

    return matches


KNOWN_GAPS = (
    KnownGap(
        "the host of a DICOM destination is not checked: 'dicom://PACS@a://b:104' is accepted"
        " as host 'a://b', and its name 'PACS@a://b:104' is then refused (unknown scheme)",
        where="delivery/destinations.py _dicom",
        test="tests/delivery/test_destinations_regressions.py::test_a_dicom_host_is_a_host_name",
        matches=_unstable("DicomPeer"),
    ),
    KnownGap(
        "the name of an HTTP destination writes its credential file unquoted: token_file=/a%26b"
        " is the file '/a&b', and the name '...?token_file=/a&b' is refused (unknown parameter b)",
        where="delivery/destinations.py HttpEndpoint.name",
        test="tests/delivery/test_destinations_regressions.py::test_a_credential_file_name_round_trips",
        matches=_unstable("HttpEndpoint"),
    ),
)


def one_input(data: bytes) -> None:
    tls = bool(data[:1]) and data[0] & 1 == 1
    # the environment's text: undecodable bytes arrive as surrogates (os.environ does this)
    text = data[1:].decode("utf-8", "surrogateescape")
    try:
        addresses = parse_destinations(text, tls=tls)
    except ValueError as exc:
        check(str(exc).strip(), f"refused without a message: {type(exc).__name__}")
        return
    for address in addresses:
        name = address.name
        again: object
        try:
            again = parse_destination(name)
        except ValueError as exc:
            again = exc
        if again != address or getattr(again, "name", None) != name:
            raise PropertyViolation(
                f"{NOT_STABLE}: {describe(address)} is named {name!r}, which parses to"
                f" {describe(again)}"
            )


@contextlib.contextmanager
def harness() -> Iterator[OneInput]:
    yield tolerating(one_input, KNOWN_GAPS)


if __name__ == "__main__":
    fuzz_main(harness)
