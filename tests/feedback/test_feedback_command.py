"""``d2r feedback``: the text tables, the options and the export of studies without images,
without the labeler."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cli.commands.feedback import add_arguments, parse_since, render
from feedback.export import SKIPPED, export_training_set
from feedback.match import receive
from feedback.oru import read_oru
from feedback.scoring import Scored, summarise, summarise_by_day
from studydb.store import StudyStore
from tests.support.signed_reports import add_study, oru, set_draft


def test_the_table_names_every_observation_and_leaves_undefined_ratios_blank() -> None:
    text = render(summarise([Scored(False, {"Edema": 1}, {"Edema": 1})]))
    assert "studies scored: 1" in text and "agreement rate: 1.000" in text
    edema = next(line for line in text.splitlines() if line.startswith("Edema"))
    assert edema.split() == ["Edema", "1", "0", "0", "0", "1.000", "1.000"]
    fracture = next(line for line in text.splitlines() if line.startswith("Fracture"))
    assert fracture.split()[-2:] == ["-", "-"]


def test_the_text_report_has_a_line_per_day() -> None:
    summary, days = summarise_by_day(
        [
            Scored(False, {"Edema": 1}, {"Edema": 1}, received_at=0.0),
            Scored(True, {}, {}, received_at=86400.0 + 1),
            Scored(False, {"Edema": 1}, {}, received_at=86400.0 + 2),
        ],
        observations=("Edema",),
    )
    lines = render(summary, days).splitlines()
    assert ["1970-01-01", "1", "0", "0.000", "1.000"] in [line.split() for line in lines]
    assert ["1970-01-02", "2", "1", "0.500", "0.000"] in [line.split() for line in lines]


def test_format_takes_text_json_and_html_and_json_is_its_alias() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["report"]).format == "text"
    assert parser.parse_args(["report", "--json"]).format == "json"
    html = parser.parse_args(["report", "--format", "html", "--out", "r.html"])
    assert (html.format, html.out) == ("html", "r.html")
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--format", "pdf"])


def test_since_is_utc_unless_it_names_a_zone() -> None:
    assert parse_since("1970-01-02") == 86400.0
    assert parse_since("1970-01-02T00:00:00+01:00") == 82800.0
    assert parse_since(None) is None
    with pytest.raises(SystemExit, match="not an ISO 8601 date"):
        parse_since("yesterday")


def test_the_export_pairs_each_current_signed_report_with_its_draft(tmp_path: Path) -> None:
    store = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    try:
        for uid, draft in (("1.4.1", "Cardiomegaly."), ("1.4.2", "")):
            add_study(store, uid, accession=uid)
            set_draft(store, uid, draft, "Impression.", abstained="" if draft else "input gate")
            receive(store, read_oru(oru("Signed " + uid, control_id=uid, accession=uid)))
        add_study(store, "1.4.3", accession="1.4.3")  # no draft: not exported
        receive(store, read_oru(oru("Signed", control_id="x", accession="1.4.3")))
        manifest = export_training_set(store, tmp_path / "out")
    finally:
        store.close()
    lines = (tmp_path / "out" / "signed_reports.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["id"], r["reference"], r["generated"], r["abstained"]) for r in records] == [
        ("1.4.1", "Signed 1.4.1", "Cardiomegaly.\nImpression.", False),
        ("1.4.2", "Signed 1.4.2", "", True),
    ]
    # their images (recorded under /spool/) are not there: listed, not exported
    assert [(s["study_instance_uid"], s["status"]) for s in manifest["studies"]] == [
        ("1.4.1", SKIPPED),
        ("1.4.2", SKIPPED),
    ]
    assert all("D2R_SPOOL_RETENTION_HOURS" in s["reason"] for s in manifest["studies"])
    assert json.loads((tmp_path / "out" / "annotation.json").read_text()) == {
        "train": [],
        "val": [],
        "test": [],
    }
