"""The Storage SCP: receive C-STORE requests, spool them, record them, answer honestly.

The C-STORE handler returns fast: it parses the routing header (no pixel data),
writes the bytes as received through :class:`~dicom_node.spool.Spool` (fsync and
atomic rename), records the instance in the study database and only then returns
Success. Failures map to specific statuses, never to Success:

===============================================  ===============================================
condition                                        status
===============================================  ===============================================
spool below the free-space guard, ENOSPC/EDQUOT  ``OUT_OF_RESOURCES`` (0xA700)
unreadable header, missing Study/SOP UIDs        ``CANNOT_UNDERSTAND`` (0xC000)
data set SOP class differs from the request      ``DATASET_DOES_NOT_MATCH_SOP_CLASS`` (0xA900)
SOP class not accepted                           ``SOP_CLASS_NOT_SUPPORTED`` (0x0122)
other write error, database error, anything else ``PROCESSING_FAILURE`` (0x0110)
===============================================  ===============================================

Every refusal except a processing failure is also recorded with
``StudyStore.record_rejection``.

Secondary Capture policy: SC images are accepted and stored whatever their header
says; :mod:`dicom_node.selection` uses one only when its Modality is CR/DX and its
body part is chest-like. A non-chest SC is therefore stored and its study later
skipped with a recorded reason, rather than refused: a PACS forwarding a whole study
would otherwise see failures and retry forever for objects the node simply ignores.

A re-sent instance with identical content is answered Success (outcome
``duplicate``); one with different content is quarantined by the spool and also
answered Success (outcome ``conflict``), since it is persisted and recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

from dicom_node import statuses
from dicom_node.errors import InstanceRejected, SpoolFullError, SpoolWriteError
from dicom_node.metadata import parse_header
from dicom_node.selection import (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    SECONDARY_CAPTURE,
    is_chest_body_part,
)
from dicom_node.settings import NodeSettings
from dicom_node.spool import Spool
from dicom_node.studies import InstanceRecord

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

__all__ = [
    "STORAGE_SOP_CLASSES",
    "StudyRecorder",
    "build_ae",
    "event_handlers",
    "handle_echo",
    "handle_store",
    "start_server",
]

logger = logging.getLogger(__name__)

VERIFICATION: Final = "1.2.840.10008.1.1"
#: Storage SOP classes the listener negotiates, each with every transfer syntax.
STORAGE_SOP_CLASSES: Final = (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    SECONDARY_CAPTURE,
)


class StudyRecorder(Protocol):
    """What the handler needs from :class:`dicom_node.studies.StudyStore`."""

    def record_instance(self, record: InstanceRecord, *, outcome: str) -> None: ...

    def record_rejection(
        self,
        *,
        sop_instance_uid: str,
        study_instance_uid: str | None,
        reason: str,
        calling_ae_title: str,
    ) -> None: ...


def build_ae(settings: NodeSettings) -> AE:
    """Return an AE configured from ``settings`` with Verification and storage contexts.

    Every storage context accepts ``ALL_TRANSFER_SYNTAXES`` (pynetdicom's defaults
    would accept uncompressed data only). The called AE title must match.
    """
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.require_called_aet = True
    ae.add_supported_context(VERIFICATION)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    return ae


def handle_echo(event: evt.Event) -> int:
    """Answer C-ECHO with Success."""
    return statuses.SUCCESS


def _reject(
    store: StudyRecorder,
    *,
    sop_instance_uid: str,
    study_instance_uid: str | None,
    reason: str,
    calling_ae_title: str,
) -> None:
    logger.warning("rejected SOP Instance %s: %s", sop_instance_uid, reason)
    try:
        store.record_rejection(
            sop_instance_uid=sop_instance_uid,
            study_instance_uid=study_instance_uid,
            reason=reason,
            calling_ae_title=calling_ae_title,
        )
    except Exception:
        logger.exception("could not record rejection of SOP Instance %s", sop_instance_uid)


def handle_store(event: evt.Event, spool: Spool, store: StudyRecorder) -> int:
    """Persist one C-STORE request and return its DIMSE status.

    Bind with ``(evt.EVT_C_STORE, handle_store, [spool, store])``.
    """
    request: Any = event.request
    sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
    study_uid: str | None = None
    calling = str(event.assoc.requestor.ae_title).strip()
    try:
        sop_class_uid = str(request.AffectedSOPClassUID or "")
        transfer_syntax = str(event.context.transfer_syntax)
        if sop_class_uid not in STORAGE_SOP_CLASSES:
            _reject(
                store,
                sop_instance_uid=sop_instance_uid,
                study_instance_uid=None,
                reason=f"SOP class {sop_class_uid} not supported",
                calling_ae_title=calling,
            )
            return statuses.SOP_CLASS_NOT_SUPPORTED
        try:
            header = parse_header(request.DataSet, transfer_syntax)
        except InstanceRejected as exc:
            _reject(
                store,
                sop_instance_uid=sop_instance_uid,
                study_instance_uid=exc.study_instance_uid,
                reason=exc.reason,
                calling_ae_title=calling,
            )
            return statuses.CANNOT_UNDERSTAND
        study_uid = header.study_instance_uid
        if header.sop_class_uid != sop_class_uid:
            _reject(
                store,
                sop_instance_uid=sop_instance_uid,
                study_instance_uid=study_uid,
                reason=f"data set SOP class {header.sop_class_uid} differs from request",
                calling_ae_title=calling,
            )
            return statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS
        if header.sop_instance_uid != sop_instance_uid:
            _reject(
                store,
                sop_instance_uid=sop_instance_uid,
                study_instance_uid=study_uid,
                reason="data set SOP Instance UID differs from request",
                calling_ae_title=calling,
            )
            return statuses.CANNOT_UNDERSTAND
        if header.sop_class_uid == SECONDARY_CAPTURE and not (
            header.modality in ("CR", "DX") and is_chest_body_part(header.body_part_examined)
        ):
            logger.info(
                "Secondary Capture %s is not a chest radiograph; stored, not used",
                sop_instance_uid,
            )
        try:
            spooled = spool.store(
                study_instance_uid=study_uid,
                sop_instance_uid=sop_instance_uid,
                file_meta=event.file_meta,
                dataset=request.DataSet.getbuffer(),
            )
        except SpoolFullError as exc:
            _reject(
                store,
                sop_instance_uid=sop_instance_uid,
                study_instance_uid=study_uid,
                reason=f"out of resources: {exc}",
                calling_ae_title=calling,
            )
            return statuses.OUT_OF_RESOURCES
        except SpoolWriteError as exc:
            logger.error("spool write failed for SOP Instance %s: %s", sop_instance_uid, exc)
            return statuses.PROCESSING_FAILURE
        store.record_instance(
            InstanceRecord(
                study_instance_uid=study_uid,
                series_instance_uid=header.series_instance_uid,
                sop_instance_uid=sop_instance_uid,
                sop_class_uid=sop_class_uid,
                transfer_syntax_uid=transfer_syntax,
                modality=header.modality,
                body_part_examined=header.body_part_examined,
                view_position=header.view_position,
                series_description=header.series_description,
                path=str(spooled.path),
                size=spooled.size,
                sha256=spooled.sha256,
                calling_ae_title=calling,
                received_at=datetime.now(UTC),
            ),
            outcome=spooled.outcome,
        )
        logger.debug(
            "SOP Instance %s of study %s: %s", sop_instance_uid, study_uid, spooled.outcome
        )
        return statuses.SUCCESS
    except Exception:
        logger.exception(
            "C-STORE of SOP Instance %s (study %s) failed", sop_instance_uid, study_uid
        )
        return statuses.PROCESSING_FAILURE


def event_handlers(spool: Spool, store: StudyRecorder) -> list[Any]:
    """Return the handler bindings for ``start_server`` (3-tuple form, no globals)."""
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [spool, store]),
    ]


def start_server(
    settings: NodeSettings,
    spool: Spool,
    store: StudyRecorder,
    *,
    block: bool,
    extra_handlers: Sequence[Any] = (),
) -> ThreadedAssociationServer | None:
    """Start the listener on ``settings.host:settings.port``.

    Returns the running server when ``block`` is False (stop it with
    ``server.shutdown()``); with ``block=True`` it serves until interrupted and
    returns None.
    """
    ae = build_ae(settings)
    logger.info(
        "listening as %s on %s:%d (max PDU %d)",
        settings.ae_title,
        settings.host,
        settings.port,
        settings.max_pdu,
    )
    server: ThreadedAssociationServer | None = ae.start_server(
        (settings.host, settings.port),
        block=block,
        evt_handlers=[*event_handlers(spool, store), *extra_handlers],
    )
    return server
