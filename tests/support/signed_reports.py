"""Signed-report messages as a RIS sends them (HL7 v2, FHIR), signed-report SRs as a PACS sends
them, and studies for them to match."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from report.sop import BasicTextSR
from studydb.records import InstanceRecord
from studydb.store import StudyStore
from studydb.tables import studies_table
from tests.support.dicom_files import make_dx

#: DiagnosticReport identifier type of an accession number (HL7 table v2-0203)
ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
DIAGNOSTIC_IMAGING_REPORT = Code("18748-4", "LN", "Diagnostic imaging report")


def oru(
    text: str,
    *,
    control_id: str = "MSG0001",
    status: str = "F",
    accession: str = "",
    study_uid: str = "",
    zds_uid: str = "",
    message_type: str = "ORU^R01^ORU_R01",
) -> bytes:
    """An ORU^R01 (HL7 v2.5.1) with the report ``text`` (lines become ``\\.br\\``) in a TX
    OBX, the accession number in ORC-2/3 and OBR-2/3, and a Study Instance UID in an OBX
    (``study_uid``) or a ZDS segment (``zds_uid``)."""
    body = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("\n", "\\.br\\")
    obr = ["OBR", "1", accession, accession, "71045^XR CHEST 1 VIEW^CPT"] + [""] * 21
    obr[25] = status
    segments = [
        f"MSH|^~\\&|RIS|HOSPITAL|D2R|D2R|20260102093000||{message_type}|{control_id}|P|2.5.1",
        "PID|1||PHANTOM-0007^^^D2R-PHANTOMS||PHANTOM^PATIENT",
        f"ORC|RE|{accession}|{accession}",
        "|".join(obr),
        f"OBX|1|TX|18782-3^Radiology Study observation^LN||{body}||||||{status}",
    ]
    if study_uid:
        segments.append(f"OBX|2|ST|110180^Study Instance UID^DCM||{study_uid}||||||{status}")
    if zds_uid:
        segments.append(f"ZDS|{zds_uid}^RIS^Application^DICOM")
    return "\r".join(segments).encode("utf-8") + b"\r"


def add_study(store: StudyStore, uid: str, *, accession: str = "") -> None:
    """Record one instance of study ``uid`` (with ``accession``), as a receiver does."""
    store.record_instance(
        InstanceRecord(
            study_instance_uid=uid,
            series_instance_uid=uid + ".1",
            sop_instance_uid=uid + ".1.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            modality="DX",
            body_part_examined="CHEST",
            view_position="PA",
            series_description="",
            path=f"/spool/{uid}.dcm",
            size=1,
            sha256="0" * 64,
            calling_ae_title="PACS",
            received_at=datetime.now(UTC),
            accession_number=accession,
        ),
        outcome="stored",
    )


def set_draft(
    store: StudyStore, uid: str, findings: str, impression: str = "", *, abstained: str = ""
) -> None:
    """Give study ``uid`` the draft the worker records (``mark_reported``): findings,
    impression and, for an abstention, ``reason`` ``abstained: <why>``."""
    with store.transaction() as conn:
        conn.execute(
            studies_table.update()
            .where(studies_table.c.study_instance_uid == uid)
            .values(
                state="done",
                findings=findings,
                impression=impression,
                reason=f"abstained: {abstained}" if abstained else None,
            )
        )


def diagnostic_report(
    text: str | None,
    *,
    status: str = "final",
    resource_id: str | None = "r1",
    version: str | None = None,
    accession: str = "",
    study_uid: str = "",
    contained_study_uid: str = "",
    content_type: str = "text/plain",
    conclusion: str | None = None,
) -> dict[str, Any]:
    """A FHIR R4 DiagnosticReport as a RIS posts it: ``text`` as a presentedForm attachment of
    ``content_type`` (base64), the accession number as an ACSN identifier, the study as an
    ``imagingStudy`` identifier reference (``study_uid``) or a contained ImagingStudy
    (``contained_study_uid``)."""
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": "36643-5"}]},
    }
    if resource_id:
        report["id"] = resource_id
    if version:
        report["meta"] = {"versionId": version}
    if accession:
        report["identifier"] = [{"type": ACSN, "value": accession}]
    studies: list[dict[str, Any]] = []
    if study_uid:
        studies.append({"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}})
    if contained_study_uid:
        report["contained"] = [
            {
                "resourceType": "ImagingStudy",
                "id": "study",
                "status": "available",
                "subject": {"display": "phantom"},
                "identifier": [
                    {"system": "urn:dicom:uid", "value": f"urn:oid:{contained_study_uid}"}
                ],
            }
        ]
        studies.append({"reference": "#study"})
    if studies:
        report["imagingStudy"] = studies
    if text is not None:
        data = base64.b64encode(text.encode("utf-8")).decode("ascii")
        report["presentedForm"] = [{"contentType": content_type, "data": data}]
    if conclusion is not None:
        report["conclusion"] = conclusion
    return report


def fhir_body(report: dict[str, Any]) -> bytes:
    return json.dumps(report).encode("utf-8")


def signed_sr(
    text: Sequence[str],
    *,
    study_uid: str | None = None,
    accession: str = "",
    verified: bool = True,
    complete: bool = True,
    predecessor: Dataset | None = None,
    kind: str = "basic",
    manufacturer: str = "RIS Vendor",
    coded: Sequence[Code] = (),
) -> Dataset:
    """A radiologist's report as the PACS sends it: a Basic Text (``kind`` ``basic``), Enhanced
    (``enhanced``) or Comprehensive (``comprehensive``) SR of a TID 2000 diagnostic imaging
    report, each of ``text`` a TEXT finding, each of ``coded`` a CODE finding, with the
    language as context; VERIFIED and COMPLETE unless told otherwise; a correction of
    ``predecessor``."""
    evidence = make_dx(None, study_uid=study_uid, rows=16, cols=16)
    if accession:
        evidence.AccessionNumber = accession
    findings = hd.sr.ContainerContentItem(
        name=codes.DCM.Findings, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    findings.ContentSequence = PydicomSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Finding,
                value=line,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for line in text
        ]
        + [
            hd.sr.CodeContentItem(
                name=codes.DCM.Finding,
                value=code,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for code in coded
        ]
    )
    root = hd.sr.ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT)
    root.ContentSequence = PydicomSequence(
        [
            hd.sr.CodeContentItem(
                name=codes.DCM.LanguageOfContentItemAndDescendants,
                value=Code("en-US", "RFC5646", "English (United States)"),
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            ),
            findings,
        ]
    )
    common: dict[str, Any] = {
        "evidence": [evidence],
        "content": root,
        "series_instance_uid": generate_uid(),
        "series_number": 900,
        "sop_instance_uid": generate_uid(),
        "instance_number": 1,
        "manufacturer": manufacturer,
        "is_complete": complete,
        "is_final": verified,
        "is_verified": verified,
        "previous_versions": [predecessor] if predecessor is not None else None,
    }
    if verified:
        common.update(verifying_observer_name="Reader^Radiology", verifying_organization="Hospital")
    if kind == "basic":
        return BasicTextSR(**common)
    if kind == "enhanced":
        return hd.sr.EnhancedSR(**common)
    return hd.sr.ComprehensiveSR(**common)


def set_state(store: StudyStore, uid: str, state: str) -> None:
    """Put study ``uid`` in ``state`` (``queued``: waiting for a worker; ``done``: reported)."""
    with store.transaction() as conn:
        conn.execute(
            studies_table.update()
            .where(studies_table.c.study_instance_uid == uid)
            .values(state=state)
        )
