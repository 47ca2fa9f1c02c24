"""The HL7 v2 destination: the draft report as an ORU^R01 (HL7 v2.5.1) over MLLP.

:func:`build_oru` builds the message with ``hl7apy`` against the v2.5.1 ``ORU_R01`` structure
(strict validation) from the report content and the SR header (patient and order data);
:class:`Hl7Destination` sends it (:func:`delivery.mllp.exchange`, over TLS for
``mllp+tls://``) and honours the acknowledgement (:func:`check_ack`).

The message
-----------
* MSH: sending application ``D2R_AE_TITLE``; ``ORU^R01^ORU_R01``; processing ID ``P``;
  version ``2.5.1``; MSH-10 :func:`control_id`, the same for every send of a study's report by
  one model version (as the SR UIDs), so a receiver can recognise a repeat; MSH-18
  ``UNICODE UTF-8`` when the message holds non-ASCII text, which is then encoded in UTF-8
  (without MSH-18 the message is 7-bit ASCII, the HL7 default).
* PID: PID-3 PatientID (with IssuerOfPatientID as assigning authority), PID-5 the name (one
  repetition per DICOM name group: alphabetic, ideographic, phonetic; XPN-8 ``A``/``I``/``P``
  when there is more than one), PID-7 birth date, PID-8 sex.
* ORC ``RE``, OBR: AccessionNumber as placer and filler order number (ORC-2/3, OBR-2/3) and
  OBR-18; OBR-4 the procedure (the SR's ProcedureCodeSequence, else SNOMED CT 399208008
  "Plain chest X-ray"); OBR-7 study date and time; OBR-24 ``RAD``; OBR-25 ``P``
  (preliminary). No result interpreter: the report is a machine's draft, not a person's.
* NTE: that the text is an unverified AI draft, by which model and version (and that the input
  gate was off, when it was).
* OBX, all with OBX-11 ``P`` and the model in OBX-18 (equipment instance identifier):
  ``110180^Study Instance UID^DCM`` and ``^SR Instance UID`` (HD, the UID as an ISO OID, as in
  IHE RAD-28 Structured Report Export); ``59776-5^Findings^LN`` and ``19005-8^Impressions^LN``
  (FT); for each lesion *n* (OBX-4 sub-ID *n*) ``121071^Finding^DCM`` (CWE: the SR's finding code
  with the d2r class as alternate code in ``99D2R``) and ``111012^Certainty of finding^DCM`` (NM,
  percent). An abstention has the two text OBX saying that the model did not assess the study
  and why, and no lesion OBX.

Text is escaped by the HL7 rules (v2.5.1 section 2.7): ``\\E\\`` first, then ``\\F\\ \\S\\ \\T\\
\\R\\``; in FT a line break is ``\\.br\\``; other control characters become spaces, so no value
can end a segment.

The acknowledgement (original mode, v2.5.1 section 2.9.2, table 0008)
---------------------------------------------------------------------
======================  ==========  ==================================================
MSA-1                   outcome     why
======================  ==========  ==================================================
AA, CA                  delivered   application / commit accept
AE                      permanent   "application error": the receiver could not process
                                    this message's content; the same bytes fail again.
                                    Transient when ERR-3 is 206 (record locked) or 207
                                    (application internal error).
AR                      transient   "application reject": for a failure unrelated to the
                                    message content (system down, internal error) or an
                                    unacceptable MSH-9/11/12. Permanent when ERR-3 says the
                                    latter (200-203: unsupported message type, event,
                                    processing ID, version ID).
CE                      transient   "commit error": the receiver could not store it now
CR                      permanent   "commit reject": MSH-9/11/12 not acceptable
MSA-2 not MSH-10        transient   not the answer to this message
no or unreadable ACK    transient
======================  ==========  ==================================================

The ACK's MSA-3 and ERR text go into the error (and so the study database and the audit log)
with the patient's identifiers, name and birth date blanked out.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from hl7apy.base_datatypes import FT, ID, IS, NM, ST, TX
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message, Segment
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from d2r_core.classes import VINDR_CLASSES
from d2r_core.config import TlsSettings
from delivery import mllp
from delivery.content import DeliveryContent
from delivery.destinations import Delivered, DeliveredItem, MllpPeer, StudyResults
from delivery.dimse import client_ssl_context
from delivery.errors import PermanentSendError, TransientSendError
from report.codes import FINDING_CODES, PLAIN_CHEST_XRAY, PRIVATE_SCHEME_DESIGNATOR

__all__ = [
    "MESSAGE_TYPE",
    "Ack",
    "Hl7Destination",
    "build_oru",
    "check_ack",
    "control_id",
    "encode",
    "escape",
    "parse_ack",
    "unescape",
]

logger = logging.getLogger(__name__)

VERSION: Final = "2.5.1"
#: the object type of a delivered HL7 item
MESSAGE_TYPE: Final = "ORU^R01"
_STRICT: Final = VALIDATION_LEVEL.STRICT
_UTF8: Final = "UNICODE UTF-8"
#: MSH-10 is ST(20) in v2.5.1
_CONTROL_ID_LENGTH: Final = 20
_ERROR_TEXT_LENGTH: Final = 300
#: the longest ACK code or control ID quoted in an error message
_QUOTED_LENGTH: Final = 64

# Observation identifiers (OBX-3): (identifier, text, coding system)
STUDY_UID_ID: Final = ("110180", "Study Instance UID", "DCM")
SR_UID_ID: Final = ("", "SR Instance UID", "")
FINDINGS_ID: Final = ("59776-5", "Findings", "LN")
IMPRESSION_ID: Final = ("19005-8", "Impressions", "LN")
FINDING_ID: Final = ("121071", "Finding", "DCM")
CERTAINTY_ID: Final = ("111012", "Certainty of finding", "DCM")
PERCENT_UNIT: Final = ("%", "percent", "UCUM")

_SEX: Final = {"M": "M", "F": "F", "O": "O"}
_NAME_GROUPS: Final = ("A", "I", "P")  # XPN-8, HL7 table 0465
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DIGITS = re.compile(r"^\d+$")


# -- escaping -------------------------------------------------------------------------------


def escape(text: str, *, formatted: bool = False) -> str:
    r"""``text`` as an HL7 value with the default delimiters ``|^~\&``.

    ``formatted`` (FT): line breaks become ``\.br\``; elsewhere, and for every other control
    character, a space.

    >>> escape("a|b^c~d\\e&f")
    'a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f'
    >>> escape("one\ntwo", formatted=True)
    'one\\.br\\two'
    """
    value = text.replace("\\", "\\E\\")  # first: the sequences below add escape characters
    for char, sequence in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        value = value.replace(char, sequence)
    value = _LINE_BREAK.sub("\\\\.br\\\\" if formatted else " ", value)
    return _CONTROL.sub(" ", value)


_SEQUENCE = re.compile(r"\\(F|S|T|R|E|H|N|\.br|\.sp|X[0-9A-Fa-f]*)\\")
_UNESCAPED: Final = {
    "F": "|",
    "S": "^",
    "T": "&",
    "R": "~",
    "E": "\\",
    "H": "",
    "N": "",
    ".br": "\n",
    ".sp": "\n",
}


def unescape(value: str) -> str:
    r"""The text of an HL7 value written with the default delimiters (inverse of :func:`escape`).

    >>> unescape("a\\F\\b\\.br\\c\\E\\")
    'a|b\nc\\'
    """

    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if code.startswith("X"):
            try:
                return bytes.fromhex(code[1:]).decode("utf-8", errors="replace")
            except ValueError:
                return ""
        return _UNESCAPED[code]

    return _SEQUENCE.sub(one, value)


class _Escaped:
    """Mixin: a textual hl7apy value escaped by :func:`escape` (hl7apy's own escaping leaves
    escape-like sequences in the text alone and cannot write ``\\.br\\``)."""

    value: Any
    formatted = False

    def to_er7(self, encoding_chars: Any = None) -> str:
        return escape(str(self.value), formatted=self.formatted)


def _escaped_class(base: Any, formatted: bool = False) -> Any:
    name = base.__name__
    return type(
        f"Escaped{name}",
        (_Escaped, base),
        {"classname": property(lambda self: name), "formatted": formatted},
    )


_TEXT_TYPES: Final = {
    "ST": _escaped_class(ST),
    "IS": _escaped_class(IS),
    "ID": _escaped_class(ID),
    "TX": _escaped_class(TX),
    "FT": _escaped_class(FT, formatted=True),
}


def _value(datatype: str, text: str) -> Any:
    """``text`` as an escaping hl7apy value of ``datatype`` (ST, IS, ID, TX or FT)."""
    return _TEXT_TYPES[datatype](text, validation_level=_STRICT)


def _put(element: Any, name: str, text: str) -> None:
    """Set the textual child ``name`` of ``element`` to ``text`` (its own datatype)."""
    child = getattr(element, name)
    child.value = _value(str(child.datatype), text)


# -- identifiers ----------------------------------------------------------------------------


def control_id(study_instance_uid: str, model_name: str, model_version: str) -> str:
    """MSH-10: the same for every send of one study's report by one model version.

    >>> control_id("1.2.3", "d2r-net", "1.0") == control_id("1.2.3", "d2r-net", "1.0")
    True
    >>> len(control_id("1.2.3", "d2r-net", "1.0"))
    20
    """
    identity = "\x00".join((study_instance_uid, model_name, model_version))
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:_CONTROL_ID_LENGTH].upper()


# -- the message ----------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _dtm(date: str, time: str = "") -> str | None:
    """An HL7 DTM from DICOM DA and TM values (None when the date is not YYYYMMDD)."""
    if len(date) != 8 or not _DIGITS.match(date):
        return None
    whole, _, fraction = time.partition(".")
    if not _DIGITS.match(whole or "x") or len(whole) % 2:
        return date
    fraction = fraction[:4]
    return date + whole + (f".{fraction}" if fraction and _DIGITS.match(fraction) else "")


def _set_components(element: Any, prefix: str, values: Sequence[str]) -> None:
    """Set ``<prefix>_1``, ``<prefix>_2``, ... of ``element`` to the non-empty ``values``."""
    for index, value in enumerate(values, start=1):
        if value:
            _put(element, f"{prefix}_{index}", value)


def _set_varies(field: Any, values: Sequence[Any]) -> None:
    """Fill OBX-5 (datatype ``varies``) with one typed value per component.

    hl7apy builds the components of a ``varies`` field only by parsing; parse a placeholder of
    the right shape, then put the typed (escaping) values in.
    """
    field.value = "^".join("x" for _ in values)
    for component, value in zip(field.children, values, strict=True):
        component.children[0].value = value


def _patient(pid: Segment, header: Dataset) -> None:
    patient_id = _text(header, "PatientID")
    if not patient_id:
        raise PermanentSendError("the study has no PatientID; an ORU^R01 needs PID-3")
    pid.pid_1 = "1"
    cx = pid.pid_3
    _put(cx, "cx_1", patient_id)
    issuer = _text(header, "IssuerOfPatientID")
    qualifiers = header.get("IssuerOfPatientIDQualifiersSequence") or []
    qualifier = qualifiers[0] if len(qualifiers) else Dataset()
    universal = (_text(qualifier, "UniversalEntityID"), _text(qualifier, "UniversalEntityIDType"))
    if issuer or universal[0]:
        _set_components(cx.cx_4, "hd", (issuer, *universal))
    if type_code := _text(qualifier, "IdentifierTypeCode"):
        _put(cx, "cx_5", type_code)
    _name(pid, _name_groups(header))
    if birth := _dtm(_text(header, "PatientBirthDate")):
        pid.pid_7 = birth
    if sex := _SEX.get(_text(header, "PatientSex").upper()):
        pid.pid_8 = sex


def _name_groups(header: Dataset) -> list[str]:
    """The PatientName's groups (alphabetic, ideographic, phonetic), ``[]`` when empty."""
    value = header.get("PatientName")
    if value is None:
        return []
    groups = [str(group) for group in PersonName(str(value)).components]
    return groups if any(groups) else []


