"""A phantom study as d2r reports it, and the ORU^R01 d2r sends for it.

``python -m tests.support.hl7_sample`` prints the message one segment per line: the sample in
``docs/operations.md`` (a test keeps the two equal). Synthetic patient, fixed UIDs and clock.
"""

from __future__ import annotations

import datetime

from delivery.content import DeliveryContent, FindingBox
from delivery.destinations import StudyResults
from delivery.hl7 import build_oru, encode
from report.build import AlgorithmInfo, LesionFinding, build_reports
from report.build import ReportContent as SrContent
from tests.support.dicom_files import make_dx

UID_ROOT = "1.2.826.0.1.3680043.10.1077.99."
CLOCK = datetime.datetime(2026, 1, 2, 9, 30, 0, tzinfo=datetime.UTC)
FINDINGS = (
    "Small left pleural effusion blunting the costophrenic angle.\n"
    "Heart size normal & mediastinum not widened. No pneumothorax."
)
IMPRESSION = "Small left pleural effusion."


def phantom_results(
    *,
    findings: str = FINDINGS,
    patient_name: str = "Müller^Zoë",
    fixed: bool = False,
    when: datetime.datetime | None = None,
) -> StudyResults:
    """A synthetic DX study reported by real SR construction, as the worker leaves it.

    ``fixed``: the sample's UIDs instead of new ones.
    """
    study, series, sop = (f"{UID_ROOT}{n}" if fixed else None for n in (1, 2, 3))
    image = make_dx(None, seed=7, study_uid=study, series_uid=series, sop_uid=sop)
    image.SpecificCharacterSet = "ISO_IR 192"
    image.PatientName = patient_name
    image.PatientID = "PHANTOM-0007"
    image.IssuerOfPatientID = "D2R-PHANTOMS"
    image.PatientBirthDate = "19800229"
    image.PatientSex = "F"
    lesions = [LesionFinding("Pleural effusion", 0.62, (20.0, 150.0, 90.0, 220.0))]
    srs = build_reports(
        SrContent(findings, IMPRESSION, lesions, image),
        AlgorithmInfo("d2r-net", "3.1.0"),
        content_datetime=(when or CLOCK).replace(tzinfo=None) if fixed or when else None,
    )
    content = DeliveryContent(
        findings=findings,
        impression=IMPRESSION,
        lesions=tuple(FindingBox(le.class_name, le.score, le.box) for le in lesions),
        model_name="d2r-net",
        model_version="3.1.0",
        sr_sop_instance_uid=str(srs[0].SOPInstanceUID),
        image_sop_instance_uid=str(image.SOPInstanceUID),
    )
    return StudyResults(str(image.StudyInstanceUID), tuple(srs), content)


def sample() -> str:
    """The sample ORU^R01, segments on separate lines."""
    message = build_oru(phantom_results(fixed=True), sending_application="D2R", now=CLOCK)
    return encode(message).decode("utf-8").replace("\r", "\n")


if __name__ == "__main__":
    print(sample())
