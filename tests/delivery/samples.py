"""A phantom study's results as the senders receive them: SR headers and report content."""

from __future__ import annotations

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from delivery.content import DeliveryContent, FindingBox
from delivery.destinations import StudyResults

#: the phantom patient (synthetic; no real person)
PATIENT_NAME = "PHANTOM^CHEST^Q"
PATIENT_ID = "PHANTOM-0001"

LESIONS = (
    FindingBox("Pleural effusion", 0.8123, (410.0, 620.5, 700.0, 880.0), "Small left effusion."),
    FindingBox(
        "Cardiomegaly", 0.61, (300.0, 400.0, 720.0, 760.0), None, "1.2.826.0.1.3680043.10.1"
    ),
    FindingBox("Aortic enlargement", 0.4, (480.0, 250.0, 560.0, 330.0)),
)


def sr_dataset(study_uid: str, series_uid: str, sop_class: str, number: int) -> Dataset:
    """An SR with the Patient and General Study modules copied from the phantom image."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.IssuerOfPatientID = "1.2.826.0.1.3680043.10.999"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240105"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC-PHANTOM-1"
    ds.StudyDescription = "XR CHEST"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 990
    ds.InstanceNumber = number
    ds.Modality = "SR"
    ds.Manufacturer = "d2r"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentDate, ds.ContentTime = "20240105", "101600"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator = "18748-4", "LN"
    title.CodeMeaning = "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = Sequence([title])
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121073", "DCM", "Impression"
    item.ConceptNameCodeSequence = Sequence([name])
    item.TextValue = "Small left pleural effusion."
    ds.ContentSequence = Sequence([item])
    return ds


def phantom_results(
    *,
    lesions: tuple[FindingBox, ...] = LESIONS,
    abstained: bool = False,
    version: str = "3.1.0",
    uids: tuple[str, str, str, str] | None = None,
) -> StudyResults:
    """Two SRs (the SR classes d2r sends) of a new phantom study, with its report content;
    ``uids``: fixed study, series and two SOP Instance UIDs (the docs' sample)."""
    study_uid, series_uid, *sops = uids or (generate_uid(), generate_uid(), "", "")
    reports = (
        sr_dataset(study_uid, series_uid, ComprehensiveSRStorage, 1),
        sr_dataset(study_uid, series_uid, BasicTextSRStorage, 2),
    )
    for ds, sop in zip(reports, sops, strict=True):
        if sop:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    content = DeliveryContent(
        findings="" if abstained else "Small left pleural effusion. The heart is enlarged.",
        impression="" if abstained else "Small left pleural effusion; cardiomegaly.",
        lesions=() if abstained else lesions,
        model_name="d2r-net",
        model_version=version,
        sr_sop_instance_uid=str(reports[0].SOPInstanceUID),
        image_sop_instance_uid="" if uids else generate_uid(),
        abstained=abstained,
        abstain_reason="not a frontal chest radiograph (input gate)" if abstained else "",
    )
    return StudyResults(study_uid, reports, content)


#: fixed UIDs of the sample in docs/fhir.md
DOC_UIDS = (
    "2.25.100000000000000000000000000000000001",
    "2.25.100000000000000000000000000000000002",
    "2.25.100000000000000000000000000000000003",
    "2.25.100000000000000000000000000000000004",
)


def doc_sample() -> str:
    """The transaction Bundle shown in docs/fhir.md: the phantom study with one lesion."""
    from delivery.fhir import build_bundle

    results = phantom_results(lesions=LESIONS[:1], uids=DOC_UIDS)
    return build_bundle(results).model_dump_json(exclude_none=True, indent=2)


def mapping_rows() -> list[str]:
    """The rows of the class mapping table in docs/fhir.md."""
    from delivery.fhir_codes import FINDINGS

    rows = []
    for name, code in FINDINGS.items():
        sct = f"`{code.snomed[0]}` {code.snomed[1]}" if code.snomed else "—"
        site = f"`{code.body_site[0]}` {code.body_site[1]}" if code.body_site else "—"
        rows.append(f"| {name} | `{code.index}` | {sct} | {site} |")
    return rows
