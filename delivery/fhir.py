"""The FHIR destination: the draft report as a FHIR R4 transaction Bundle.

``fhir+http(s)://host/base`` names the server's base; one ``POST {base}`` carries a
``transaction`` Bundle (:func:`build_bundle`) of

* the **Patient**, conditionally created (``ifNoneExist``) by the study's Patient ID and its
  issuer; PatientName, BirthDate and Sex come from the SR header (a phantom study's in tests);
* the **ImagingStudy**, conditionally created by its Study Instance UID (``urn:dicom:uid``
  identifier ``urn:oid:<uid>``), listing the d2r SR instances in their series;
* one **Observation** per lesion box (status preliminary): the finding coded by
  :mod:`delivery.fhir_codes`, bodySite, derivedFrom the ImagingStudy, the model's score and
  the box (x_min, y_min, x_max, y_max in image pixels) as components, the grounding sentence
  as a note; conditionally updated (``PUT Observation?identifier=…``);
* the **DiagnosticReport** (status preliminary, category RAD, LOINC code, conclusion = the
  impression, presentedForm = findings and impression as text/plain), conditionally updated
  by its identifier.

The identifiers derive from the study, the model name and version (and the lesion's place),
like the SR UIDs, so a repeated job updates the same resources. The models are
``fhir.resources.R4B``: R4B (4.3) is the technical correction of R4 (4.0.1) and leaves these
five resources as R4 has them; the Bundle carries no ``fhirVersion`` or profile, and the tests
validate it against the R4 StructureDefinitions too.

Outcomes: a ``transaction-response`` with every entry 2xx is delivered (one item per entry:
its location and status); HTTP 408, 425, 429, 5xx, no connection or a timeout is transient;
any other 4xx is permanent, with the OperationOutcome's issue codes and element paths only
(an OperationOutcome may echo patient data). An abstained study sends a DiagnosticReport that
says the study was not assessed and why, without Observations.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import requests
from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.attachment import Attachment
from fhir.resources.R4B.bundle import Bundle, BundleEntry, BundleEntryRequest
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.humanname import HumanName
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.imagingstudy import (
    ImagingStudy,
    ImagingStudySeries,
    ImagingStudySeriesInstance,
)
from fhir.resources.R4B.observation import Observation, ObservationComponent
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.resource import Resource
from pydicom.dataset import Dataset

from delivery.content import DeliveryContent, FindingBox
from delivery.destinations import Delivered, DeliveredItem, HttpEndpoint, StudyResults
from delivery.errors import PermanentSendError, TransientSendError
from delivery.fhir_codes import FINDINGS, LOCAL_SYSTEM, LOINC, REPORT_CODE, SNOMED
from delivery.http import describe, http_error

__all__ = ["FhirDestination", "build_bundle", "report_identifier", "transaction_outcome"]

logger = logging.getLogger(__name__)

#: identifier system of d2r's deterministic identifiers (values are ``urn:uuid:…``)
IDENTIFIER_SYSTEM = "urn:ietf:rfc:3986"
#: identifier system of DICOM UIDs (values are ``urn:oid:…``)
DICOM_UID_SYSTEM = "urn:dicom:uid"
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:d2r:fhir")
_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
_OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_UCUM = "http://unitsofmeasure.org"
_MEASURES = "urn:d2r:codesystem:lesion-measurements"
_BOX = ("x_min", "y_min", "x_max", "y_max")
_SEX = {"M": "male", "F": "female", "O": "other"}
_FHIR_JSON = "application/fhir+json"


def _uuid(*parts: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, '|'.join(parts))}"


def report_identifier(study_uid: str, content: DeliveryContent) -> str:
    """The DiagnosticReport's identifier value: the same for the same study and model."""
    return _uuid(study_uid, content.model_name, content.model_version, "DiagnosticReport")


def _text(ds: Dataset, keyword: str) -> str:
    return str(getattr(ds, keyword, "") or "").strip()


def _coding(system: str, code: str, display: str) -> Coding:
    return Coding(system=system, code=code, display=display)


def _concept(text: str, *codings: Coding) -> CodeableConcept:
    return CodeableConcept(coding=list(codings), text=text)


