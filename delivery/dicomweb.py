"""The DICOMweb destination: STOW-RS (PS3.18 10.5) of the study's SRs into the same study.

``dicomweb+http(s)://host/path`` names the DICOMweb root (for Orthanc:
``http://host:8042/dicom-web``); the SRs are stored with one ``POST {root}/studies/{study}``
built by :class:`dicomweb_client.DICOMwebClient`. Outcomes, for the worker's retry policy:

* no connection, a timeout, a TLS failure, HTTP 408, 425, 429 or 5xx:
  :class:`~delivery.errors.TransientSendError`;
* any other HTTP 4xx (400, 401, 403, 404, 409, 415...):
  :class:`~delivery.errors.PermanentSendError` with the status;
* a store response whose Failed SOP Sequence is not empty (HTTP 409, or 202 for a partial
  store): permanent, or transient when every Failure Reason is ``Refused: Out of Resources``
  (0xA7xx), the condition that passes;
* every SR stored, some with a Warning Reason (HTTP 202): delivered, with the warning.

Each SR is one delivered item: its SOP Instance UID with ``0x0000`` or its warning reason.
The client's own retries are off: the worker retries from the study database.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from delivery.destinations import Delivered, DeliveredItem, HttpEndpoint, StudyResults
from delivery.errors import PermanentSendError, SendError, TransientSendError
from delivery.http import describe, http_error

__all__ = ["DicomwebDestination", "store_outcome"]

logger = logging.getLogger(__name__)

_OUT_OF_RESOURCES = 0xA700


def _reasons(ds: Dataset, sequence: str, keyword: str) -> dict[str, int]:
    found = {}
    for item in getattr(ds, sequence, None) or []:
        uid = str(getattr(item, "ReferencedSOPInstanceUID", ""))
        found[uid] = int(getattr(item, keyword, 0) or 0)
    return found


def _failure(message: str, failed: dict[str, int], status: int | None = None) -> SendError:
    """Transient when every Failure Reason is Out of Resources, else permanent with ``status``
    (the HTTP status) or the first Failure Reason."""
    detail = ", ".join(f"0x{code:04X} for {uid}" for uid, code in sorted(failed.items()))
    if all(code & 0xFF00 == _OUT_OF_RESOURCES for code in failed.values()):
        return TransientSendError(f"{message}: {detail}")
    first = next(iter(failed.values()))
    return PermanentSendError(f"{message}: {detail}", status=status or first)


def store_outcome(name: str, response: Dataset, reports: tuple[Dataset, ...]) -> Delivered:
    """The outcome of a PS3.18 store response (the Store Instances Response Module).

    Raises
    ------
    TransientSendError, PermanentSendError
        When the Failed SOP Sequence is not empty (see the module docstring).
    """
    failed = _reasons(response, "FailedSOPSequence", "FailureReason")
    if failed:
        raise _failure(f"{name}: {len(failed)} of {len(reports)} SR(s) not stored", failed)
    warned = _reasons(response, "ReferencedSOPSequence", "WarningReason")
    items = tuple(
        DeliveredItem(
            str(ds.SOPInstanceUID),
            f"0x{warned.get(str(ds.SOPInstanceUID), 0):04X}",
            str(ds.SOPClassUID),
        )
        for ds in reports
    )
    warnings = [f"{i.identifier}: warning {i.status}" for i in items if i.status != "0x0000"]
    if warnings:
        logger.warning("%s stored with warnings: %s", name, "; ".join(warnings))
    return Delivered(items, warning="; ".join(warnings) or None)


def _failure_body(response: requests.Response) -> Dataset | None:
    """The store response carried by an HTTP error (409 carries the Failed SOP Sequence)."""
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    try:
        if content_type in ("application/dicom+json", "application/json"):
            return Dataset.from_json(json.loads(response.content))
    except (ValueError, TypeError, KeyError):
        return None
    return None


@dataclass
class DicomwebDestination:
    """STOW-RS of every report to one DICOMweb root (see the module docstring)."""

    endpoint: HttpEndpoint
    session: requests.Session
    timeout: float = 60.0
    kind: str = "dicomweb"
    _client: DICOMwebClient = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._client = DICOMwebClient(
            self.endpoint.url, session=self.session, timeout=(self.timeout, self.timeout)
        )
        self._client.set_http_retry_params(retry=False)
        # The client sends ``Host: <name>`` without the port (only ``Host`` uses it); a
        # virtual host or a proxy on a non-default port needs both (RFC 9110 7.2).
        parts = urlsplit(self.endpoint.url)
        default = 443 if parts.scheme == "https" else 80
        if parts.port not in (None, default) and parts.hostname:
            self._client.host = f"{parts.hostname}:{parts.port}"
        self.session.headers["Accept"] = "application/dicom+json"

    @property
    def name(self) -> str:
        """The address as configured."""
        return self.endpoint.name

    def send(self, results: StudyResults) -> Delivered:
        """Store the reports in their study; each stored SR is an item."""
        if not results.reports:
            return Delivered(())
        try:
            response = self._client.store_instances(
                list(results.reports), study_instance_uid=results.study_instance_uid
            )
        except requests.HTTPError as exc:
            raise self._from_http_error(exc) from None
        except requests.RequestException as exc:  # connection, TLS, timeout
            raise TransientSendError(f"{self.name}: {describe(exc)}") from None
        except (ValueError, TypeError, AttributeError) as exc:  # cannot encode, odd answer
            raise PermanentSendError(f"{self.name}: {exc}") from None
        return store_outcome(self.name, response, results.reports)

    def _from_http_error(self, exc: requests.HTTPError) -> Exception:
        response = exc.response
        if response is None:
            return TransientSendError(f"{self.name}: {exc.__class__.__name__}")
        status, reason = response.status_code, response.reason or ""
        body = _failure_body(response)
        failed = {} if body is None else _reasons(body, "FailedSOPSequence", "FailureReason")
        if failed and status < 500:  # 409: the store response says why, per instance
            return _failure(f"{self.name}: HTTP {status} {reason}", failed, status)
        return http_error(self.name, status, reason)
