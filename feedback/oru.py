"""An ORU^R01 carrying a signed report, read, and the acknowledgement written, with hl7apy.

:func:`read_oru` parses the message with hl7apy (tolerant validation, so that the v2.x
versions RIS send are accepted) and takes from it:

* MSH-10 (the control ID echoed in MSA-2), MSH-3 and MSH-4 (the source), MSH-9 (must be
  ``ORU^R01``);
* the accession number: OBR-3 (filler order number), else OBR-2 (placer order number), else
  ORC-3, else ORC-2, else OBR-18, the first component of each;
* Study Instance UIDs: the OBX whose identifier (OBX-3) is DICOM ``110180`` or names "Study
  Instance UID", and the first field of a ``ZDS`` segment (IHE RAD-28);
* the result status: OBR-25 (F final, C corrected, P preliminary, ...), else OBX-11 of the
  first text OBX;
* the report text: the values of the text OBX (types TX, FT, ST; each repetition a line),
  unescaped with the message's own delimiters (``\\.br\\`` a line break).

Field values are taken from the segments hl7apy split, by the encoding characters of MSH-1
and MSH-2, because hl7apy re-escapes a value's backslashes when it hands it out.

:func:`build_ack` writes the original-mode acknowledgement (HL7 v2.5.1 section 2.9.2):
``ACK^R01^ACK`` with MSA-1 the code, MSA-2 the message's MSH-10 and MSA-3 the reason.
"""

from __future__ import annotations

import datetime
import re
import secrets
from dataclasses import dataclass
from typing import Any, Final

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from feedback.match import ACCEPT, ERROR, REJECT, printable

__all__ = [
    "ACCEPT",
    "ERROR",
    "REJECT",
    "OruReport",
    "OruRejected",
    "build_ack",
    "printable",
    "read_oru",
]

ACK_VERSION: Final = "2.5.1"
#: MSA-3 is ST(80) in v2.5.1
_ACK_TEXT_LENGTH: Final = 80
_CONTROL_ID_LENGTH: Final = 20
#: the longest value kept from a peer's identifier fields
_ID_LENGTH: Final = 64
STUDY_UID_CODE: Final = "110180"
_TEXT_TYPES: Final = ("TX", "FT", "ST")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class OruRejected(Exception):
    """A message that is not a readable ORU^R01; ``code`` is the MSA-1 to answer with.

    Parameters
    ----------
    code : str
        ``AR`` (not an acceptable message type or not HL7 at all) or ``AE`` (an ORU^R01
        without what a signed report needs).
    reason : str
        MSA-3, our own words (no peer text).
    control_id : str
        The message's MSH-10 when it could be read, else empty.
    """

    def __init__(self, code: str, reason: str, control_id: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.control_id = control_id


@dataclass(frozen=True)
class OruReport:
    """What d2r takes from one ORU^R01 (module docstring)."""

    control_id: str
    #: ``hl7:`` + MSH-3 and MSH-4, printable
    source: str
    #: OBR-25 (else the text OBX's OBX-11), upper case; empty when absent
    result_status: str
    #: candidate accession numbers, most specific first, without repeats
    accession_numbers: tuple[str, ...]
    #: Study Instance UIDs the message names (OBX 110180, ZDS-1), without repeats
    study_uids: tuple[str, ...]
    #: the report text (empty when the message has none)
    text: str
    #: MSH-3 and MSH-4 as received, for the acknowledgement's MSH-5 and MSH-6
    sender: tuple[str, str] = ("", "")


@dataclass(frozen=True)
class _Encoding:
    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str

    @classmethod
    def of(cls, msh: str) -> _Encoding:
        field = msh[3] if len(msh) > 3 else "|"
        others = (msh[4:8] + "^~\\&"[len(msh[4:8]) :]) if len(msh) > 4 else "^~\\&"
        return cls(field, others[0], others[1], others[2], others[3])

    def unescape(self, value: str) -> str:
        r"""The text of ``value`` (escape sequences of HL7 v2.5.1 section 2.7 resolved).

        >>> _Encoding.of("MSH|^~\\&").unescape("a\\F\\b\\.br\\c\\E\\d\\X41\\")
        'a|b\nc\\dA'
        """
        e = re.escape(self.escape)
        delimiters = {
            "F": self.field,
            "S": self.component,
            "T": self.subcomponent,
            "R": self.repetition,
            "E": self.escape,
            ".br": "\n",
            ".sp": "\n",
        }

        def one(match: re.Match[str]) -> str:
            code = match.group(1)
            if code.startswith("X"):
                try:
                    return bytes.fromhex(code[1:]).decode("utf-8", errors="replace")
                except ValueError:
                    return ""
            return delimiters.get(code, "")

        codes = r"F|S|T|R|E|H|N|\.br|\.sp|\.in[+-]?\d*|\.ti[+-]?\d*|X[0-9A-Fa-f]*"
        return re.sub(rf"{e}({codes}){e}", one, value)


def _split(raw: str, enc: _Encoding) -> list[str]:
    """The fields of one segment; index n is field n (MSH: MSH-1 is the field separator)."""
    parts = raw.split(enc.field)
    if parts[0] == "MSH":
        return ["MSH", enc.field, *parts[1:]]
    return parts


def _get(fields: list[str], index: int) -> str:
    return fields[index] if index < len(fields) else ""


def _first(value: str, enc: _Encoding) -> str:
    """The first component of the first repetition, unescaped."""
    return enc.unescape(value.split(enc.repetition)[0].split(enc.component)[0]).strip()


def _segments(message: Any) -> list[tuple[str, str]]:
    """(name, raw ER7 text) of each segment, in order, as hl7apy parsed them."""
    return [(child.name, child.to_er7()) for child in message.children]


def _parse(data: bytes) -> tuple[Any, str]:
    text = data.decode("utf-8", errors="replace").strip("\r\n").replace("\r\n", "\r")
    text = text.replace("\n", "\r")
    if not text.startswith("MSH"):
        raise OruRejected(REJECT, "not an HL7 v2 message")
    try:
        message = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    except (HL7apyException, IndexError, KeyError, TypeError, ValueError):
        raise OruRejected(REJECT, "unreadable HL7 v2 message") from None
    return message, text


def _raw_segments(text: str) -> list[str]:
    return [s for s in text.split("\r") if s.strip()]


def read_oru(data: bytes) -> OruReport:
    """Read one ORU^R01 (module docstring).

    Raises
    ------
    OruRejected
        ``AR`` for bytes that are not an HL7 message or a message other than ORU^R01,
        ``AE`` for an ORU^R01 without an OBR segment.
    """
    _message, text = _parse(data)  # hl7apy checks the message's structure
    raw = _raw_segments(text)
    enc = _Encoding.of(raw[0])
    msh = _split(raw[0], enc)
    control_id = printable(enc.unescape(_get(msh, 10)))
    kind = [enc.unescape(c) for c in _get(msh, 9).split(enc.component)]
    if kind[:2] != ["ORU", "R01"]:
        raise OruRejected(REJECT, "unsupported message type: only ORU^R01", control_id)
    by_name: dict[str, list[list[str]]] = {}
    for segment in raw[1:]:
        fields = _split(segment, enc)
        by_name.setdefault(fields[0][:3], []).append(fields)
    if "OBR" not in by_name:
        raise OruRejected(ERROR, "no OBR segment: no order to match the report to", control_id)
    obr, orc = by_name["OBR"][0], (by_name.get("ORC") or [[]])[0]
    accessions = [
        _first(v, enc)
        for v in (_get(obr, 3), _get(obr, 2), _get(orc, 3), _get(orc, 2), _get(obr, 18))
    ]
    texts, uids, status = _observations(by_name.get("OBX", []), enc)
    uids += [_first(_get(z, 1), enc) for z in by_name.get("ZDS", [])]
    sender = (printable(_first(_get(msh, 3), enc)), printable(_first(_get(msh, 4), enc)))
    return OruReport(
        control_id=control_id,
        source=printable("hl7:" + "^".join(sender), 255),
        result_status=printable(_first(_get(obr, 25), enc) or status, 8).upper(),
        accession_numbers=_unique(printable(a) for a in accessions),
        study_uids=_unique(u for u in uids if _UID.match(u) and len(u) <= _ID_LENGTH),
        text="\n".join(texts).strip(),
        sender=sender,
    )


def _observations(
    observations: list[list[str]], enc: _Encoding
) -> tuple[list[str], list[str], str]:
    """The report lines, the Study Instance UIDs and the first text OBX's OBX-11."""
    texts: list[str] = []
    uids: list[str] = []
    status = ""
    for obx in observations:
        identifier = [enc.unescape(c) for c in _get(obx, 3).split(enc.component)]
        values = [v for v in _get(obx, 5).split(enc.repetition)]
        if STUDY_UID_CODE in identifier[:1] or "study instance uid" in " ".join(identifier).lower():
            uids += [_first(v, enc) for v in values]
        elif _get(obx, 2).strip().upper() in _TEXT_TYPES:
            texts += [enc.unescape(v).rstrip() for v in values]
            status = status or _first(_get(obx, 11), enc)
    return texts, uids, status


def _unique(values: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in values if v))


