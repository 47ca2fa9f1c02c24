"""The Orthanc harness against the real server: REST upload, lookup, C-STORE to a modality."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest

from tests.support.errors import OrthancError
from tests.support.fixtures import OrthancFactory
from tests.support.orthanc import OrthancServer, build_config
from tests.viewer.sr_samples import chest_image

pytestmark = pytest.mark.integration


def test_config_uses_loopback_test_settings(tmp_path: Path) -> None:
    plain = build_config(
        tmp_path,
        aet="PACS",
        http_port=1,
        dicom_port=2,
        modalities={"node": ("D2R", "127.0.0.1", 3)},
        dicomweb_plugin=None,
        max_pdu=None,
    )
    assert plain["Plugins"] == []
    assert "DicomWeb" not in plain and "MaximumPduLength" not in plain
    assert plain["DicomModalities"] == {"node": {"AET": "D2R", "Host": "127.0.0.1", "Port": 3}}
    assert (plain["DicomAlwaysAllowStore"], plain["DicomCheckCalledAet"]) == (True, False)
    assert (plain["UnknownSopClassAccepted"], plain["OverwriteInstances"]) == (False, True)
    web = build_config(
        tmp_path,
        aet="PACS",
        http_port=1,
        dicom_port=2,
        modalities={},
        dicomweb_plugin=tmp_path / "dw.so",
        max_pdu=131072,
    )
    assert web["Plugins"] == [str(tmp_path / "dw.so")]
    assert web["DicomWeb"]["Root"] == "/dicom-web/"
    assert web["MaximumPduLength"] == 131072


def test_rejects_long_aet(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="aet"):
        OrthancServer(tmp_path, aet="X" * 17)


def test_upload_lookup_and_store_to_modality(
    orthanc_factory: OrthancFactory, tmp_path: Path
) -> None:
    image_path = chest_image(tmp_path)
    image = pydicom.dcmread(image_path, stop_before_pixels=True)
    target = orthanc_factory(aet="TARGET")
    source = orthanc_factory(aet="SOURCE", max_pdu=65536)
    assert source.dicom_port != target.dicom_port
    assert source.get("/system")["DicomAet"] == "SOURCE"

    answer = source.upload(image_path)
    assert answer["Status"] == "Success"
    found = source.lookup(image.SOPInstanceUID)
    assert [(r["Type"], r["ID"]) for r in found] == [("Instance", answer["ID"])]
    stored = pydicom.dcmread(BytesIO(source.instance_file(answer["ID"])))
    assert stored.SOPInstanceUID == image.SOPInstanceUID

    source.add_modality("target", target.aet, "127.0.0.1", target.dicom_port)
    assert "target" in source.get("/modalities")
    result = source.store_to_modality("target", [answer["ParentStudy"]])
    assert (result["InstancesCount"], result["FailedInstancesCount"]) == (1, 0)

    instances = target.find_instances(image.StudyInstanceUID)
    assert len(instances) == 1
    assert instances[0]["SOPInstanceUID"] == image.SOPInstanceUID
    assert instances[0]["SOPClassUID"] == image.SOPClassUID
    assert instances[0]["SeriesInstanceUID"] == image.SeriesInstanceUID
    assert instances[0]["Modality"] == "CR"
    assert target.find_instances("1.2.3.4") == []


def test_rest_error_names_path(orthanc: OrthancServer) -> None:
    with pytest.raises(OrthancError, match="/instances/unknown"):
        orthanc.get("/instances/unknown")


def test_stop_ends_the_process(orthanc: OrthancServer) -> None:
    assert orthanc.get("/system")["DicomAet"] == orthanc.aet
    orthanc.stop()
    assert not orthanc.running
    with pytest.raises(OSError):
        orthanc.get("/system", timeout=2)
