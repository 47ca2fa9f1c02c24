"""``d2r feedback export``: phantom studies in a real spool and study database, their drafts'
TID 1500 SRs built by the report builder, signed reports received as the RIS sends them; the
export read back by the trainers' own readers, and (``integration``) ``d2r train`` and ``d2r
train-detector`` run on it through the CLI."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

from dicom_node.spool import Spool, dataset_offset
from feedback.export import (
    EXPORTED,
    SKIPPED,
    export_training_set,
    read_draft_boxes,
    split_of,
    split_sections,
)
from feedback.match import receive
from feedback.oru import read_oru
from report.build import AlgorithmInfo, LesionFinding, ReportContent, RoiEncoding, build_reports
from report.codes import FINDING_CODES
from studydb.records import InstanceRecord
from studydb.store import StudyStore
from tests.support.processes import base_env, run_d2r
from tests.support.signed_reports import oru
from training.phantom_output import PhantomConfig, generate
from training.train import read_records

CLASSES = {(c.finding.scheme_designator, c.finding.value): n for n, c in FINDING_CODES.items()}
#: the phantom's studies (seed 7), by their order in studies.jsonl
STUDIES = 8
RETAINED_GONE = 5  # its files removed by the spool's retention
ABSTAINED = 6  # the model abstained: exported without boxes
NO_FRONTAL = 7  # only a lateral view: skipped


@dataclass
class Site:
    """A node's study database and spool, with what the test put in them."""

    url: str
    spool: Path
    studies: list[dict[str, object]] = field(default_factory=list)
    #: study UID -> the draft's boxes (class, xyxy)
    boxes: dict[str, list[tuple[str, tuple[float, ...]]]] = field(default_factory=dict)


