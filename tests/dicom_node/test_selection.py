"""Image selection rules for the model."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from itertools import count

import pytest

from dicom_node.selection import (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    SECONDARY_CAPTURE,
    select_images,
)
from studydb.records import InstanceRecord

_seq = count(1)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def rec(**kw: object) -> InstanceRecord:
    n = next(_seq)
    base = InstanceRecord(
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.1",
        sop_instance_uid=f"1.2.3.1.{n}",
        sop_class_uid=DX_FOR_PRESENTATION,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="DX",
        body_part_examined="CHEST",
        view_position="PA",
        series_description="",
        path=f"/spool/{n}.dcm",
        size=1,
        sha256="0" * 64,
        calling_ae_title="MOD",
        received_at=T0 + timedelta(seconds=n),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_pa_preferred_over_ap_and_lateral_dropped() -> None:
    ap, pa, lat = rec(view_position="AP"), rec(view_position="PA"), rec(view_position="LL")
    sel = select_images([lat, ap, pa])
    assert sel.images == (pa,)
    assert sel.skip_reason is None and not sel.skipped


def test_ap_used_without_pa_and_empty_view_last() -> None:
    empty, ap = rec(view_position=""), rec(view_position="AP")
    assert select_images([empty, ap]).images == (ap,)
    assert select_images([empty]).images == (empty,)


def test_lateral_only_is_skipped() -> None:
    sel = select_images(
        [rec(view_position="LL"), rec(view_position="RL"), rec(view_position="LATERAL")]
    )
    assert sel.images == ()
    assert sel.skip_reason == "lateral views only"


def test_oblique_only_names_view() -> None:
    sel = select_images([rec(view_position="LLO")])
    assert sel.skip_reason == "no frontal view: view position LLO"


def test_modality_ct_skipped() -> None:
    sel = select_images([rec(modality="CT", sop_class_uid=SECONDARY_CAPTURE)])
    assert sel.skip_reason == "no chest radiograph: modality CT"


def test_unsupported_sop_class_skipped() -> None:
    sel = select_images([rec(sop_class_uid="1.2.840.10008.5.1.4.1.1.2", modality="CT")])
    assert sel.skip_reason == "no chest radiograph: SOP class 1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize("part", ["CHEST", "Thorax", "lung", "CHEST_PA", ""])
def test_chest_like_and_empty_body_part_accepted(part: str) -> None:
    r = rec(body_part_examined=part)
    assert select_images([r]).images == (r,)


def test_other_body_part_skipped() -> None:
    sel = select_images([rec(body_part_examined="KNEE"), rec(body_part_examined="HAND")])
    assert sel.skip_reason == "no chest radiograph: body part HAND, KNEE"


def test_secondary_capture_needs_cr_or_dx_modality() -> None:
    sc_ot = rec(sop_class_uid=SECONDARY_CAPTURE, modality="OT")
    assert select_images([sc_ot]).skip_reason == "no chest radiograph: modality OT"
    sc_cr = rec(sop_class_uid=SECONDARY_CAPTURE, modality="CR")
    assert select_images([sc_cr]).images == (sc_cr,)


def test_sop_class_tiers_within_a_view() -> None:
    proc = rec(sop_class_uid=DX_FOR_PROCESSING)
    pres = rec(sop_class_uid=DX_FOR_PRESENTATION)
    cr = rec(sop_class_uid=CR_IMAGE_STORAGE, modality="CR")
    sc = rec(sop_class_uid=SECONDARY_CAPTURE, modality="DX")
    assert select_images([sc, proc, cr, pres]).images == (pres, cr)  # by reception time
    assert select_images([sc, proc]).images == (proc,)


def test_order_is_deterministic() -> None:
    a, b = rec(), rec()
    assert select_images([b, a]).images == select_images([a, b]).images == (a, b)


def test_empty_study() -> None:
    assert select_images([]).skip_reason == "no instances"
