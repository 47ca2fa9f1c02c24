"""``d2r feedback``: the text table, the date option and the export, without the labeler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.commands.feedback import export, parse_since, render
from feedback.match import receive
from feedback.oru import read_oru
from feedback.scoring import Scored, summarise
from studydb.store import StudyStore
from tests.support.signed_reports import add_study, oru, set_draft


def test_the_table_names_every_observation_and_leaves_undefined_ratios_blank() -> None:
    text = render(summarise([Scored(False, {"Edema": 1}, {"Edema": 1})]))
    assert "studies scored: 1" in text and "agreement rate: 1.000" in text
    edema = next(line for line in text.splitlines() if line.startswith("Edema"))
    assert edema.split() == ["Edema", "1", "0", "0", "0", "1.000", "1.000"]
    fracture = next(line for line in text.splitlines() if line.startswith("Fracture"))
    assert fracture.split()[-2:] == ["-", "-"]


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
        assert export(store, str(tmp_path / "out"), None) == 2
    finally:
        store.close()
    lines = (tmp_path / "out" / "signed_reports.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["id"], r["reference"], r["generated"], r["abstained"]) for r in records] == [
        ("1.4.1", "Signed 1.4.1", "Cardiomegaly.\nImpression.", False),
        ("1.4.2", "Signed 1.4.2", "", True),
    ]