def _spool_instance(store: StudyStore, spool: Spool, path: Path, view: str) -> InstanceRecord:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    raw = path.read_bytes()
    spooled = spool.store(
        study_instance_uid=str(ds.StudyInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        file_meta=ds.file_meta,
        dataset=raw[dataset_offset(raw[:144]) :],
    )
    record = InstanceRecord(
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        modality=str(ds.Modality),
        body_part_examined="CHEST",
        view_position=view,
        series_description="",
        path=str(spooled.path),
        size=spooled.size,
        sha256=spooled.sha256,
        calling_ae_title="MODALITY",
        received_at=datetime.now(UTC),
    )
    store.record_instance(record, outcome="stored")
    return record


def _report(store: StudyStore, spool: Spool, entry: dict[str, object], header: object) -> list[str]:
    """The worker's part: a claimed study reported with its TID 1500 and text SRs."""
    uid = str(entry["study_instance_uid"])
    abstained = entry["index"] == ABSTAINED
    lesions = (
        []
        if abstained
        else [LesionFinding(le["class_name"], 0.75, tuple(le["box"])) for le in entry["gt_lesions"]]  # type: ignore[attr-defined]
    )
    reports = build_reports(
        ReportContent(
            str(entry["findings"]),
            str(entry["impression"]),
            lesions,
            header,  # type: ignore[arg-type]
            [header],  # type: ignore[list-item]
            abstain_reason="input gate" if abstained else None,
        ),
        AlgorithmInfo("d2r-net-test", "1.0"),
        roi_encoding=RoiEncoding.TID1501 if entry["index"] == 1 else RoiEncoding.TID1410,
    )
    paths = []
    for n, ds in enumerate(reports):
        path = spool.root / "results" / uid / f"sr{n}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    generation = store.mark_queued(uid)
    assert store.claim(uid, generation=generation, owner="w", lease_seconds=60)
    assert store.mark_reported(
        uid,
        owner="w",
        result_paths=paths,
        model_name="d2r-net-test",
        model_version="1.0",
        findings="" if abstained else str(entry["findings"]),
        impression="" if abstained else str(entry["impression"]),
        lesion_count=len(lesions),
        destinations=[],
        outcome="abstained: input gate" if abstained else None,
    )
    return paths


def build_site(root: Path) -> Site:
    """Phantom studies received, reported and signed; see the constants above."""
    phantom = root / "phantom"
    generate(
        PhantomConfig(studies=STUDIES, seed=7, size=64, dicom_size=256, normal_fraction=0.25),
        phantom,
    )
    site = Site(f"sqlite:///{root / 'd2r.db'}", root / "spool")
    store = StudyStore(site.url)
    spool = Spool(site.spool, min_free_bytes=0)
    try:
        lines = (phantom / "studies.jsonl").read_text().splitlines()
        for index, entry in enumerate(json.loads(line) for line in lines):
            entry["index"] = index
            path = phantom / entry["dicom"][0]
            record = _spool_instance(store, spool, path, "LL" if index == NO_FRONTAL else "PA")
            uid = record.study_instance_uid
            header = pydicom.dcmread(path, stop_before_pixels=True)
            results = _report(store, spool, entry, header)
            signed = f"FINDINGS: {entry['findings']}\nIMPRESSION: {entry['impression']}"
            receive(store, read_oru(oru(signed, control_id=f"M{index}", study_uid=uid)))
            if index == RETAINED_GONE:
                spool.remove_study_files(uid, [record.path, *results])
            site.studies.append(entry)
            if index not in (ABSTAINED, NO_FRONTAL):
                site.boxes[uid] = [
                    (le["class_name"], tuple(le["box"])) for le in entry["gt_lesions"]
                ]
    finally:
        store.close()
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return build_site(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def exported(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("export") / "site-export"
    store = StudyStore(site.url)
    try:
        export_training_set(store, out, finding_classes=CLASSES, now=0.0)
    finally:
        store.close()
    yield out


# ------------------------------------------------------------------------------ pure parts


def test_splits_follow_the_uid_alone_about_80_10_10() -> None:
    uids = [f"1.2.826.0.1.{n}" for n in range(2000)]
    splits = [split_of(u) for u in uids]
    assert splits == [split_of(u) for u in uids]
    shares = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert 0.75 < shares["train"] < 0.85 and 0.07 < shares["val"] < 0.13
    assert 0.07 < shares["test"] < 0.13


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FINDINGS: Small effusion.\nIMPRESSION: Effusion.", ("Small effusion.", "Effusion.")),
        (
            "Clinical history: cough.\nFindings - Clear.\n\nConclusion: Normal.",
            ("Clear.", "Normal."),
        ),
        ("IMPRESSION: Normal chest.", ("", "Normal chest.")),
        ("No acute findings: heart normal.", ("No acute findings: heart normal.", "")),
    ],
)
def test_report_sections(text: str, expected: tuple[str, str]) -> None:
    assert split_sections(text) == expected


# ------------------------------------------------------------------------------ SR boxes


def test_boxes_are_read_back_from_either_sr_encoding(site: Site) -> None:
    store = StudyStore(site.url)
    try:
        for index in (0, 1):  # study 1 was written with D2R_SR_ROI_ENCODING=tid1501
            entry = site.studies[index]
            view = store.get(str(entry["study_instance_uid"]))
            assert view is not None
            read = read_draft_boxes(view.result_paths, CLASSES)
            assert read.note == ""
            assert [(b.class_name, b.box) for b in read.boxes] == site.boxes[
                view.study_instance_uid
            ]
            assert {b.score for b in read.boxes} <= {0.75}
            assert {b.sop_instance_uid for b in read.boxes} <= {entry["sop_instance_uid"]}
            unknown = read_draft_boxes(view.result_paths, {})
            if read.boxes:
                assert unknown.boxes == () and "unknown finding" in unknown.note
        assert "highdicom" in read_draft_boxes(["/nonexistent/sr.dcm"], None).note
        assert "no longer in the spool" in read_draft_boxes(["/nonexistent/sr.dcm"], CLASSES).note
    finally:
        store.close()


# ------------------------------------------------------------------------------ the export


def test_the_export_lists_every_study_and_copies_what_the_spool_still_holds(
    site: Site, exported: Path
) -> None:
    manifest = json.loads((exported / "manifest.json").read_text())
    by_uid = {s["study_instance_uid"]: s for s in manifest["studies"]}
    assert len(by_uid) == STUDIES
    uid = {i: str(e["study_instance_uid"]) for i, e in enumerate(site.studies)}
    gone, no_frontal = by_uid[uid[RETAINED_GONE]], by_uid[uid[NO_FRONTAL]]
    assert (gone["status"], gone["files"]) == (SKIPPED, [])
    assert "D2R_SPOOL_RETENTION_HOURS" in gone["reason"]
    assert (no_frontal["status"], no_frontal["reason"]) == (
        SKIPPED,
        "no frontal chest image among the study's instances",
    )
    abstained = by_uid[uid[ABSTAINED]]
    assert (abstained["status"], abstained["abstained"], abstained["boxes"]) == (EXPORTED, True, 0)
    exported_uids = {u for u, s in by_uid.items() if s["status"] == EXPORTED}
    assert len(exported_uids) == STUDIES - 2
    counts = manifest["counts"]
    assert counts["studies"] == STUDIES and counts["skipped"] == 2
    assert counts["train"] + counts["val"] + counts["test"] == STUDIES - 2
    assert counts["boxes"] == sum(len(b) for u, b in site.boxes.items() if u in exported_uids)
    for u in exported_uids:
        assert by_uid[u]["split"] == split_of(u)
        assert by_uid[u]["version"] == 1 and by_uid[u]["received_at"] > 0
        (image,) = by_uid[u]["files"]
        copied = pydicom.dcmread(exported / image)
        assert copied.StudyInstanceUID == u and copied.pixel_array.shape == (256, 256)
    # every current signed report is in d2r evaluate's input, image or not
    records = [json.loads(line) for line in (exported / "signed_reports.jsonl").open()]
    assert {r["id"] for r in records} == set(by_uid)
    assert all(r["reference"].startswith("FINDINGS: ") for r in records)
    assert {r["id"]: r["generated"] for r in records}[uid[ABSTAINED]] == ""


def test_the_trainers_reader_takes_the_export_with_the_reference_and_weak_boxes(
    site: Site, exported: Path
) -> None:
    records = {r.id: r for r in read_records(exported / "datasets.json")}
    manifest = json.loads((exported / "manifest.json").read_text())
    assert set(records) == {s["study_instance_uid"] for s in manifest["studies"] if s["files"]}
    for entry in site.studies:
        uid = str(entry["study_instance_uid"])
        if uid not in records:
            continue
        record = records[uid]
        assert (record.findings, record.impression) == (entry["findings"], entry["impression"])
        assert record.split == split_of(uid) and record.dataset == "r2gen" and record.is_dicom
        expected = site.boxes.get(uid, [])
        assert [(b.class_name, b.box) for b in record.boxes] == expected
    annotation = json.loads((exported / "annotation.json").read_text())
    entries = [e for split in annotation.values() for e in split]
    drafted = next(e for e in entries if e["draft_findings"])
    assert drafted["box_source"] == "draft" and drafted["width"] == drafted["height"] == 256
    lines = [json.loads(line) for line in (exported / "studies.jsonl").open()]
    assert {line["id"] for line in lines} == set(records)
    assert all(
        line["gt_lesions"] == [] and line["dicom"][0].startswith("images/") for line in lines
    )


def test_the_export_is_kept_private(exported: Path) -> None:
    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(exported) == 0o700
    files = [p for p in exported.rglob("*") if p.is_file()]
    assert len(files) > 5 and {mode(p) for p in files} == {0o600}
    assert {mode(p) for p in exported.rglob("*") if p.is_dir()} == {0o700}


# ------------------------------------------------------------------------------ the CLI


def _cli(*args: str, env: dict[str, str], timeout: float = 300) -> str:
    res = run_d2r(*args, env=env, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_the_cli_export_trains_one_epoch_with_d2r_train_and_d2r_train_detector(
    site: Site, tmp_path: Path
) -> None:
    env = base_env(D2R_DATABASE_URL=site.url, D2R_SPOOL_DIR=str(site.spool))
    out = tmp_path / "export"
    said = _cli("feedback", "export", "--out", str(out), env=env)
    assert f"exported {STUDIES - 2} of {STUDIES} studies" in said and "Patient data" in said
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"] >= 1

    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"model": {"image_size": 128, "max_tokens": 40}}))
    run = tmp_path / "run"
    _cli(
        "train", "--data", str(out / "datasets.json"), "--config", str(tiny), "--out", str(run),
        "--epochs", "1", "--batch-size", "2", "--min-frequency", "1", "--val-beam-size", "1",
        "--max-val", "1", "--device", "cpu", "--no-progress",
        env=env,
    )  # fmt: skip
    resolved = json.loads((run / "config.resolved.json").read_text())
    assert resolved["train"]["data"] == str(out / "datasets.json")
    model = json.loads((run / "model" / "model.json").read_text())
    assert (
        "r2gen (" in model["training_data"]
        and f"{manifest['counts']['boxes']} boxes" in (model["training_data"])
    )

    det = tmp_path / "detector"
    _cli(
        "train-detector", "--data", str(out / "datasets.json"), "--out", str(det),
        "--burn-in-steps", "1", "--batch-size", "2", "--min-frequency", "1",
        env=env,
    )  # fmt: skip
    assert (det / "detector_metrics.csv").read_text().count("\n") >= 2
