"""The FHIR destination: the Bundle (validated by fhir.resources, then by a real FHIR R4
server's validator), conditional update against that server, and the failure semantics."""

from __future__ import annotations

import base64
import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle

from d2r_core.classes import VINDR_CLASSES
from d2r_core.errors import ConfigError
from delivery import DeliverySettings, open_destination
from delivery.destinations import HttpEndpoint, StudyResults
from delivery.errors import PermanentSendError, TransientSendError
from delivery.fhir import build_bundle, report_identifier
from delivery.fhir_codes import FINDINGS, LOCAL_SYSTEM, SNOMED
from report.codes import FINDING_CODES
from tests.delivery.samples import (
    LESIONS,
    PATIENT_NAME,
    doc_sample,
    mapping_rows,
    phantom_results,
)
from tests.support import fhir_server
from tests.support.processes import free_port


def _resources(bundle: Bundle, kind: str) -> list[dict]:  # type: ignore[type-arg]
    data = json.loads(bundle.model_dump_json(exclude_none=True))
    return [e["resource"] for e in data["entry"] if e["resource"]["resourceType"] == kind]


def test_every_class_is_mapped_and_coded_as_the_sr_codes_it() -> None:
    assert tuple(FINDINGS) == VINDR_CLASSES
    for name, code in FINDINGS.items():
        assert VINDR_CLASSES[code.index] == name
        sr = FINDING_CODES[name]
        expected = sr.finding.value if sr.finding.scheme_designator == "SCT" else None
        assert (code.snomed[0] if code.snomed else None) == expected, name
        site = sr.finding_site.value if sr.finding_site else None
        assert (code.body_site[0] if code.body_site else None) == site, name


def test_the_bundle_is_a_valid_transaction_with_one_observation_per_lesion() -> None:
    results = phantom_results()
    bundle = build_bundle(results)
    again = Bundle.model_validate_json(bundle.model_dump_json(exclude_none=True))
    assert again.type == "transaction"
    (report,) = _resources(bundle, "DiagnosticReport")
    assert report["status"] == "preliminary"
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    assert report["code"]["coding"][0]["system"] == "http://loinc.org"
    assert report["conclusion"] == results.content.impression  # type: ignore[union-attr]
    text = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert results.content.findings in text and results.content.impression in text  # type: ignore[union-attr]
    observations = _resources(bundle, "Observation")
    assert len(observations) == len(LESIONS) == len(report["result"])
    effusion = observations[0]
    codes = {(c["system"], c["code"]) for c in effusion["code"]["coding"]}
    assert codes == {(SNOMED, "60046008"), (LOCAL_SYSTEM, "16")}
    assert effusion["bodySite"]["coding"][0]["code"] == "3120008"
    values = [c["valueQuantity"]["value"] for c in effusion["component"]]
    assert values == [0.8123, 410.0, 620.5, 700.0, 880.0]
    assert effusion["note"][0]["text"] == "Small left effusion."
    (study,) = _resources(bundle, "ImagingStudy")
    assert study["identifier"][0] == {
        "system": "urn:dicom:uid",
        "value": f"urn:oid:{results.study_instance_uid}",
    }
    sr_uids = {i["uid"] for s in study["series"] for i in s["instance"]}
    assert sr_uids == {str(ds.SOPInstanceUID) for ds in results.reports}
    (patient,) = _resources(bundle, "Patient")
    assert patient["identifier"][0]["system"] == "urn:oid:1.2.826.0.1.3680043.10.999"


def test_the_imaging_study_lists_the_srs_not_the_presentation_state() -> None:
    results = phantom_results()
    state = copy.deepcopy(results.reports[0])
    state.Modality, state.SOPClassUID = "PR", "1.2.840.10008.5.1.4.1.1.11.1"
    state.SOPInstanceUID = state.SeriesInstanceUID = "1.2.3.4"
    with_state = StudyResults(
        results.study_instance_uid, (*results.reports, state), results.content
    )
    (study,) = _resources(build_bundle(with_state), "ImagingStudy")
    listed = {i["uid"] for s in study["series"] for i in s["instance"]}
    assert listed == {str(ds.SOPInstanceUID) for ds in results.reports}


def test_identifiers_derive_from_the_study_and_the_model_version() -> None:
    results = phantom_results()
    first = json.loads(build_bundle(results).model_dump_json(exclude_none=True))
    second = json.loads(build_bundle(results).model_dump_json(exclude_none=True))
    assert first == second
    assert [e["request"] for e in first["entry"]][-1]["url"] == (
        "DiagnosticReport?identifier=urn:ietf:rfc:3986|"
        + report_identifier(results.study_instance_uid, results.content)  # type: ignore[arg-type]
    )
    newer = StudyResults(
        results.study_instance_uid,
        results.reports,
        phantom_results(version="3.2.0").content,
    )
    assert report_identifier(newer.study_instance_uid, newer.content) != report_identifier(  # type: ignore[arg-type]
        results.study_instance_uid,
        results.content,  # type: ignore[arg-type]
    )


def test_an_abstained_study_is_reported_as_not_assessed_without_observations() -> None:
    bundle = build_bundle(phantom_results(abstained=True))
    assert _resources(bundle, "Observation") == []
    (report,) = _resources(bundle, "DiagnosticReport")
    assert report["conclusion"].startswith("Not assessed: not a frontal chest radiograph")
    assert "result" not in report


