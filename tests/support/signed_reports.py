"""Signed-report messages as a RIS sends them, and studies for them to match."""

from __future__ import annotations

from datetime import UTC, datetime

from studydb.records import InstanceRecord
from studydb.store import StudyStore
from studydb.tables import studies_table


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
