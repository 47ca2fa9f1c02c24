"""A template-aware check of d2r's SRs against DICOM PS3.16 (the rows d2r emits).

``dciodvfy`` and ``dsrdump`` check the IOD and the SR relationship constraints, not the templates.
:func:`check_sr` walks the content tree from the template the document declares
(ContentTemplateSequence, DCMR) and checks, row by row, the concept name, value type and
relationship type of every item, how often a row occurs, and the context group of the coded
values whose group the template names (CID 100 "Procedure reported", CID 270 observer type,
CID 219 geometric purpose, CID 7000/7001/7002 titles, headings and report elements):

* TID 1500 Measurement Report with TID 1204, TID 1001/1002/1004, TID 1600/1601/1602,
  the measurement groups as TID 1410 (or TID 1501) with TID 4108, TID 4019 and TID 1419 NUMs;
* TID 2000 Basic Diagnostic Imaging Report with TID 2001 sections of TID 2002 observations.

A missing mandatory row, a row too often, a value outside a defined group, a wrong value or
relationship type, or an undeclared/unknown template is an **error**. An item no row of the
template allows at its position is a **warning**; :data:`DOCUMENTED_DEPARTURES` lists the
ones d2r writes on purpose (docs/air-conformance.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.sr.codedict import Collection

__all__ = ["DOCUMENTED_DEPARTURES", "Finding", "check_sr", "errors", "warnings"]

Concept = tuple[str, str]  # (code value, coding scheme designator)


def _cid(number: int) -> frozenset[Concept]:
    group = Collection(f"CID{number}")
    return frozenset(
        (getattr(group, name).value, getattr(group, name).scheme_designator) for name in group.dir()
    )


#: items d2r writes outside the rows of the template at their position, on purpose
DOCUMENTED_DEPARTURES: frozenset[Concept] = frozenset(
    {
        ("130400", "DCM"),  # Geometric purpose of region (CP 1852) in a TID 1410 group
        ("C0034375", "UMLS"),  # Qualitative Evaluations TEXT: a lesion's grounded sentence
        ("121106", "DCM"),  # Comment TEXT labels of the TID 1501 encoding (OHIF labels)
    }
)


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" or "warning"
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message}"


@dataclass(frozen=True)
class Row:
    """One row of a template: relationship, value type, concept name (None: any concept, or
    any of ``names``), how often, the group its coded value must come from, and the template
    that checks the item's children."""

    relationship: str
    value_type: str
    name: Concept | None
    minimum: int = 0
    maximum: int | None = 1
    names: frozenset[Concept] | None = None
    values: frozenset[Concept] | None = None
    children: Callable[[Dataset, str, list[Finding]], None] | None = None
    label: str = field(default="")

    def matches(self, item: Dataset) -> bool:
        if str(item.get("RelationshipType", "")) != self.relationship:
            return False
        if str(item.ValueType) != self.value_type:
            return False
        concept = _concept(item.ConceptNameCodeSequence[0]) if _named(item) else None
        if self.name is not None:
            return concept == self.name
        return self.names is None or concept in self.names


def _named(item: Dataset) -> bool:
    return "ConceptNameCodeSequence" in item and len(item.ConceptNameCodeSequence) > 0


def _concept(code: Dataset) -> Concept:
    return (str(code.CodeValue), str(code.CodingSchemeDesignator))


def _describe(item: Dataset) -> str:
    name = item.ConceptNameCodeSequence[0] if _named(item) else None
    meaning = f'"{name.CodeMeaning}"' if name is not None else "(no concept name)"
    return f"{item.get('RelationshipType', '-')} {item.ValueType} {meaning}"


def _check_rows(
    items: Sequence[Dataset], rows: Sequence[Row], path: str, out: list[Finding]
) -> None:
    """Match each item to the first row it fits; count the rows; recurse into children."""
    counts = [0] * len(rows)
    for index, item in enumerate(items, start=1):
        where = f"{path}/{index}"
        row_index = next((i for i, row in enumerate(rows) if row.matches(item)), None)
        if row_index is None:
            known = _named(item) and _concept(item.ConceptNameCodeSequence[0]) in (
                DOCUMENTED_DEPARTURES
            )
            note = " (documented departure)" if known else ""
            out.append(Finding("warning", where, f"{_describe(item)} not in template{note}"))
            continue
        row = rows[row_index]
        counts[row_index] += 1
        if row.values is not None and str(item.ValueType) == "CODE":
            value = _concept(item.ConceptCodeSequence[0])
            if value not in row.values:
                out.append(
                    Finding("error", where, f"{_describe(item)} value {value} not in its group")
                )
        if row.children is not None:
            row.children(item, where, out)
        elif "ContentSequence" in item and row.value_type in ("CONTAINER",):
            out.append(Finding("warning", where, f"{_describe(item)} has unexpected children"))
    for row, count in zip(rows, counts, strict=True):
        what = row.label or str(row.name)
        if count < row.minimum:
            out.append(Finding("error", path, f"mandatory row {what} missing"))
        if row.maximum is not None and count > row.maximum:
            out.append(Finding("error", path, f"row {what} {count} times, at most {row.maximum}"))


