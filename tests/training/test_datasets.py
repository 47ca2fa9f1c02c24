"""Dataset adapters on small fixtures written in each dataset's on-disk format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from training.datasets import (
    fuse_reader_boxes,
    load_datasets,
    mimic_image_path,
    read_iu_xray,
    read_r2gen,
    read_vindr,
)
from training.errors import DatasetError


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (16, 16), 100).save(path)


def _mimic(root: Path, *, with_boxes: bool) -> Path:
    entries = []
    for n, (subject, study, dicom_id) in enumerate(
        [(10000032, 50414267, "d1"), (10000764, 57375967, "d2")]
    ):
        _png(mimic_image_path(root, subject, study, dicom_id))
        e = {
            "id": dicom_id,
            "study_id": study,
            "subject_id": subject,
            "report": f"Report {n}. No pleural effusion.",
            "image_path": [f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom_id}.jpg"],
            "split": "train" if n == 0 else "test",
        }
        if with_boxes:
            e.update(
                boxes=[[10, 20, 30, 40], [-1, -1, -1, -1]],
                labels=[3, 3],
                scores=[1, 0],
                height=100,
                width=100,
            )
        entries.append(e)
    ann = root / "annotation.json"
    ann.write_text(json.dumps({"train": entries[:1], "val": [], "test": entries[1:]}))
    return ann


@pytest.mark.parametrize("with_boxes", [False, True])
def test_mimic_r2gen(tmp_path: Path, with_boxes: bool) -> None:
    ann = _mimic(tmp_path, with_boxes=with_boxes)
    recs = read_r2gen(ann, tmp_path)
    assert [r.split for r in recs] == ["train", "test"]
    assert recs[0].image_path.name == "d1.jpg" and "pleural" in recs[0].report
    if with_boxes:
        assert len(recs[0].boxes) == 1  # the padding box is dropped
        assert recs[0].boxes[0].class_name == "Cardiomegaly"
        assert recs[0].boxes[0].box == (10.0, 20.0, 40.0, 60.0)
    else:
        assert recs[0].boxes == ()


def test_r2gen_errors_name_every_missing_image(tmp_path: Path) -> None:
    ann = _mimic(tmp_path, with_boxes=False)
    for p in (tmp_path / "files").rglob("*.jpg"):
        p.unlink()
    with pytest.raises(DatasetError) as err:
        read_r2gen(ann, tmp_path)
    assert len(err.value.problems) == 2 and "d1.jpg" in str(err.value)
    ann.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_r2gen(ann, tmp_path)


def test_fusion_policy() -> None:
    a = (10.0, 10.0, 50.0, 50.0)
    b = (12.0, 12.0, 52.0, 52.0)
    far = (200.0, 200.0, 240.0, 240.0)
    fused = fuse_reader_boxes([("R1", a), ("R2", b), ("R3", far)])
    assert fused == [(11.0, 11.0, 51.0, 51.0)]  # far box: one reader only, dropped
    assert fuse_reader_boxes([("R1", a), ("R1", b)]) == []  # one reader never confirms itself
    assert len(fuse_reader_boxes([("R1", a), ("R2", far)], min_readers=1)) == 2


def _vindr(root: Path) -> None:
    for split, ids in (("train", ["img1", "img2"]), ("test", ["img3"])):
        for i in ids:
            _png(root / split / f"{i}.png")
    (root / "annotations").mkdir()
    (root / "annotations" / "annotations_train.csv").write_text(
        "image_id,rad_id,class_name,x_min,y_min,x_max,y_max\n"
        "img1,R1,Cardiomegaly,100,200,300,400\n"
        "img1,R2,Cardiomegaly,110,210,310,410\n"
        "img1,R3,Nodule/Mass,5,5,15,15\n"
        "img2,R1,No finding,,,,\n"
        "img2,R2,No finding,,,,\n"
    )
    (root / "annotations" / "annotations_test.csv").write_text(
        "image_id,class_name,x_min,y_min,x_max,y_max\nimg3,Pleural effusion,1,2,3,4\n"
    )


def test_vindr(tmp_path: Path) -> None:
    _vindr(tmp_path)
    recs = {r.id: r for r in read_vindr(tmp_path)}
    assert set(recs) == {"img1", "img2", "img3"}
    assert [b.class_name for b in recs["img1"].boxes] == ["Cardiomegaly"]
    assert recs["img1"].boxes[0].box == (105.0, 205.0, 305.0, 405.0)
    assert recs["img2"].boxes == ()
    assert recs["img3"].split == "test" and recs["img3"].boxes[0].box == (1.0, 2.0, 3.0, 4.0)


def test_vindr_errors(tmp_path: Path) -> None:
    _vindr(tmp_path)
    (tmp_path / "train" / "img2.png").unlink()
    (tmp_path / "annotations" / "annotations_test.csv").unlink()
    with open(tmp_path / "annotations" / "annotations_train.csv", "a") as f:
        f.write("img1,R1,Cardiomegaly,abc,1,2,3\n")
    with pytest.raises(DatasetError) as err:
        read_vindr(tmp_path)
    text = str(err.value)
    assert "img2" in text and "annotations_test.csv: missing" in text and "line 7" in text


_IU = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="FINDINGS">The heart is normal in size. The lungs are clear.</AbstractText>
<AbstractText Label="IMPRESSION">No acute disease.</AbstractText>
</Abstract></Article></MedlineCitation>
<parentImage id="CXR1_1_IM-0001-3001"><url>x</url></parentImage>
<parentImage id="CXR1_1_IM-0001-4001"><url>y</url></parentImage>
</eCitation>"""


def test_iu_xray(tmp_path: Path) -> None:
    reports = tmp_path / "ecgen-radiology"
    reports.mkdir()
    (reports / "1.xml").write_text(_IU)
    for i in ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"):
        _png(tmp_path / "images" / f"{i}.png")
    recs = read_iu_xray(reports, tmp_path / "images")
    assert len(recs) == 2 and recs[0].impression == "No acute disease."
    assert recs[0].findings.startswith("The heart")
    (reports / "2.xml").write_text("<eCitation><broken")
    (tmp_path / "images" / "CXR1_1_IM-0001-4001.png").unlink()
    with pytest.raises(DatasetError) as err:
        read_iu_xray(reports, tmp_path / "images")
    assert "2.xml: malformed XML" in str(err.value) and "4001.png: missing" in str(err.value)


def test_config_names_paths(tmp_path: Path) -> None:
    _vindr(tmp_path / "vindr")
    ann = _mimic(tmp_path / "mimic", with_boxes=True)
    cfg = tmp_path / "datasets.json"
    cfg.write_text(
        json.dumps(
            {
                "datasets": [
                    {"kind": "vindr-cxr", "root": "vindr"},
                    {"kind": "mimic-cxr", "annotation": str(ann), "image_root": "mimic"},
                ]
            }
        )
    )
    recs = load_datasets(cfg)
    assert {r.dataset for r in recs} == {"vindr-cxr", "mimic-cxr"} and len(recs) == 5
    cfg.write_text(json.dumps({"datasets": [{"kind": "vindr-cxr"}, {"kind": "nope"}]}))
    with pytest.raises(DatasetError) as err:
        load_datasets(cfg)
    assert len(err.value.problems) == 2
