"""The DICOMweb destination: STOW-RS into a real Orthanc with its DICOMweb plugin, basic auth
from a file, and the outcome of PS3.18 store responses."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from d2r_core.config import TlsSettings
from d2r_core.errors import ConfigError
from delivery import DeliverySettings, open_destination
from delivery.destinations import HttpEndpoint
from delivery.dicomweb import store_outcome
from delivery.dimse import SendOptions
from delivery.errors import PermanentSendError, TransientSendError
from tests.delivery.samples import phantom_results
from tests.security.tls_ca import make_test_ca
from tests.support.processes import free_port
from tests.support.tls_proxy import TlsProxy


def _response(failed: dict[str, int], warned: dict[str, int]) -> Dataset:
    ds = Dataset()
    items = []
    for uid, code in failed.items():
        item = Dataset()
        item.ReferencedSOPInstanceUID, item.FailureReason = uid, code
        items.append(item)
    if items:
        ds.FailedSOPSequence = Sequence(items)
    refs = []
    for uid, code in warned.items():
        item = Dataset()
        item.ReferencedSOPInstanceUID = uid
        if code:
            item.WarningReason = code
        refs.append(item)
    ds.ReferencedSOPSequence = Sequence(refs)
    return ds


def test_store_response_outcomes() -> None:
    reports = phantom_results().reports
    uids = [str(ds.SOPInstanceUID) for ds in reports]
    ok = store_outcome("dw", _response({}, {uids[0]: 0, uids[1]: 0}), reports)
    assert [i.status for i in ok.items] == ["0x0000", "0x0000"] and ok.warning is None
    warned = store_outcome("dw", _response({}, {uids[0]: 0xB000, uids[1]: 0}), reports)
    assert warned.items[0].status == "0xB000" and warned.warning and uids[0] in warned.warning
    with pytest.raises(TransientSendError, match="0xA700"):
        store_outcome("dw", _response({uids[0]: 0xA700}, {uids[1]: 0}), reports)
    with pytest.raises(PermanentSendError, match="0x0110") as failure:
        store_outcome("dw", _response({uids[0]: 0x0110}, {uids[1]: 0}), reports)
    assert failure.value.status == 0x0110


def _destination(url: str, **files: Path) -> Any:
    # the test server listens on loopback without TLS: credentials go in cleartext by opt-in
    insecure = url.startswith("http://")
    return open_destination(
        HttpEndpoint("dicomweb", url, insecure=insecure, **files), DeliverySettings()
    )


@pytest.mark.integration
def test_the_srs_arrive_in_the_same_study(orthanc_factory: Any) -> None:
    orthanc = orthanc_factory(dicomweb=True)
    results = phantom_results()
    destination = _destination(f"{orthanc.base_url}/dicom-web")
    delivered = destination.send(results)
    assert [i.identifier for i in delivered.items] == [
        str(d.SOPInstanceUID) for d in results.reports
    ]
    assert {i.status for i in delivered.items} == {"0x0000"}
    stored = orthanc.find_instances(results.study_instance_uid)
    assert sorted(i["SOPInstanceUID"] for i in stored) == sorted(
        str(d.SOPInstanceUID) for d in results.reports
    )
    assert destination.send(results).items  # a repeated send stores the same instances again
    assert len(orthanc.find_instances(results.study_instance_uid)) == 2


@pytest.mark.integration
def test_basic_auth_from_a_file(
    orthanc_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    orthanc = orthanc_factory(
        dicomweb=True,
        extra_config={"AuthenticationEnabled": True, "RegisteredUsers": {"d2r": "right-pw"}},
    )
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("d2r:right-pw\n")
    bad.write_text("d2r:wrong-pw\n")
    url = f"{orthanc.base_url}/dicom-web"
    assert len(_destination(url, basic_auth_file=good).send(phantom_results()).items) == 2
    with pytest.raises(PermanentSendError) as failure:
        _destination(url, basic_auth_file=bad).send(phantom_results())
    assert failure.value.status == 401 and "wrong-pw" not in str(failure.value)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "right-pw" not in logged and "wrong-pw" not in logged
    malformed = tmp_path / "malformed"
    malformed.write_text("no-colon-here\n")
    with pytest.raises(ConfigError, match="user:password") as refused:
        _destination(url, basic_auth_file=malformed)
    assert "no-colon-here" not in str(refused.value)


def test_an_archive_that_is_down_is_transient() -> None:
    with pytest.raises(TransientSendError):
        _destination(f"http://127.0.0.1:{free_port()}/dicom-web").send(phantom_results())


def test_importing_delivery_loads_neither_dicomweb_client_nor_fhir_resources() -> None:
    """The DICOM node imports ``delivery``'s settings: the senders' libraries load lazily."""
    code = (
        "import sys, delivery, delivery.settings; "
        "print([m for m in ('dicomweb_client', 'fhir') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.integration
def test_https_verifies_the_archive_and_presents_the_client_certificate(
    orthanc_factory: Any, tmp_path: Path
) -> None:
    pki = make_test_ca(tmp_path / "pki")
    orthanc = orthanc_factory(dicomweb=True)
    proxy = TlsProxy(orthanc.http_port, pki.server.cert, pki.server.key, client_ca=pki.ca)
    try:
        url = f"https://127.0.0.1:{proxy.port}/dicom-web"
        tls = TlsSettings(cert=pki.client.cert, key=pki.client.key, ca=pki.ca)
        results = phantom_results()
        settings = DeliverySettings(options=SendOptions(tls=tls))
        delivered = open_destination(HttpEndpoint("dicomweb", url), settings).send(results)
        assert len(delivered.items) == 2
        assert len(orthanc.find_instances(results.study_instance_uid)) == 2
        with pytest.raises(TransientSendError, match="SSL"):  # not in the system store
            _destination(url).send(phantom_results())
        no_client_cert = DeliverySettings(options=SendOptions(tls=TlsSettings(ca=pki.ca)))
        with pytest.raises(TransientSendError):
            open_destination(HttpEndpoint("dicomweb", url), no_client_cert).send(phantom_results())
    finally:
        proxy.close()