def _sub(rows: Sequence[Row]) -> Callable[[Dataset, str, list[Finding]], None]:
    def check(item: Dataset, path: str, out: list[Finding]) -> None:
        _check_rows(list(item.get("ContentSequence", [])), rows, path, out)

    return check


def _dcm(value: str) -> Concept:
    return (value, "DCM")


# TID 1204 language, TID 1001/1002/1004 observation context (device observer)
_LANGUAGE = Row("HAS CONCEPT MOD", "CODE", _dcm("121049"), 0, 1, label="Language")
_OBSERVER_CONTEXT = [
    Row("HAS OBS CONTEXT", "CODE", _dcm("121005"), 0, None, values=_cid(270), label="Observer"),
    Row("HAS OBS CONTEXT", "UIDREF", _dcm("121012"), 0, None, label="Device Observer UID"),
    Row("HAS OBS CONTEXT", "TEXT", _dcm("121013"), 0, None, label="Device Observer Name"),
    Row("HAS OBS CONTEXT", "TEXT", _dcm("121014"), 0, None, label="Device Manufacturer"),
    Row("HAS OBS CONTEXT", "TEXT", _dcm("121015"), 0, None, label="Device Model Name"),
    Row("HAS OBS CONTEXT", "TEXT", _dcm("121016"), 0, None, label="Device Serial Number"),
    Row("HAS OBS CONTEXT", "TEXT", _dcm("121017"), 0, None, label="Device Location"),
]
# TID 1602/1603 image library entry descriptors
_IMAGE_DESCRIPTORS = [
    Row("HAS ACQ CONTEXT", "CODE", _dcm("121139"), 0, 1, values=_cid(29), label="Modality"),
    Row("HAS ACQ CONTEXT", "NUM", _dcm("110910"), 0, 1, label="Pixel Data Rows"),
    Row("HAS ACQ CONTEXT", "NUM", _dcm("110911"), 0, 1, label="Pixel Data Columns"),
    Row("HAS ACQ CONTEXT", "NUM", _dcm("111026"), 0, 1, label="Horizontal Pixel Spacing"),
    Row("HAS ACQ CONTEXT", "NUM", _dcm("111066"), 0, 1, label="Vertical Pixel Spacing"),
    Row("HAS ACQ CONTEXT", "TEXT", _dcm("111044"), 0, 1, label="Patient Orientation Row"),
    Row("HAS ACQ CONTEXT", "TEXT", _dcm("111043"), 0, 1, label="Patient Orientation Column"),
]
_IMAGE_LIBRARY = [
    Row(
        "CONTAINS",
        "CONTAINER",
        _dcm("126200"),
        0,
        None,
        label="Image Library Group",
        children=_sub(
            [
                Row(
                    "CONTAINS",
                    "IMAGE",
                    None,
                    1,
                    None,
                    label="Image Library Entry",
                    children=_sub(_IMAGE_DESCRIPTORS),
                )
            ]
        ),
    )
]
_SELECTED_FROM = [Row("SELECTED FROM", "IMAGE", None, 1, 1, label="Source image")]
_IMAGE_REGION = Row(
    "CONTAINS",
    "SCOORD",
    _dcm("111030"),
    0,
    1,
    label="Image Region",
    children=_sub(_SELECTED_FROM),
)
# TID 1419 measurement: a NUM, optionally INFERRED FROM its region (TID 300/320)
_MEASUREMENT = Row(
    "CONTAINS",
    "NUM",
    None,
    0,
    None,
    label="Measurement",
    children=_sub(
        [
            Row(
                "INFERRED FROM",
                "SCOORD",
                _dcm("111030"),
                0,
                1,
                label="Image Region",
                children=_sub(_SELECTED_FROM),
            )
        ]
    ),
)
_GROUP_COMMON = [
    Row("HAS OBS CONTEXT", "TEXT", _dcm("112039"), 1, 1, label="Tracking Identifier"),
    Row("HAS OBS CONTEXT", "UIDREF", _dcm("112040"), 1, 1, label="Tracking Unique Identifier"),
    Row("CONTAINS", "CODE", _dcm("121071"), 0, 1, label="Finding"),
    Row("HAS CONCEPT MOD", "CODE", ("363698007", "SCT"), 0, None, label="Finding Site"),
    # TID 4019 Algorithm Identification
    Row("HAS CONCEPT MOD", "TEXT", _dcm("111001"), 0, 1, label="Algorithm Name"),
    Row("HAS CONCEPT MOD", "TEXT", _dcm("111003"), 0, 1, label="Algorithm Version"),
    Row("HAS CONCEPT MOD", "TEXT", _dcm("111002"), 0, None, label="Algorithm Parameters"),
    _MEASUREMENT,
    Row("CONTAINS", "CODE", ("C0034375", "UMLS"), 0, None, label="Qualitative Evaluations"),
]
#: TID 1410 Planar ROI Measurements and Qualitative Evaluations
_TID1410 = [*_GROUP_COMMON, _IMAGE_REGION]
#: TID 1501 Measurement and Qualitative Evaluation Group
_TID1501 = [
    *_GROUP_COMMON,
    Row("CONTAINS", "IMAGE", _dcm("121112"), 0, None, label="Source of Measurement"),
]