def _name(pid: Segment, groups: list[str]) -> None:
    """PID-5: DICOM PN groups -> XPN repetitions (family^given^middle^suffix^prefix)."""
    for index, group in enumerate(groups):
        if not group:
            continue
        family, given, middle, prefix, suffix = (group.split("^") + [""] * 5)[:5]
        xpn = pid.add_field("PID_5")
        if family:
            _put(xpn.xpn_1, "fn_1", family)
        _set_components(xpn, "xpn", ("", given, middle, suffix, prefix))
        if len(groups) > 1:
            xpn.xpn_8 = _NAME_GROUPS[index]
    if not groups:  # PID-5 is required: a name of unknown type (HL7 table 0200 "U")
        pid.pid_5.xpn_7 = "U"


def _procedure(header: Dataset) -> tuple[str, str, str]:
    for item in header.get("ProcedureCodeSequence") or []:
        code = (_text(item, "CodeValue"), _text(item, "CodeMeaning"))
        if code[0]:
            return code[0], code[1], _text(item, "CodingSchemeDesignator")
    return PLAIN_CHEST_XRAY.value, PLAIN_CHEST_XRAY.meaning, PLAIN_CHEST_XRAY.scheme_designator


def _order(orc: Segment, obr: Segment, header: Dataset, when: str) -> None:
    accession = _text(header, "AccessionNumber")
    orc.orc_1 = "RE"
    obr.obr_1 = "1"
    if accession:
        for number in (orc.orc_2, orc.orc_3, obr.obr_2, obr.obr_3):
            _put(number, "ei_1", accession)
        _put(obr, "obr_18", accession)
    _set_components(obr.obr_4, "ce", _procedure(header))
    if observed := _dtm(_text(header, "StudyDate"), _text(header, "StudyTime")):
        obr.obr_7 = observed
    obr.obr_22 = when
    obr.obr_24 = "RAD"
    obr.obr_25 = "P"