def test_results_without_content_ask_for_a_reprocess() -> None:
    results = phantom_results()
    with pytest.raises(PermanentSendError, match="d2r retry --reprocess"):
        build_bundle(StudyResults(results.study_instance_uid, results.reports, None))


# -- against a real FHIR R4 server ------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[fhir_server.FhirServer]:
    if not fhir_server.installed():
        pytest.skip("FHIR test server not installed (tests/support/install-fhir-server.sh)")
    srv = fhir_server.FhirServer(tmp_path / "fhir.log")
    try:
        yield srv
    finally:
        srv.stop()


def _destination(url: str, **files: Path) -> object:
    # the test server listens on loopback without TLS: credentials go in cleartext by opt-in
    insecure = url.startswith("http://")
    return open_destination(
        HttpEndpoint("fhir", url, insecure=insecure, **files), DeliverySettings()
    )


@pytest.mark.integration
def test_a_repeated_send_updates_rather_than_duplicates(
    server: fhir_server.FhirServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    results = phantom_results()
    destination = _destination(server.base)
    first = destination.send(results)  # type: ignore[attr-defined]
    kinds = sorted(i.object_type for i in first.items)
    assert kinds == sorted(["Patient", "ImagingStudy", "DiagnosticReport"] + ["Observation"] * 3)
    assert {i.status.split()[0] for i in first.items} == {"201"}
    second = destination.send(results)  # type: ignore[attr-defined]
    assert [i.identifier.split("/")[:2] for i in second.items] == [
        i.identifier.split("/")[:2] for i in first.items
    ]
    assert {i.status.split()[0] for i in second.items} == {"200"}
    identifier = report_identifier(results.study_instance_uid, results.content)  # type: ignore[arg-type]
    reports = server.search(f"DiagnosticReport?identifier={identifier}")
    assert len(reports) == 1 and reports[0]["status"] == "preliminary"
    assert len(server.search("Observation?status=preliminary")) == 3
    assert len(server.search("Patient?identifier=PHANTOM-0001")) == 1
    abstained = phantom_results(abstained=True)
    assert [i.object_type for i in destination.send(abstained).items] == [  # type: ignore[attr-defined]
        "Patient",
        "ImagingStudy",
        "DiagnosticReport",
    ]
    (not_assessed,) = server.search(
        "DiagnosticReport?identifier="
        + report_identifier(abstained.study_instance_uid, abstained.content)  # type: ignore[arg-type]
    )
    assert not_assessed["conclusion"].startswith("Not assessed")
    family = PATIENT_NAME.split("^")[0]
    assert not [r.getMessage() for r in caplog.records if family in r.getMessage()]


@pytest.mark.integration
def test_the_servers_validation_errors_are_permanent_and_echo_no_data(
    server: fhir_server.FhirServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = phantom_results()
    data = json.loads(build_bundle(results).model_dump_json(exclude_none=True))
    data["entry"][-1]["resource"].pop("status")  # DiagnosticReport.status is required
    data["entry"][0]["resource"]["gender"] = PATIENT_NAME  # an invalid code echoing the name

    class Broken:
        def model_dump_json(self, **_: object) -> str:
            return json.dumps(data)

    monkeypatch.setattr("delivery.fhir.build_bundle", lambda _: Broken())
    with pytest.raises(PermanentSendError) as failure:
        _destination(server.base).send(results)  # type: ignore[attr-defined]
    assert failure.value.status == 400
    assert "status" in str(failure.value)
    assert "PHANTOM" not in str(failure.value)


@pytest.mark.integration
def test_bearer_token_from_a_file(tmp_path: Path) -> None:
    if not fhir_server.installed():
        pytest.skip("FHIR test server not installed (tests/support/install-fhir-server.sh)")
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    srv = fhir_server.FhirServer(tmp_path / "fhir.log", token_file=token)
    try:
        assert _destination(srv.base, token_file=token).send(phantom_results()).items  # type: ignore[attr-defined]
        wrong = tmp_path / "wrong"
        wrong.write_text("nope")
        with pytest.raises(PermanentSendError) as failure:
            _destination(srv.base, token_file=wrong).send(phantom_results())  # type: ignore[attr-defined]
        assert failure.value.status == 401 and "nope" not in str(failure.value)
        with pytest.raises(ConfigError, match="token file"):
            _destination(srv.base, token_file=tmp_path / "absent")
    finally:
        srv.stop()


def test_a_server_that_is_down_is_transient() -> None:
    with pytest.raises(TransientSendError):
        _destination(f"http://127.0.0.1:{free_port()}").send(phantom_results())  # type: ignore[attr-defined]


def test_the_docs_show_what_the_code_sends() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "fhir.md").read_text()
    assert f"```json\n{doc_sample()}\n```" in page
    for row in mapping_rows():
        assert row in page


@pytest.mark.integration
def test_a_patient_id_with_search_syntax_in_it_still_matches_one_patient(
    server: fhir_server.FhirServer,
) -> None:
    destination = _destination(server.base)
    for _ in range(2):
        results = phantom_results()
        for ds in results.reports:
            ds.PatientID = "PHANTOM 02&X,Y$Z"
        statuses = {i.object_type: i.status for i in destination.send(results).items}  # type: ignore[attr-defined]
    assert statuses["Patient"].startswith("200")  # the second study found the first's Patient
    found = server.search("Patient?identifier=" + "PHANTOM%2002%26X%5C%2CY%5C%24Z")
    assert len(found) == 1 and found[0]["identifier"][0]["value"] == "PHANTOM 02&X,Y$Z"