def _date(text: str) -> Any:
    """A FHIR date from a DICOM DA, or None. A DICOM TM has no UTC offset, which a FHIR
    dateTime with a time needs, so times are left out; a FHIR dateTime may be a date alone,
    though the models annotate their dateTime fields as ``datetime`` (hence ``Any``)."""
    try:
        return datetime.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        return None


def _patient_identifier(header: Dataset) -> Identifier:
    patient_id = _text(header, "PatientID")
    if not patient_id:
        raise PermanentSendError("the study has no Patient ID: a FHIR report needs its subject")
    issuer = _text(header, "IssuerOfPatientID")
    mrn = _concept("Medical record number", _coding(_V2_0203, "MR", "Medical record number"))
    if issuer and all(p.isdigit() for p in issuer.split(".")):
        return Identifier(system=f"urn:oid:{issuer}", value=patient_id, type=mrn)
    if issuer:
        return Identifier(value=patient_id, type=mrn, assigner=Reference(display=issuer))
    return Identifier(value=patient_id, type=mrn)


def _escape(text: str) -> str:
    """A search parameter value: FHIR's backslash escapes, then percent-encoding."""
    for char in "\\|,$":
        text = text.replace(char, "\\" + char)
    return quote(text, safe=":/.-_~")


def _search(identifier: Identifier) -> str:
    """``identifier=system|value`` for a conditional request, escaped (a Patient ID may hold
    anything but a backslash)."""
    system = f"{_escape(str(identifier.system))}|" if identifier.system else ""
    return f"identifier={system}{_escape(str(identifier.value))}"


def _patient(header: Dataset, identifier: Identifier) -> Patient:
    patient = Patient(identifier=[identifier])
    name = getattr(header, "PatientName", None)
    if name:
        given = [g for g in (name.given_name, name.middle_name) if g]
        patient.name = [
            HumanName(family=name.family_name or None, given=given or None, text=str(name))
        ]
    sex = _SEX.get(_text(header, "PatientSex"), "unknown")
    patient.gender = sex
    birth = _date(_text(header, "PatientBirthDate"))
    if birth:
        patient.birthDate = birth
    return patient


def _imaging_study(
    study_uid: str, header: Dataset, reports: Sequence[Dataset], subject: Reference
) -> ImagingStudy:
    instances: dict[str, list[ImagingStudySeriesInstance]] = {}
    descriptions: dict[str, str] = {}
    for ds in reports:
        if ds.get("Modality") != "SR":  # the presentation state and overlay image are not listed
            continue
        descriptions.setdefault(str(ds.SeriesInstanceUID), _text(ds, "SeriesDescription"))
        instances.setdefault(str(ds.SeriesInstanceUID), []).append(
            ImagingStudySeriesInstance(
                uid=str(ds.SOPInstanceUID),
                sopClass=Coding(system=IDENTIFIER_SYSTEM, code=f"urn:oid:{ds.SOPClassUID}"),
                number=int(ds.InstanceNumber) if "InstanceNumber" in ds else None,
            )
        )
    series = [
        ImagingStudySeries(
            uid=uid,
            modality=_coding(_DCM, "SR", "SR Document"),
            description=descriptions[uid] or None,
            instance=members,
        )
        for uid, members in instances.items()
    ]
    identifiers = [Identifier(system=DICOM_UID_SYSTEM, value=f"urn:oid:{study_uid}")]
    accession = _text(header, "AccessionNumber")
    if accession:
        acsn = _concept("Accession ID", _coding(_V2_0203, "ACSN", "Accession ID"))
        identifiers.append(Identifier(type=acsn, value=accession))
    study = ImagingStudy(
        status="available",
        identifier=identifiers,
        subject=subject,
        description=_text(header, "StudyDescription") or None,
        series=series,
    )
    started = _date(_text(header, "StudyDate"))
    if started:
        study.started = started
    return study