@dataclass
class _Observations:
    """Numbers the OBX segments of one order and fills their common fields."""

    order: Any
    when: str
    equipment: str
    count: int = 0

    def add(
        self,
        value_type: str,
        identifier: tuple[str, str, str],
        values: Sequence[Any],
        sub: str = "",
    ) -> Segment:
        self.count += 1
        obx = self.order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
        obx.obx_1 = str(self.count)
        obx.obx_2 = value_type
        _set_components(obx.obx_3, "ce", identifier)
        if sub:
            obx.obx_4 = sub
        _set_varies(obx.obx_5, values)
        obx.obx_11 = "P"
        obx.obx_14 = self.when
        _put(obx.obx_18, "ei_1", self.equipment)
        return obx


def _finding_code(class_name: str) -> list[Any]:
    """CWE of a lesion: the SR's finding code, the d2r class as alternate code."""
    local = (str(VINDR_CLASSES.index(class_name)), class_name, PRIVATE_SCHEME_DESIGNATOR)
    codes = FINDING_CODES[class_name].finding
    primary = (codes.value, codes.meaning, codes.scheme_designator)
    values = primary if primary == local else (*primary, *local)
    return [_value("ST", v) for v in values]


def abstention_text(content: DeliveryContent) -> tuple[str, str]:
    """Findings and impression of an abstention: who declined the study, and why."""
    who = f"model {content.model_name} version {content.model_version}"
    reason = content.abstain_reason or "not given"
    return (
        f"Not assessed: this study was not assessed by the AI {who}. Reason: {reason}.",
        "Not assessed by AI: no AI findings for this study.",
    )


