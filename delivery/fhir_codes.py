"""The codes of the FHIR report: the report's LOINC code and the 22 VinDr-CXR classes.

Every finding carries the d2r local code (:data:`LOCAL_SYSTEM`, code = the detector class
index, display = the VinDr-CXR label), and a SNOMED CT concept where the DICOM SR carries one
(:mod:`report.codes`, concepts taken from DICOM PS3.16 or verified): the FHIR report and the
SR code each finding the same way. ``body_site`` is the SR's Finding Site. Laterality is not
sent: the box is in image pixels, and the image's left is the patient's right only for a PA
view, which d2r does not verify.

>>> FINDINGS["Pleural effusion"].snomed
('60046008', 'Pleural effusion')
>>> len(FINDINGS)
22
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

__all__ = [
    "FINDINGS",
    "LOCAL_SYSTEM",
    "LOINC",
    "REPORT_CODE",
    "SNOMED",
    "FindingCode",
]

LOINC: Final = "http://loinc.org"
SNOMED: Final = "http://snomed.info/sct"
#: d2r's code system for the detector classes (the SR's private scheme ``99D2R``)
LOCAL_SYSTEM: Final = "urn:d2r:codesystem:vindr-cxr-local-labels"
#: the DiagnosticReport code: LOINC "XR Chest Views" (a chest radiograph, views unspecified)
REPORT_CODE: Final = ("30745-4", "XR Chest Views")

_AORTA: Final = ("15825003", "Aortic structure")
_CLAVICLE: Final = ("51299004", "Bone structure of clavicle")
_HEART: Final = ("80891009", "Heart structure")
_LUNG: Final = ("39607008", "Lung structure")
_MEDIASTINUM: Final = ("72410000", "Mediastinal structure")
_PLEURA: Final = ("3120008", "Pleural membrane structure")
_PULMONARY_ARTERY: Final = ("81040000", "Pulmonary artery structure")
_RIB: Final = ("113197003", "Bone structure of rib")


@dataclass(frozen=True)
class FindingCode:
    """How one detector class is coded: local code, SNOMED CT concept, body site."""

    index: int
    display: str
    snomed: tuple[str, str] | None = None
    body_site: tuple[str, str] | None = None


def _table(
    *rows: tuple[str, tuple[str, str] | None, tuple[str, str] | None],
) -> dict[str, FindingCode]:
    return {name: FindingCode(i, name, sct, site) for i, (name, sct, site) in enumerate(rows)}


#: VinDr-CXR class (detector order) -> codes. Read-only.
FINDINGS: Final[Mapping[str, FindingCode]] = MappingProxyType(
    _table(
        ("Aortic enlargement", None, _AORTA),
        ("Atelectasis", None, _LUNG),
        ("Calcification", ("18115005", "Pathologic calcification"), None),
        ("Cardiomegaly", ("8186001", "Cardiomegaly"), _HEART),
        ("Clavicle fracture", None, _CLAVICLE),
        ("Consolidation", None, _LUNG),
        ("Edema", ("19242006", "Pulmonary edema"), _LUNG),
        ("Emphysema", None, _LUNG),
        ("Enlarged PA", None, _PULMONARY_ARTERY),
        ("ILD", None, _LUNG),
        ("Infiltration", None, _LUNG),
        ("Lung Opacity", None, _LUNG),
        ("Lung cavity", None, _LUNG),
        ("Lung cyst", ("367643001", "Cyst"), _LUNG),
        ("Mediastinal shift", None, _MEDIASTINUM),
        ("Nodule/Mass", ("27925004", "Nodule"), _LUNG),
        ("Pleural effusion", ("60046008", "Pleural effusion"), _PLEURA),
        ("Pleural thickening", None, _PLEURA),
        ("Pneumothorax", ("36118008", "Pneumothorax"), _PLEURA),
        ("Pulmonary fibrosis", ("112674009", "Fibrosis"), _LUNG),
        ("Rib fracture", None, _RIB),
        ("Other lesion", ("52988006", "Lesion"), None),
    )
)