def _observation(
    lesion: FindingBox,
    identifier: Identifier,
    subject: Reference,
    study: Reference,
    effective: Any,
) -> Observation:
    code = FINDINGS.get(lesion.class_name)
    if code is None:
        raise PermanentSendError(f"lesion class {lesion.class_name!r} has no FHIR code")
    codings = [_coding(LOCAL_SYSTEM, str(code.index), code.display)]
    if code.snomed is not None:
        codings.insert(0, _coding(SNOMED, *code.snomed))
    components = [
        ObservationComponent(
            code=_concept("Model score", _coding(_MEASURES, "score", "Model score")),
            valueQuantity=Quantity(
                value=Decimal(str(round(lesion.score, 4))), unit="1", system=_UCUM, code="1"
            ),
        )
    ]
    for name, value in zip(_BOX, lesion.box, strict=True):
        components.append(
            ObservationComponent(
                code=_concept(
                    f"Box {name} (image pixels)", _coding(_MEASURES, f"box-{name}", name)
                ),
                valueQuantity=Quantity(
                    value=Decimal(str(round(value, 2))), unit="pixel", system=_UCUM, code="{pixel}"
                ),
            )
        )
    identifiers = [identifier]
    if lesion.tracking_uid:
        identifiers.append(
            Identifier(system=DICOM_UID_SYSTEM, value=f"urn:oid:{lesion.tracking_uid}")
        )
    observation = Observation(
        identifier=identifiers,
        status="preliminary",
        category=[_concept("Imaging", _coding(_OBSERVATION_CATEGORY, "imaging", "Imaging"))],
        code=_concept(lesion.class_name, *codings),
        subject=subject,
        derivedFrom=[study],
        component=components,
    )
    if code.body_site is not None:
        observation.bodySite = _concept(code.body_site[1], _coding(SNOMED, *code.body_site))
    if lesion.sentence:
        observation.note = [Annotation(text=lesion.sentence)]
    if effective:
        observation.effectiveDateTime = effective
    return observation


def _presented_text(content: DeliveryContent) -> str:
    if content.abstained:
        return (
            "NOT ASSESSED: the study was not assessed by the model.\n"
            f"Reason: {content.abstain_reason or 'not given'}\n"
        )
    return f"FINDINGS:\n{content.findings}\n\nIMPRESSION:\n{content.impression}\n"


def _entry(
    full_url: str, resource: Resource, method: str, url: str, if_none_exist: str | None = None
) -> BundleEntry:
    return BundleEntry(
        fullUrl=full_url,
        resource=resource,
        request=BundleEntryRequest(method=method, url=url, ifNoneExist=if_none_exist),
    )


# Longer than a screen: the FHIR resources of one transaction Bundle, built and cross-referenced
# in one place
def build_bundle(results: StudyResults) -> Bundle:
    """The transaction Bundle for ``results`` (see the module docstring), validated by the models.

    Raises
    ------
    PermanentSendError
        When the results have no report content (an older release's results: reprocess the
        study) or no Patient ID.
    """
    content = results.content
    if content is None:
        raise PermanentSendError(
            "these results predate the report content file; run `d2r retry --reprocess` "
            "on the study to send it to FHIR"
        )
    if not results.reports:
        raise PermanentSendError("no SR to report")
    study_uid = results.study_instance_uid
    header = results.reports[0]
    key = (study_uid, content.model_name, content.model_version)
    patient_id = _patient_identifier(header)
    patient_url, study_url, report_url = (_uuid(*key, kind) for kind in ("p", "s", "r"))
    subject = Reference(reference=patient_url)
    study_ref = Reference(reference=study_url)
    effective = _date(_text(header, "StudyDate"))
    study_identifier = Identifier(system=DICOM_UID_SYSTEM, value=f"urn:oid:{study_uid}")
    entries = [
        _entry(
            patient_url,
            _patient(header, patient_id),
            "POST",
            "Patient",
            if_none_exist=_search(patient_id),
        ),
        _entry(
            study_url,
            _imaging_study(study_uid, header, results.reports, subject),
            "POST",
            "ImagingStudy",
            if_none_exist=_search(study_identifier),
        ),
    ]
    observations = []
    for n, lesion in enumerate(() if content.abstained else content.lesions):
        identifier = Identifier(
            system=IDENTIFIER_SYSTEM, value=_uuid(*key, "Observation", str(n), lesion.class_name)
        )
        url = _uuid(*key, "o", str(n))
        observation = _observation(lesion, identifier, subject, study_ref, effective)
        entries.append(_entry(url, observation, "PUT", f"Observation?{_search(identifier)}"))
        observations.append(Reference(reference=url))
    identifier = Identifier(system=IDENTIFIER_SYSTEM, value=report_identifier(study_uid, content))
    sr_identifier = Identifier(
        system=DICOM_UID_SYSTEM, value=f"urn:oid:{content.sr_sop_instance_uid}"
    )
    text = _presented_text(content)
    report = DiagnosticReport(
        identifier=[identifier, sr_identifier],
        status="preliminary",
        category=[_concept("Radiology", _coding(_V2_0074, "RAD", "Radiology"))],
        code=_concept("Chest X-ray report (AI draft)", _coding(LOINC, *REPORT_CODE)),
        subject=subject,
        imagingStudy=[study_ref],
        result=observations or None,
        conclusion=(
            f"Not assessed: {content.abstain_reason or 'the model abstained'}"
            if content.abstained
            else content.impression or None
        ),
        presentedForm=[
            Attachment(
                contentType="text/plain; charset=utf-8",
                language="en",
                title=f"Draft report by {content.model_name} {content.model_version} (unverified)",
                data=base64.b64encode(text.encode("utf-8")),
            )
        ],
    )
    if effective:
        report.effectiveDateTime = effective
    entries.append(_entry(report_url, report, "PUT", f"DiagnosticReport?{_search(identifier)}"))
    return Bundle(type="transaction", entry=entries)