def build_ack(
    code: str,
    *,
    control_id: str,
    reason: str,
    sending_application: str,
    receiver: tuple[str, str] = ("", ""),
    now: datetime.datetime | None = None,
) -> bytes:
    """The original-mode ACK: MSA-1 ``code``, MSA-2 ``control_id``, MSA-3 ``reason``.

    >>> ack = build_ack("AA", control_id="C1", reason="stored", sending_application="D2R",
    ...                 now=datetime.datetime(2026, 1, 2, 9, 30))
    >>> ack.split(b"\\r")[1]
    b'MSA|AA|C1|stored'
    """
    ack = Message("ACK", version=ACK_VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    stamp = (now or datetime.datetime.now().astimezone()).strftime("%Y%m%d%H%M%S%z")
    ack.msh.msh_3 = _escape(sending_application)
    if receiver[0]:
        ack.msh.msh_5 = _escape(receiver[0])
    if receiver[1]:
        ack.msh.msh_6 = _escape(receiver[1])
    ack.msh.msh_7 = stamp
    ack.msh.msh_9 = "ACK^R01^ACK"
    ack.msh.msh_10 = secrets.token_hex(_CONTROL_ID_LENGTH // 2).upper()
    ack.msh.msh_11 = "P"
    msa = ack.add_segment("MSA")
    msa.msa_1 = code
    msa.msa_2 = _escape(control_id)
    msa.msa_3 = _escape(reason[:_ACK_TEXT_LENGTH])
    return str(ack.to_er7()).encode("utf-8")


def _escape(text: str) -> str:
    r"""``text`` with the default delimiters escaped (HL7 v2.5.1 section 2.7).

    >>> _escape("a|b^c\\d")
    'a\\F\\b\\S\\c\\E\\d'
    """
    value = printable(text, 1000).replace("\\", "\\E\\")
    for char, sequence in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        value = value.replace(char, sequence)
    return value
