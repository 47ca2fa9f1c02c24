"""Fuzz target: the ``D2R_DESTINATIONS`` parser (:func:`delivery.destinations.parse_destinations`).

Property: the text parses into destinations whose canonical names parse back into the same
destinations, or it is refused with a ``ConfigError`` that has a message; no other exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
    from d2r_core.errors import ConfigError
    from delivery.destinations import parse_destination, parse_destinations

NOT_STABLE = "does not round-trip"


KNOWN_GAPS: tuple[KnownGap, ...] = ()


def one_input(data: bytes) -> None:
    tls = bool(data[:1]) and data[0] & 1 == 1
    # the environment's text: undecodable bytes arrive as surrogates (os.environ does this)
    text = data[1:].decode("utf-8", "surrogateescape")
    try:
        addresses = parse_destinations(text, tls=tls)
    except ValueError as exc:
        check(isinstance(exc, ConfigError), f"refused with {type(exc).__name__}, not ConfigError")
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
