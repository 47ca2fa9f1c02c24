"""The names of the objects d2r can write for a study (``D2R_OUTPUTS``), parsed without loading
the builders, so every process that reads the settings (the node included) can check them.

The builders are in :mod:`report.outputs`, whose :class:`~report.outputs.Output` carries the
same names.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_OUTPUT_NAMES", "OUTPUT_NAMES", "SR_OUTPUT_NAMES", "parse_output_names"]

#: every output, in the order d2r writes them: the SRs first, TID 1500 first
OUTPUT_NAMES: Final = ("tid1500", "text", "gsps", "sc")
#: the outputs that are SRs (HL7 and FHIR messages reference one)
SR_OUTPUT_NAMES: Final = ("tid1500", "text")
DEFAULT_OUTPUT_NAMES: Final = ("tid1500", "text", "gsps")


def parse_output_names(text: str) -> tuple[str, ...]:
    """A comma-separated list of outputs, in :data:`OUTPUT_NAMES` order, each once.

    >>> parse_output_names(" gsps, TID1500 ")
    ('tid1500', 'gsps')
    >>> parse_output_names("tid1500,pdf")
    Traceback (most recent call last):
    ...
    ValueError: unknown output 'pdf'; expected a comma-separated list of tid1500, text, gsps, sc
    """
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    allowed = ", ".join(OUTPUT_NAMES)
    for name in names:
        if name not in OUTPUT_NAMES:
            raise ValueError(
                f"unknown output {name!r}; expected a comma-separated list of {allowed}"
            )
    if not names:
        raise ValueError(f"no output named; expected a comma-separated list of {allowed}")
    if not set(names) & set(SR_OUTPUT_NAMES):
        raise ValueError("name tid1500 or text: HL7 and FHIR messages reference an SR")
    return tuple(o for o in OUTPUT_NAMES if o in names)
