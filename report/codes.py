"""Coded concepts used in the reports, including the VinDr-CXR class table.

The table :data:`FINDING_CODES` is keyed on the exact VinDr-CXR local-label strings
(:data:`VINDR_CLASSES`, detector class order). Each class maps to a finding concept for
the TID 1410 ``Finding`` item and, where one is known, a ``Finding Site``.

Classes use SNOMED CT (``SCT``) only where the concept is taken from DICOM PS3.16
context groups (through pydicom's concept dictionary) or has been verified for this
purpose. Every other class uses the private coding scheme :data:`PRIVATE_SCHEME_DESIGNATOR`
(code value = detector class index, 0-based; code meaning = the VinDr string), which an SR
using it declares in its CodingSchemeIdentificationSequence
(:func:`private_coding_scheme`).

Examples
--------
>>> FINDING_CODES["Pleural effusion"].finding.value
'60046008'
>>> FINDING_CODES["Aortic enlargement"].finding.scheme_designator
'99D2R'
>>> len(FINDING_CODES) == len(VINDR_CLASSES) == 22
True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from d2r_core.classes import VINDR_CLASSES

__all__ = [
    "BOUNDED_BY",
    "CERTAINTY_OF_FINDING",
    "DEVICE",
    "DIAGNOSTIC_IMAGING_REPORT",
    "FINDINGS",
    "FINDING_CODES",
    "IMAGING_MEASUREMENT_REPORT",
    "IMPRESSION",
    "PERCENT",
    "PLAIN_CHEST_XRAY",
    "PROCEDURE_REPORTED",
    "FINDINGS_HEADING",
    "FINDING",
    "IMPRESSIONS_HEADING",
    "PROCEDURE_DESCRIPTION",
    "PROCEDURE_DESCRIPTIONS_HEADING",
    "PRIVATE_SCHEME_DESIGNATOR",
    "PRIVATE_SCHEME_NAME",
    "PROCESSING_EQUIPMENT",
    "AIR_PROCESSING_ALGORITHM",
    "QUALITATIVE_EVALUATIONS",
    "FindingCodes",
    "finding_codes",
    "private_coding_scheme",
]

#: Coding Scheme Designator of the private scheme for classes without a verified code.
PRIVATE_SCHEME_DESIGNATOR: Final = "99D2R"
#: Coding Scheme Name declared for :data:`PRIVATE_SCHEME_DESIGNATOR`.
PRIVATE_SCHEME_NAME: Final = "d2r VinDr-CXR local lesion classes"
_PRIVATE_SCHEME_ORGANIZATION: Final = "d2r"

# Document structure (DICOM PS3.16).
IMAGING_MEASUREMENT_REPORT: Final = codes.DCM.ImagingMeasurementReport  # (126000, DCM)
DIAGNOSTIC_IMAGING_REPORT: Final = codes.LN.DiagnosticImagingReport  # (18748-4, LN)
QUALITATIVE_EVALUATIONS: Final = Code("C0034375", "UMLS", "Qualitative Evaluations")
FINDINGS: Final = codes.DCM.Findings  # (121070, DCM)
IMPRESSION: Final = codes.DCM.Impression  # (121073, DCM)
#: The procedure in HL7 orders (OBR-4) when the source names none; not in pydicom's dictionary.
PLAIN_CHEST_XRAY: Final = Code("399208008", "SCT", "Plain chest X-ray")
#: TID 1500 row 4 "Procedure reported" (DCID 100 "Quantitative Diagnostic Imaging Procedures"):
#: the group's only projection radiography concept, (43468-8, LN, "XR unspecified body region")
PROCEDURE_REPORTED: Final = codes.LN.XRUnspecifiedBodyRegion
#: TID 2000 section headings (CID 7001) and their TID 2002 report elements (CID 7002)
FINDINGS_HEADING: Final = codes.LN.Findings  # (59776-5, LN)
FINDING: Final = codes.DCM.Finding  # (121071, DCM)
IMPRESSIONS_HEADING: Final = codes.LN.Impressions  # (19005-8, LN)
PROCEDURE_DESCRIPTIONS_HEADING: Final = codes.LN.CurrentProcedureDescriptions  # (55111-9, LN)
PROCEDURE_DESCRIPTION: Final = codes.DCM.ProcedureDescription  # (121065, DCM)
DEVICE: Final = codes.DCM.Device  # (121007, DCM), observer type
BOUNDED_BY: Final = codes.SCT.BoundedBy  # (75958009, SCT), CID 219
CERTAINTY_OF_FINDING: Final = codes.DCM.CertaintyOfFinding  # (111012, DCM)
PERCENT: Final = codes.UCUM.Percent  # (%, UCUM)
PROCESSING_EQUIPMENT: Final = codes.DCM.ProcessingEquipment  # (109102, DCM), CID 7005
#: IHE AI Results (AIR) 6.5.3.1: the Purpose of Reference of the algorithm's Contributing
#: Equipment item
AIR_PROCESSING_ALGORITHM: Final = Code("Newcode1", "99IHE", "Processing Algorithm")

# Finding sites (SNOMED CT body structures from pydicom's dictionary).
_AORTA: Final = codes.SCT.Aorta  # 15825003
_CLAVICLE: Final = codes.SCT.Clavicle  # 51299004
_HEART: Final = codes.SCT.Heart  # 80891009
_LUNG: Final = codes.SCT.Lung  # 39607008
_MEDIASTINUM: Final = codes.SCT.Mediastinum  # 72410000
_PLEURA: Final = codes.SCT.Pleura  # 3120008
_PULMONARY_ARTERY: Final = codes.SCT.PulmonaryArtery  # 81040000
_RIB: Final = codes.SCT.Rib  # 113197003


@dataclass(frozen=True)
class FindingCodes:
    """Codes for one detector class.

    Parameters
    ----------
    finding : pydicom.sr.coding.Code
        Value of the TID 1410 ``Finding`` (121071, DCM) item.
    finding_site : pydicom.sr.coding.Code or None
        Value of the ``Finding Site`` (363698007, SCT) item, if known.
    """

    finding: Code
    finding_site: Code | None = None

    @property
    def is_private(self) -> bool:
        """Whether the finding uses the private scheme :data:`PRIVATE_SCHEME_DESIGNATOR`."""
        return self.finding.scheme_designator == PRIVATE_SCHEME_DESIGNATOR


def _private(class_name: str) -> Code:
    return Code(str(VINDR_CLASSES.index(class_name)), PRIVATE_SCHEME_DESIGNATOR, class_name)


#: VinDr-CXR class string -> finding codes. Read-only.
FINDING_CODES: Final[Mapping[str, FindingCodes]] = MappingProxyType(
    {
        "Aortic enlargement": FindingCodes(_private("Aortic enlargement"), _AORTA),
        "Atelectasis": FindingCodes(_private("Atelectasis"), _LUNG),
        # Pathologic calcification (CID 6335); the site varies (aorta, lung, pleura, node).
        "Calcification": FindingCodes(codes.SCT.PathologicCalcification),
        # Not pydicom's codes.SCT.Cardiomegaly (287272002, "Enlarged septal foramen of heart").
        "Cardiomegaly": FindingCodes(Code("8186001", "SCT", "Cardiomegaly"), _HEART),
        "Clavicle fracture": FindingCodes(_private("Clavicle fracture"), _CLAVICLE),
        "Consolidation": FindingCodes(_private("Consolidation"), _LUNG),
        "Edema": FindingCodes(codes.SCT.PulmonaryEdema, _LUNG),  # 19242006
        "Emphysema": FindingCodes(_private("Emphysema"), _LUNG),
        "Enlarged PA": FindingCodes(_private("Enlarged PA"), _PULMONARY_ARTERY),
        "ILD": FindingCodes(_private("ILD"), _LUNG),
        "Infiltration": FindingCodes(_private("Infiltration"), _LUNG),
        "Lung Opacity": FindingCodes(_private("Lung Opacity"), _LUNG),
        "Lung cavity": FindingCodes(_private("Lung cavity"), _LUNG),
        "Lung cyst": FindingCodes(codes.SCT.Cyst, _LUNG),  # 367643001
        "Mediastinal shift": FindingCodes(_private("Mediastinal shift"), _MEDIASTINUM),
        "Nodule/Mass": FindingCodes(codes.SCT.Nodule, _LUNG),  # 27925004
        "Pleural effusion": FindingCodes(codes.SCT.PleuralEffusion, _PLEURA),  # 60046008
        "Pleural thickening": FindingCodes(_private("Pleural thickening"), _PLEURA),
        "Pneumothorax": FindingCodes(codes.SCT.Pneumothorax, _PLEURA),  # 36118008
        "Pulmonary fibrosis": FindingCodes(codes.SCT.Fibrosis, _LUNG),  # 112674009
        "Rib fracture": FindingCodes(_private("Rib fracture"), _RIB),
        "Other lesion": FindingCodes(codes.SCT.Lesion),  # 52988006
    }
)


def finding_codes(class_name: str) -> FindingCodes:
    """Return the codes for a VinDr-CXR class string.

    Parameters
    ----------
    class_name : str
        One of :data:`VINDR_CLASSES` (exact spelling).

    Returns
    -------
    FindingCodes

    Raises
    ------
    ValueError
        If `class_name` is not a VinDr-CXR class.
    """
    try:
        return FINDING_CODES[class_name]
    except KeyError:
        raise ValueError(
            f"class_name {class_name!r} is not a VinDr-CXR class; expected one of {VINDR_CLASSES}"
        ) from None


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """Return the CodingSchemeIdentificationSequence item declaring the private scheme.

    Returns
    -------
    highdicom.coding_schemes.CodingSchemeIdentificationItem
    """
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME_DESIGNATOR,
        name=PRIVATE_SCHEME_NAME,
        responsible_organization=_PRIVATE_SCHEME_ORGANIZATION,
    )