def _issues(body: Any) -> str:
    """The OperationOutcome's issue codes and element paths: no text, which may echo data."""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    for issue in body.get("issue") or []:
        if isinstance(issue, dict):
            where = ",".join(
                str(e) for e in (issue.get("expression") or issue.get("location") or [])
            )
            parts.append(
                f"{issue.get('severity', '?')} {issue.get('code', '?')}"
                + (f" at {where}" if where else "")
            )
    return "; ".join(parts[:10])


def transaction_outcome(name: str, body: Any) -> Delivered:
    """The items of a ``transaction-response`` Bundle.

    Raises
    ------
    PermanentSendError
        When the answer is not a transaction response or an entry is not 2xx.
    """
    if not isinstance(body, dict) or body.get("type") != "transaction-response":
        raise PermanentSendError(f"{name}: the answer is not a transaction-response Bundle")
    items = []
    for entry in body.get("entry") or []:
        response = entry.get("response") or {} if isinstance(entry, dict) else {}
        status = str(response.get("status", ""))
        location = str(response.get("location", ""))
        if not status.startswith("2"):
            raise PermanentSendError(f"{name}: a transaction entry answered {status!r}")
        items.append(DeliveredItem(location, status, location.split("/", 1)[0]))
    return Delivered(tuple(items))


@dataclass
class FhirDestination:
    """One FHIR server: the report as a transaction Bundle (see the module docstring)."""

    endpoint: HttpEndpoint
    session: requests.Session
    timeout: float = 60.0
    kind: str = "fhir"

    @property
    def name(self) -> str:
        """The address as configured."""
        return self.endpoint.name

    def send(self, results: StudyResults) -> Delivered:
        """POST the transaction; each answered entry is an item (``Patient/…``, ``201 Created``)."""
        bundle = build_bundle(results)
        try:
            response = self.session.post(
                self.endpoint.url,  # POST [base]
                data=bundle.model_dump_json(exclude_none=True).encode("utf-8"),
                headers={"Content-Type": _FHIR_JSON, "Accept": _FHIR_JSON},
                timeout=(self.timeout, self.timeout),
            )
        except requests.RequestException as exc:  # connection, TLS, timeout
            raise TransientSendError(f"{self.name}: {describe(exc)}") from None
        try:
            body = json.loads(response.content) if response.content else None
        except ValueError:
            body = None
        if response.status_code >= 400:
            raise http_error(self.name, response.status_code, response.reason or "", _issues(body))
        delivered = transaction_outcome(self.name, body)
        logger.info(
            "study %s: %d FHIR resource(s) accepted by %s",
            results.study_instance_uid,
            len(delivered.items),
            self.name,
        )
        return delivered