def build_oru(
    results: StudyResults,
    *,
    sending_application: str,
    now: datetime.datetime | None = None,
) -> Message:
    """The ORU^R01 of ``results`` (module docstring), validated against HL7 v2.5.1.

    Raises
    ------
    PermanentSendError
        When the study has no report content or no PatientID, or the message does not
        validate (nothing that a retry changes).
    """
    content = results.content
    if content is None or not results.reports:
        raise PermanentSendError(
            "no report content beside the SRs (results of an older release); "
            "run `d2r retry --reprocess` to report the study again"
        )
    header = results.reports[0]
    stamp = now or datetime.datetime.now().astimezone()  # local time with its UTC offset
    when = stamp.strftime("%Y%m%d%H%M%S%z")
    try:
        message = Message("ORU_R01", version=VERSION, validation_level=_STRICT)
        msh = message.msh
        _put(msh.msh_3, "hd_1", sending_application)
        msh.msh_7 = when
        msh.msh_9 = "ORU^R01^ORU_R01"
        msh.msh_10 = control_id(
            results.study_instance_uid, content.model_name, content.model_version
        )
        msh.msh_11 = "P"
        msh.msh_12 = VERSION
        result = message.add_group("ORU_R01_PATIENT_RESULT")
        _patient(result.add_group("ORU_R01_PATIENT").add_segment("PID"), header)
        order = result.add_group("ORU_R01_ORDER_OBSERVATION")
        _order(order.add_segment("ORC"), order.add_segment("OBR"), header, when)
        for number, note in enumerate(_notes(content), start=1):
            nte = order.add_segment("NTE")
            nte.nte_1 = str(number)
            _put(nte, "nte_3", note)
        _observations(
            _Observations(order, when, f"{content.model_name} {content.model_version}"),
            results.study_instance_uid,
            content,
        )
        message.validate()
    except HL7apyException as exc:
        raise PermanentSendError(f"the ORU^R01 does not validate: {type(exc).__name__}") from exc
    if not message.to_er7().isascii():
        message.msh.msh_18 = _UTF8
    return message


