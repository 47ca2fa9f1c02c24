"""A phantom study's results as the senders receive them: SR headers and report content."""

from __future__ import annotations

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from delivery.content import FindingBox, ReportContent
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
    *, lesions: tuple[FindingBox, ...] = LESIONS, abstained: bool = False, version: str = "3.1.0"
) -> StudyResults:
    """Two SRs (the SR classes d2r sends) of a new phantom study, with its report content."""
    study_uid, series_uid = generate_uid(), generate_uid()
    reports = (
        sr_dataset(study_uid, series_uid, ComprehensiveSRStorage, 1),
        sr_dataset(study_uid, series_uid, BasicTextSRStorage, 2),
    )
    content = ReportContent(
        findings="" if abstained else "Small left pleural effusion. The heart is enlarged.",
        impression="" if abstained else "Small left pleural effusion; cardiomegaly.",
        lesions=() if abstained else lesions,
        model_name="d2r-net",
        model_version=version,
        sr_sop_instance_uid=str(reports[0].SOPInstanceUID),
        image_sop_instance_uid=generate_uid(),
        abstained=abstained,
        abstain_reason="not a frontal chest radiograph (input gate)" if abstained else "",
    )
    return StudyResults(study_uid, reports, content)
