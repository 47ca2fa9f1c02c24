"""Real-world header variants, every one through the whole round trip on one stack.

Orthanc (the PACS) holds the corpus of ``tests.support.header_variants`` (real RG1 pixels and the
phantom) and C-STOREs each study to ``d2r node``; a real Celery worker runs D2R-Net; every output
(``D2R_OUTPUTS=tid1500,text,gsps,sc``: both SRs, the presentation state, the overlay image) goes
back to Orthanc, into the study. Every study must end, within a bounded time, in ``done`` with
objects that pass ``dciodvfy`` (and SRs the template check) and reference the chosen image with
its real SOP class, or in the recorded skip its variant expects, with a reason naming the cause.
Nothing may stay receiving, queued, processing or sending. The test prints a table: variant,
final state, reason, seconds.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.reliability.stack import BASIC_TEXT_SR, COMPREHENSIVE_SR, Stack, make_stack
from tests.support.header_variants import Variant, build_corpus
from tests.support.sr_templates import check_sr, errors

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FINAL = {"done", "failed", "skipped"}
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
CSPS = "1.2.840.10008.5.1.4.1.1.11.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True)
    return [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]


def _send_through_orthanc(s: Stack, variant: Variant) -> None:
    assert s.orthanc is not None
    uploaded = [s.orthanc.upload(path) for path in variant.files]
    if variant.separate_associations:  # the study arrives in pieces, one association each
        for answer in uploaded:
            s.orthanc.store_to_modality("d2r", [answer["ID"]])
            time.sleep(0.3)
    else:
        s.orthanc.store_to_modality("d2r", [uploaded[0]["ParentStudy"]])


def _walk(ds: pydicom.Dataset):  # type: ignore[no-untyped-def]
    for item in getattr(ds, "ContentSequence", []):
        yield item
        yield from _walk(item)


def _check_reports(s: Stack, variant: Variant, tmp: Path) -> None:
    assert s.orthanc is not None
    instances = s.orthanc.find_instances(variant.study_uid)
    srs = [i for i in instances if i.get("Modality") == "SR"]
    assert sorted(i["SOPClassUID"] for i in srs) == sorted([COMPREHENSIVE_SR, BASIC_TEXT_SR])
    _check_images(s, variant, instances, tmp)
    sources = {
        str(ds.SOPInstanceUID): str(ds.SOPClassUID)
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in variant.files)
    }
    for inst in srs:
        path = tmp / f"{variant.name}-{inst['SOPInstanceUID']}.dcm"
        path.write_bytes(s.orthanc.instance_file(inst["ID"]))
        assert _dciodvfy_errors(path) == [], variant.name
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == variant.study_uid
        refs = [
            item.ReferencedSOPSequence[0] for item in _walk(ds) if "ReferencedSOPSequence" in item
        ]
        assert refs or inst["SOPClassUID"] == BASIC_TEXT_SR, variant.name
        for ref in refs:  # the image's real SOP class: what viewers match on
            assert sources[str(ref.ReferencedSOPInstanceUID)] == ref.ReferencedSOPClassUID
        assert errors(check_sr(ds)) == [], variant.name
        for keyword in variant.left_out:
            assert ds.get(keyword) in (None, ""), (variant.name, keyword)


def _check_images(s: Stack, variant: Variant, instances: list[Any], tmp: Path) -> None:
    """The presentation state and the overlay image (D2R_OUTPUTS=...,gsps,sc) are in the study,
    valid, each in its own series; invalid source values left out and recorded."""
    assert s.orthanc is not None
    pr = [i for i in instances if i.get("Modality") == "PR"]
    sc = [i for i in instances if i.get("SOPClassUID") == SECONDARY_CAPTURE]
    sc = [i for i in sc if i.get("Modality") == "OT"]
    assert [i["SOPClassUID"] for i in pr] in ([GSPS], [CSPS]), variant.name
    assert len(sc) == 1, (variant.name, instances)
    for inst in (*pr, *sc):
        path = tmp / f"{variant.name}-{inst['SOPInstanceUID']}.dcm"
        path.write_bytes(s.orthanc.instance_file(inst["ID"]))
        assert _dciodvfy_errors(path) == [], (variant.name, inst["Modality"])
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == variant.study_uid
        for keyword in variant.left_out:
            assert ds.get(keyword) in (None, ""), (variant.name, keyword)
    if variant.left_out:
        details = [e.detail for e in s.store.events(variant.study_uid)]
        assert any(all(kw in d for kw in variant.left_out) for d in details), details


def test_every_header_variant_ends_with_an_sr_or_a_recorded_reason(
    orthanc_factory: Any, model_dir: Path, tmp_path: Path
) -> None:
    corpus = build_corpus(tmp_path / "corpus")
    s = make_stack(
        orthanc_factory,
        model_dir,
        tmp_path,
        D2R_LESION_MIN_SCORE="0",
        D2R_OUTPUTS="tid1500,text,gsps,sc",
    )
    try:
        s.start_node()
        s.start_worker()
        started: dict[str, float] = {}
        for variant in corpus:
            started[variant.name] = time.monotonic()
            _send_through_orthanc(s, variant)
        ended: dict[str, float] = {}
        deadline = time.monotonic() + 300
        while len(ended) < len(corpus) and time.monotonic() < deadline:
            for variant in corpus:
                if variant.name not in ended and s.state(variant.study_uid) in FINAL:
                    ended[variant.name] = time.monotonic()
            time.sleep(0.25)

        rows = []
        for variant in corpus:
            view = s.view(variant.study_uid)
            state = None if view is None else view.state
            seconds = ended.get(variant.name, time.monotonic()) - started[variant.name]
            rows.append((variant.name, state, (view.reason if view else None) or "", seconds))
        print(f"\n{'VARIANT':<28} {'STATE':<9} {'SECONDS':>7}  REASON")
        for name, state, reason, seconds in rows:
            print(f"{name:<28} {state or '-':<9} {seconds:>7.1f}  {reason}")

        unfinished = {name: state for name, state, _, _ in rows if state not in FINAL}
        assert not unfinished, f"{unfinished}\n{s.logs()}"
        for variant, (_, state, reason, _) in zip(corpus, rows, strict=True):
            assert state == variant.expect, (variant.name, state, reason)
            if state == "done":
                _check_reports(s, variant, tmp_path)
            else:
                assert variant.reason and variant.reason in reason, (variant.name, reason)
        several = next(v for v in corpus if v.separate_associations)
        view = s.view(several.study_uid)
        assert view is not None and view.instance_count == len(several.files)
    finally:
        s.stop()