def _notes(content: DeliveryContent) -> list[str]:
    notes = [
        f"Preliminary draft generated by the AI model {content.model_name} version "
        f"{content.model_version}; not verified by a physician."
    ]
    if not content.input_gate:
        notes.append(
            "The input gate was off: the image was not checked against the inputs the model "
            "was validated on."
        )
    return notes


def _uid(uid: str) -> list[Any]:
    """HD of a DICOM UID: universal ID (HD-2) of type ISO (an OID)."""
    return [_value("ST", ""), _value("ST", uid), _value("ST", "ISO")]


def _observations(obs: _Observations, study_uid: str, content: DeliveryContent) -> None:
    obs.add("HD", STUDY_UID_ID, _uid(study_uid))
    if content.sr_sop_instance_uid:
        obs.add("HD", SR_UID_ID, _uid(content.sr_sop_instance_uid))
    findings, impression = content.findings, content.impression
    if content.abstained:
        findings, impression = abstention_text(content)
    for identifier, text in ((FINDINGS_ID, findings), (IMPRESSION_ID, impression)):
        if text.strip():
            obs.add("FT", identifier, [_value("FT", text)])
    if content.abstained:
        return
    for number, lesion in enumerate(content.lesions, start=1):
        obs.add("CWE", FINDING_ID, _finding_code(lesion.class_name), sub=str(number))
        percent = Decimal(round(lesion.score * 100, 1)).quantize(Decimal("0.1"))
        obx = obs.add("NM", CERTAINTY_ID, [NM(percent, validation_level=_STRICT)], sub=str(number))
        _set_components(obx.obx_6, "ce", PERCENT_UNIT)


def encode(message: Message) -> bytes:
    """The message's bytes: UTF-8 when MSH-18 says so, else ASCII (the HL7 default)."""
    text = str(message.to_er7())
    charset = message.msh.msh_18.to_er7()
    return text.encode("utf-8" if charset == _UTF8 else "ascii")


# -- the acknowledgement --------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """What an acknowledgement says (text unescaped)."""

    code: str
    control_id: str
    text: str
    error_codes: tuple[str, ...] = ()


def _field(segment: Any, name: str) -> str:
    try:
        return str(getattr(segment, name).to_er7())
    except (HL7apyException, AttributeError, IndexError):
        return ""


