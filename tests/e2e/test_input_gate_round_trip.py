"""The input gate through the whole round trip with the bundled demo model.

Orthanc C-STOREs the real RG1 chest CR, the real RG3 tibia and a phantom study to ``d2r node``;
a real Celery worker runs the demo model with ``D2R_INPUT_GATE=on``. (The real RG3 header says
tibia, which the node's selection already skips; this copy's header claims a frontal chest, as a
wrong routing rule or modality setting would.) The real radiographs end
``done`` with reason ``abstained: ...`` and an abstention SR in Orthanc (``dciodvfy`` clean, no
measurement groups, the model and the reason named); the phantom study ends ``done`` with its
lesion boxes, each group carrying the findings sentence that states it.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.reliability.stack import make_stack
from tests.support.processes import base_env, run_d2r

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEMO = Path(__file__).resolve().parents[2] / "models" / "d2r-demo-phantom"


def _dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True)
    return [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]


def _items(ds: pydicom.Dataset):  # type: ignore[no-untyped-def]
    for item in getattr(ds, "ContentSequence", []):
        yield item
        yield from _items(item)


def _comprehensive_sr(s: Any, study_uid: str, tmp: Path) -> tuple[pydicom.Dataset, Path]:
    srs = [i for i in s.orthanc.find_instances(study_uid) if i.get("Modality") == "SR"]
    (inst,) = [i for i in srs if i["SOPClassUID"].endswith(".88.33")]
    path = tmp / f"{inst['SOPInstanceUID']}.dcm"
    path.write_bytes(s.orthanc.instance_file(inst["ID"]))
    return pydicom.dcmread(path), path


def test_real_radiographs_abstain_and_phantoms_are_reported(
    orthanc_factory: Any, tmp_path: Path
) -> None:
    phantom = tmp_path / "phantom"
    res = run_d2r(
        "synth", "--out", str(phantom), "--studies", "1", "--seed", "41", "--size", "64",
        "--dicom-size", "1024", "--normal-fraction", "0", env=base_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    entry = json.loads((phantom / "studies.jsonl").read_text().splitlines()[0])
    # the real RG3 tibia as a wrong header would send it: labelled a frontal chest, so the
    # node's selection passes it on and only the model's input gate can notice
    tibia = pydicom.dcmread(str(get_testdata_file("RG3_UNCR.dcm")))
    tibia.BodyPartExamined, tibia.ViewPosition = "CHEST", "PA"
    tibia.StudyInstanceUID, tibia.SeriesInstanceUID = generate_uid(), generate_uid()
    tibia.SOPInstanceUID = tibia.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    tibia.save_as(tmp_path / "rg3-as-chest.dcm", enforce_file_format=True)
    files = {
        "RG1": [Path(str(get_testdata_file("RG1_UNCR.dcm")))],
        "RG3": [tmp_path / "rg3-as-chest.dcm"],
        "phantom": [phantom / p for p in entry["dicom"]],
    }
    studies = {k: str(pydicom.dcmread(v[0], stop_before_pixels=True).StudyInstanceUID)
               for k, v in files.items()}  # fmt: skip
    s = make_stack(orthanc_factory, DEMO, tmp_path, D2R_INPUT_GATE="on")
    try:
        s.start_node()
        s.start_worker()
        assert s.orthanc is not None
        for paths in files.values():
            uploaded = [s.orthanc.upload(p) for p in paths]
            s.orthanc.store_to_modality("d2r", [uploaded[0]["ParentStudy"]])
        s.wait_states(studies.values(), {"done", "failed", "skipped"}, timeout=240)
        time.sleep(0.5)
        for name in ("RG1", "RG3"):
            view = s.view(studies[name])
            assert view is not None and view.state == "done", (name, view, s.logs())
            assert (view.reason or "").startswith("abstained: "), (name, view.reason)
            assert view.lesion_count == 0
            ds, path = _comprehensive_sr(s, studies[name], tmp_path)
            assert _dciodvfy_errors(path) == [], name
            codes = {i.ConceptNameCodeSequence[0].CodeValue for i in _items(ds)}
            assert "126010" not in codes and "125007" not in codes  # no measurement groups
            texts = [str(i.TextValue) for i in _items(ds) if i.ValueType == "TEXT"]
            assert any("not assessed" in t and "d2r-demo-phantom version" in t for t in texts)
        view = s.view(studies["phantom"])
        assert view is not None and view.state == "done" and not view.reason, view
        assert view.lesion_count is not None and view.lesion_count > 0
        ds, path = _comprehensive_sr(s, studies["phantom"], tmp_path)
        assert _dciodvfy_errors(path) == []
        groups = [i for i in _items(ds) if i.ConceptNameCodeSequence[0].CodeValue == "125007"]
        assert len(groups) == view.lesion_count
        (findings,) = [
            str(i.TextValue)
            for i in _items(ds)
            if i.ConceptNameCodeSequence[0].CodeValue == "121070"
        ]
        for group in groups:  # each box with the findings sentence that states it
            (sentence,) = [
                str(i.TextValue)
                for i in group.ContentSequence
                if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "C0034375"
            ]
            assert sentence in findings
    finally:
        s.stop()
