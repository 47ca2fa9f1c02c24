"""The whole product path ends in the radiologist's viewer.

Orthanc (the PACS, with DICOMweb) routes the chest CR to ``d2r serve``; D2R-Net runs; the SRs come
back into Orthanc; OHIF 3.13.2 in headless Chromium opens the study and our SR, draws every lesion
box where the SR puts it, and "continue tracking" turns them into editable rectangles. With
``D2R_SR_ROI_ENCODING=tid1501`` each box is labelled "<finding> <NN> %" with its sentence.

The model is the bundled demo model on an abnormal phantom study: only boxes that a findings
sentence states reach the SR (grounded findings), each group carrying its sentence. The test
compares what the viewer drew with what the SR that reached the PACS says.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from tests.support.fixtures import OrthancFactory
from tests.support.ohif import artifacts_dir, check_sr_in_ohif, find_chromium, ohif_dist
from tests.support.phantom import DEMO_MODEL, phantom_study_file
from tests.support.processes import Process, base_env, d2r_cmd, free_port, wait_for, wait_port
from tests.viewer.test_ohif_sr import LABEL_PATTERN, PIXEL_TOLERANCE, bounding_box

pytestmark = [pytest.mark.viewer, pytest.mark.integration, pytest.mark.timeout(300)]

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _walk(ds: Any) -> Any:
    for item in getattr(ds, "ContentSequence", []):
        yield item
        yield from _walk(item)


def _group_items(sr: pydicom.Dataset) -> list[Any]:
    return [i for i in _walk(sr) if i.ConceptNameCodeSequence[0].CodeValue == "125007"]


def _findings(sr: pydicom.Dataset) -> str:
    (text,) = [
        str(i.TextValue) for i in _walk(sr) if i.ConceptNameCodeSequence[0].CodeValue == "121070"
    ]
    return text


def _texts(item: Any, code: str) -> list[str]:
    return [
        str(c.TextValue)
        for c in item.ContentSequence
        if c.ValueType == "TEXT" and c.ConceptNameCodeSequence[0].CodeValue == code
    ]


def _bounds(points: Any) -> tuple[float, float, float, float]:
    return (
        float(points[:, 0].min()),
        float(points[:, 1].min()),
        float(points[:, 0].max()),
        float(points[:, 1].max()),
    )


@pytest.mark.parametrize("encoding", ["tid1410", "tid1501"])
def test_model_sr_from_the_round_trip_drawn_in_ohif(
    orthanc_factory: OrthancFactory, tmp_path: Path, encoding: str
) -> None:
    if ohif_dist() is None or find_chromium() is None:
        pytest.skip("OHIF or Chromium missing: run tests/support/install-viewer.sh")
    node_port = free_port()
    orthanc = orthanc_factory(dicomweb=True, modalities={"d2r": ("D2R", "127.0.0.1", node_port)})
    env = base_env(
        D2R_MODEL=str(DEMO_MODEL),
        D2R_SPOOL_DIR=str(tmp_path / "data" / "spool"),
        D2R_PORT=str(node_port),
        D2R_DESTINATIONS=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
        D2R_STUDY_QUIET_SECONDS="1",
        D2R_MIN_FREE_BYTES="0",
        D2R_HTTP_PORT="0",
        D2R_SR_ROI_ENCODING=encoding,
    )
    serve = Process(d2r_cmd("serve"), env=env, log=tmp_path / "serve.log")
    try:
        wait_port(node_port, timeout=60)
        image_path = phantom_study_file(tmp_path / "phantom")
        image = pydicom.dcmread(image_path, stop_before_pixels=True)
        uploaded = orthanc.upload(image_path)
        assert (
            orthanc.store_to_modality("d2r", [uploaded["ParentStudy"]])["FailedInstancesCount"] == 0
        )

        def sr_in_pacs() -> dict[str, Any] | None:
            found = [
                i
                for i in orthanc.find_instances(image.StudyInstanceUID)
                if i.get("SOPClassUID") == COMPREHENSIVE_SR
            ]
            return found[0] if found else None

        try:
            sr_instance = wait_for(sr_in_pacs, 180, "the SR in Orthanc", interval=0.5)
        except TimeoutError:
            pytest.fail(f"serve log:\n{serve.log_tail()}")
    finally:
        serve.stop()

    sr = pydicom.dcmread(BytesIO(orthanc.instance_file(sr_instance["ID"])))
    content: Any = hd.sr.ComprehensiveSR.from_dataset(sr).content  # a MeasurementReport
    if encoding == "tid1410":
        groups = content.get_planar_roi_measurement_groups()
        assert content.get_image_measurement_groups() == []
    else:
        groups = content.get_image_measurement_groups()
        assert content.get_planar_roi_measurement_groups() == []
    assert groups, "the demo model reported no grounded lesion"
    expected = []
    labels = []
    for group, item in zip(groups, _group_items(sr), strict=True):
        # each group carries the findings sentence that states it
        (sentence,) = _texts(item, "C0034375")
        assert sentence in str(_findings(sr)), sentence
        if encoding == "tid1410":
            expected.append(_bounds(group.roi.value))
            continue
        (certainty,) = group.get_measurements()
        (region,) = certainty.referenced_coordinates
        expected.append(_bounds(region.value))
        label, comment = _texts(item, "121106")
        match = LABEL_PATTERN.fullmatch(label)
        assert match is not None, label
        assert int(match["percent"]) == round(certainty.value)
        assert comment == sentence
        labels.append(
            [f"{label}:", f"{sentence}:", f"Certainty of Finding: {certainty.value:.2f} %"]
        )

    result = check_sr_in_ohif(
        orthanc,
        image.StudyInstanceUID,
        int(sr.SeriesNumber),
        artifacts_dir(),
        hydrate=True,
        hydration_timeout=6 if encoding == "tid1501" else 10,
        name=f"ohif-round-trip-sr-{encoding}",
    )
    # An untrained detector's boxes can be thin slivers, which make a least-squares fit of the
    # image-to-canvas map ill-conditioned: map each SR box through the viewport's own transform.
    assert len(result.polylines) == len(expected), (result.polylines, result.notes)
    _, _, width, height = result.viewport
    to_canvas = result.image_to_canvas
    assert to_canvas is not None and (to_canvas.columns, to_canvas.rows) == (
        image.Columns,
        image.Rows,
    )
    drawn = [bounding_box(line) for line in result.polylines]
    for x_min, y_min, x_max, y_max in expected:
        (cx0, cy0), (cx1, cy1) = to_canvas(x_min, y_min), to_canvas(x_max, y_max)
        assert 0 <= cx0 <= cx1 <= width and 0 <= cy0 <= cy1 <= height
        distance = min(
            max(abs(d[0] - cx0), abs(d[1] - cy0), abs(d[2] - cx1), abs(d[3] - cy1)) for d in drawn
        )
        assert distance <= PIXEL_TOLERANCE, (expected, drawn)
    assert len(result.labels) == len(expected), result.labels
    if encoding == "tid1410":
        # one text box per drawn box, led by the score OHIF reads from the group's NUM
        assert all(box[0].startswith("Certainty of Finding: ") for box in result.labels)
        assert result.hydrated_rectangles == len(expected)
    else:
        # "<finding> <NN> %", then the sentence, then the NUM; the tracking identifier names no
        # cornerstone tool, so OHIF offers no "continue tracking"
        assert sorted(result.labels) == sorted(labels)
        assert result.hydrated_rectangles is None