def parse_ack(data: bytes) -> Ack:
    """Read an acknowledgement (v2.x, any character set we can decode).

    Raises
    ------
    ValueError
        When ``data`` is not an HL7 message with an MSA segment.
    """
    text = data.decode("utf-8", errors="replace").strip("\r\n")
    try:
        message = parse_message(
            text.replace("\n", "\r"),
            validation_level=VALIDATION_LEVEL.TOLERANT,
            find_groups=False,
        )
    except (HL7apyException, IndexError, KeyError, TypeError, ValueError) as exc:
        # hl7apy also fails with IndexError and friends on a malformed MSH (e.g. five
        # encoding characters and fewer than twelve fields)
        raise ValueError(f"unreadable acknowledgement ({type(exc).__name__})") from None
    segments = {child.name: child for child in reversed(message.children)}
    if "MSA" not in segments:
        raise ValueError("acknowledgement without an MSA segment")
    msa = segments["MSA"]
    texts = [_field(msa, "msa_3")]
    codes: list[str] = []
    for err in (c for c in message.children if c.name == "ERR"):
        code = _field(err, "err_3")
        if code:
            codes.append(code.split("^")[0])
        texts += [code.replace("^", " "), _field(err, "err_7"), _field(err, "err_8")]
    return Ack(
        code=_field(msa, "msa_1").upper(),
        control_id=unescape(_field(msa, "msa_2")),
        text="; ".join(unescape(t).strip() for t in texts if t.strip()),
        error_codes=tuple(codes),
    )


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` (2 characters or more) replaced by ``***``.

    >>> redact("no patient Doe (ID 123)", ["Doe", "123"])
    'no patient *** (ID ***)'
    """
    for secret in sorted({s for s in secrets if len(s) >= 2}, key=len, reverse=True):
        text = re.sub(re.escape(secret), "***", text, flags=re.IGNORECASE)
    return text


def patient_identifiers(header: Dataset) -> list[str]:
    """The values of ``header`` that identify the patient (for :func:`redact`)."""
    values = [
        _text(header, keyword)
        for keyword in ("PatientID", "IssuerOfPatientID", "PatientBirthDate", "AccessionNumber")
    ]
    for group in _name_groups(header):
        values += group.split("^")
    return [v.strip() for v in values if v and v.strip()]


_PERMANENT_REJECT: Final = frozenset({"200", "201", "202", "203"})
_TRANSIENT_ERROR: Final = frozenset({"206", "207"})


def _one_line(text: str, secrets: Iterable[str]) -> str:
    """``text`` redacted, as one line of printable characters (it ends up in logs).

    >>> _one_line("busy\\x00\\x1b[2J Doe\\r\\n", ["Doe"])
    'busy [2J ***'
    """
    printable = "".join(c if c.isprintable() else " " for c in redact(text, secrets))
    return " ".join(printable.split())


def check_ack(ack: Ack, expected_control_id: str, *, name: str, secrets: Iterable[str]) -> None:
    """Raise unless ``ack`` accepts the message ``expected_control_id`` (module docstring).

    Raises
    ------
    TransientSendError, PermanentSendError
        With the ACK's code and (redacted, shortened) text.
    """
    if ack.control_id != expected_control_id:
        got = _one_line(ack.control_id, secrets)[:_QUOTED_LENGTH]
        raise TransientSendError(
            f"{name}: acknowledgement for message {got!r}, not {expected_control_id!r}"
        )
    if ack.code in ("AA", "CA"):
        return
    detail = _one_line(ack.text, secrets)[:_ERROR_TEXT_LENGTH]
    code = _one_line(ack.code, secrets)[:_QUOTED_LENGTH] or "no MSA-1"
    message = f"{name} answered {code}" + (f": {detail}" if detail else "")
    codes = set(ack.error_codes)
    if ack.code == "AE":
        transient = bool(codes & _TRANSIENT_ERROR)
    elif ack.code == "AR":
        transient = not codes & _PERMANENT_REJECT
    else:
        transient = ack.code == "CE"
    raise (TransientSendError if transient else PermanentSendError)(message)


# -- the destination ------------------------------------------------------------------------


@dataclass(frozen=True)
class Hl7Destination:
    """The draft report as an ORU^R01 to one MLLP receiver."""

    peer: MllpPeer
    sending_application: str
    timeout: float = 60.0
    tls: TlsSettings = TlsSettings()
    kind: str = "mllp"

    @property
    def name(self) -> str:
        """``mllp://host:port`` or ``mllp+tls://host:port``."""
        return self.peer.name

    def send(self, results: StudyResults) -> Delivered:
        """Send the ORU^R01 and honour the ACK; the item is the message control ID and "AA"."""
        message = build_oru(results, sending_application=self.sending_application)
        expected = str(message.msh.msh_10.to_er7())
        try:
            context = client_ssl_context(self.tls) if self.peer.tls else None
        except OSError as exc:
            raise TransientSendError(f"{self.name}: TLS files: {exc}") from exc
        answer = mllp.exchange(
            self.peer.host,
            self.peer.port,
            encode(message),
            timeout=self.timeout,
            context=context,
            name=self.name,
        )
        try:
            ack = parse_ack(answer)
        except ValueError as exc:
            raise TransientSendError(f"{self.name}: {exc}") from None
        check_ack(ack, expected, name=self.name, secrets=patient_identifiers(results.reports[0]))
        logger.info("sent %s %s to %s: %s", MESSAGE_TYPE, expected, self.name, ack.code)
        return Delivered((DeliveredItem(expected, ack.code, MESSAGE_TYPE),))