def _measurement_group(item: Dataset, path: str, out: list[Finding]) -> None:
    items = list(item.get("ContentSequence", []))
    planar = any(str(i.ValueType) == "SCOORD" for i in items)
    _check_rows(items, _TID1410 if planar else _TID1501, path, out)


_TID1500 = [
    _LANGUAGE,
    *_OBSERVER_CONTEXT,
    Row(
        "HAS CONCEPT MOD",
        "CODE",
        _dcm("121058"),
        1,
        None,
        values=_cid(100),
        label="Procedure reported",
    ),
    Row(
        "CONTAINS",
        "CONTAINER",
        _dcm("111028"),
        0,
        1,
        label="Image Library",
        children=_sub(_IMAGE_LIBRARY),
    ),
    Row(
        "CONTAINS",
        "CONTAINER",
        _dcm("126010"),
        0,
        1,
        label="Imaging Measurements",
        children=_sub(
            [
                Row(
                    "CONTAINS",
                    "CONTAINER",
                    _dcm("125007"),
                    1,
                    None,
                    label="Measurement Group",
                    children=_measurement_group,
                )
            ]
        ),
    ),
    Row(
        "CONTAINS",
        "CONTAINER",
        ("C0034375", "UMLS"),
        0,
        1,
        label="Qualitative Evaluations",
        children=_sub(
            [
                Row("CONTAINS", "CODE", None, 0, None, label="Qualitative evaluation"),
                Row("CONTAINS", "TEXT", None, 0, None, label="Qualitative evaluation"),
            ]
        ),
    ),
]
# TID 2000: sections (TID 2001, heading from CID 7001) of observations (TID 2002, CID 7002)
_TID2002 = [
    Row("CONTAINS", "TEXT", None, 0, None, names=_cid(7002), label="Report element (TEXT)"),
    Row("CONTAINS", "CODE", None, 0, None, names=_cid(7002), label="Report element (CODE)"),
    Row("CONTAINS", "IMAGE", None, 0, None, label="Image reference"),
]
_TID2000 = [
    _LANGUAGE,
    *_OBSERVER_CONTEXT,
    Row("HAS CONCEPT MOD", "CODE", _dcm("121058"), 0, None, label="Procedure reported"),
    Row(
        "CONTAINS",
        "CONTAINER",
        None,
        0,
        None,
        names=_cid(7001),
        label="Section",
        children=_sub(_TID2002),
    ),
]
_TEMPLATES: dict[str, tuple[frozenset[Concept] | None, list[Row]]] = {
    "1500": (frozenset({_dcm("126000")}), _TID1500),
    "2000": (_cid(7000), _TID2000),
}


def check_sr(ds: Dataset) -> list[Finding]:
    """Every finding of the template check of ``ds`` (errors and warnings)."""
    out: list[Finding] = []
    templates = list(ds.get("ContentTemplateSequence", []))
    if not templates:
        out.append(Finding("error", "/", "no template declared (ContentTemplateSequence)"))
        for index, item in enumerate(ds.get("ContentSequence", []), start=1):
            out.append(Finding("warning", f"/{index}", f"{_describe(item)} not in template"))
        return out
    template = templates[0]
    tid = str(template.TemplateIdentifier)
    if str(template.get("MappingResource", "")) != "DCMR" or tid not in _TEMPLATES:
        return [Finding("error", "/", f"template {tid} is not one this check knows")]
    titles, rows = _TEMPLATES[tid]
    title = _concept(ds.ConceptNameCodeSequence[0])
    if titles is not None and title not in titles:
        out.append(Finding("error", "/", f"document title {title} not allowed by TID {tid}"))
    _check_rows(list(ds.get("ContentSequence", [])), rows, "", out)
    return out


def errors(findings: Iterable[Finding]) -> list[str]:
    return [str(f) for f in findings if f.severity == "error"]


def warnings(findings: Iterable[Finding]) -> list[str]:
    return [str(f) for f in findings if f.severity == "warning"]
