"""A study's priority: the rules setting, the decision from each source and their precedence,
the header elements, the C-STORE Priority on a real association, and the study database's
bookkeeping (the highest priority wins, the source is recorded)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE

from d2r_core.errors import ConfigError
from d2r_core.priority import Priority, PriorityDecision
from dicom_node.metadata import parse_header
from dicom_node.priority import (
    DIMSE_HIGH,
    DIMSE_LOW,
    DIMSE_MEDIUM,
    PriorityPolicy,
    decide_priority,
    parse_priority_rules,
)
from dicom_node.scp import start_server
from dicom_node.settings import NodeSettings
from dicom_node.spool import Spool
from studydb.records import InstanceRecord
from studydb.store import StudyStore
from tests.dicom_node.conftest import instance_row
from tests.dicom_node.node_harness import Recorder, free_port
from tests.support.dicom_files import make_dx

RULES = "ED_CR1,ICU_DX=stat; 10.2.0.0/16=urgent; called:D2R_LOW=low"
HEADER = "Requested Procedure Priority"
SEQUENCE = "Request Attributes Sequence priority"


# ------------------------------------------------------------------------- the rules setting
def test_rules_parse_calling_called_and_network_keys() -> None:
    rules = parse_priority_rules(RULES + "; calling:10X = routine; 2001:db8::/32=low")
    assert [(r.kind, str(r.value), r.priority) for r in rules] == [
        ("calling", "ED_CR1", Priority.STAT),
        ("calling", "ICU_DX", Priority.STAT),
        ("network", "10.2.0.0/16", Priority.URGENT),
        ("called", "D2R_LOW", Priority.LOW),
        ("calling", "10X", Priority.ROUTINE),
        ("network", "2001:db8::/32", Priority.LOW),
    ]
    assert parse_priority_rules("  ; ") == ()


@pytest.mark.parametrize(
    "text",
    [
        "ED_CR1",  # no priority
        "=stat",  # no key
        "ED,,ICU=stat",  # an empty key
        "ED=soon",  # not a priority
        "THIS_TITLE_IS_TOO_LONG=stat",  # longer than an AE title
        "called:=urgent",  # no title
    ],
)
def test_a_bad_rule_stops_the_start_naming_the_setting(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        NodeSettings.from_env({"D2R_PRIORITY_RULES": text})
    assert str(err.value).startswith("D2R_PRIORITY_RULES: ")
    assert "\n" not in str(err.value)


def test_settings_carry_the_rules_the_default_and_the_ageing() -> None:
    settings = NodeSettings.from_env(
        {
            "D2R_PRIORITY_RULES": RULES,
            "D2R_PRIORITY_DEFAULT": "LOW",
            "D2R_PRIORITY_AGING_SECONDS": "90",
        }
    )
    assert len(settings.priority.rules) == 4 and settings.priority.default == Priority.LOW
    assert settings.priority_aging_seconds == 90.0
    assert NodeSettings.from_env({}).priority == PriorityPolicy()
    with pytest.raises(ConfigError, match="^D2R_PRIORITY_DEFAULT: "):
        NodeSettings.from_env({"D2R_PRIORITY_DEFAULT": "asap"})


# ----------------------------------------------------------------------- each source alone
RULE_SET = parse_priority_rules(RULES)


@pytest.mark.parametrize(
    ("kwargs", "priority", "source"),
    [
        ({"calling_ae_title": "ICU_DX"}, Priority.STAT, "rule: calling AE ICU_DX"),
        ({"address": "10.2.9.9"}, Priority.URGENT, "rule: network 10.2.0.0/16"),
        ({"address": "::ffff:10.2.0.1"}, Priority.URGENT, "rule: network 10.2.0.0/16"),
        ({"called_ae_title": "D2R_LOW"}, Priority.LOW, "rule: called AE D2R_LOW"),
        (
            {"header_priorities": ((HEADER, "stat"),)},
            Priority.STAT,
            "Requested Procedure Priority STAT",
        ),
        ({"header_priorities": ((HEADER, "High"),)}, Priority.URGENT, f"{HEADER} HIGH"),
        ({"header_priorities": ((HEADER, "MEDIUM"),)}, Priority.ROUTINE, f"{HEADER} MEDIUM"),
        ({"header_priorities": ((SEQUENCE, "low"),)}, Priority.LOW, f"{SEQUENCE} LOW"),
        ({"dimse_priority": DIMSE_HIGH}, Priority.URGENT, "C-STORE Priority HIGH"),
        ({"dimse_priority": DIMSE_LOW}, Priority.LOW, "C-STORE Priority LOW"),
        ({"dimse_priority": DIMSE_MEDIUM}, Priority.ROUTINE, "default"),
        ({"dimse_priority": None}, Priority.ROUTINE, "default"),
        ({"calling_ae_title": "OTHER", "address": "192.168.1.1"}, Priority.ROUTINE, "default"),
    ],
)
def test_each_source_alone(kwargs: dict[str, Any], priority: Priority, source: str) -> None:
    decision = decide_priority(RULE_SET, **kwargs)
    assert (decision.priority, decision.source) == (priority, source)


def test_the_default_setting_speaks_last() -> None:
    assert decide_priority((), default=Priority.LOW) == PriorityDecision(Priority.LOW, "default")
    # C-STORE MEDIUM says nothing, so the default still speaks
    assert decide_priority((), dimse_priority=DIMSE_MEDIUM, default=Priority.URGENT).priority == (
        Priority.URGENT
    )


# ---------------------------------------------------------------------------- precedence
def test_a_rule_wins_over_the_header_and_the_dimse_priority() -> None:
    d = decide_priority(
        parse_priority_rules("SLOW_AE=low"),
        calling_ae_title="SLOW_AE",
        header_priorities=((HEADER, "STAT"),),
        dimse_priority=DIMSE_HIGH,
    )
    assert (d.priority, d.source) == (Priority.LOW, "rule: calling AE SLOW_AE")


def test_of_several_matching_rules_the_highest_wins() -> None:
    d = decide_priority(RULE_SET, calling_ae_title="ED_CR1", address="10.2.0.5")
    assert (d.priority, d.source) == (Priority.STAT, "rule: calling AE ED_CR1")


def test_the_header_wins_over_the_dimse_priority_and_its_highest_value_counts() -> None:
    d = decide_priority(
        (), header_priorities=((HEADER, "LOW"), (SEQUENCE, "HIGH")), dimse_priority=DIMSE_LOW
    )
    assert (d.priority, d.source) == (Priority.URGENT, f"{SEQUENCE} HIGH")


def test_an_unknown_header_value_is_ignored_with_a_sanitised_note() -> None:
    d = decide_priority(
        (),
        header_priorities=((HEADER, "ASAP\x1b[2J\nnext line and much more"),),
        dimse_priority=DIMSE_HIGH,
    )
    assert (d.priority, d.source) == (Priority.URGENT, "C-STORE Priority HIGH")
    (note,) = d.notes
    assert note.startswith(f"{HEADER} 'ASAP?[2J?next li...'") and note.endswith("; ignored")
    assert note.isprintable()


def test_stow_has_no_dimse_priority_so_network_rules_and_headers_apply() -> None:
    assert decide_priority(RULE_SET, calling_ae_title="STOW-RS", address="10.2.3.4").priority == (
        Priority.URGENT
    )
    d = decide_priority(
        RULE_SET,
        calling_ae_title="STOW-RS",
        address="127.0.0.1",
        header_priorities=((HEADER, "STAT"),),
    )
    assert d.priority == Priority.STAT


# ----------------------------------------------------------------------------- the header
def _encoded(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    dcmwrite(buf, ds, enforce_file_format=True)
    raw = buf.getvalue()
    meta_len = int.from_bytes(raw[140:144], "little")
    return raw[144 + meta_len :]


def test_the_header_names_its_requested_procedure_priorities() -> None:
    ds = make_dx(None)
    ds.RequestedProcedurePriority = "ROUTINE"
    item = Dataset()
    item.RequestedProcedureID = "RP1"
    item.RequestedProcedurePriority = "STAT"
    ds.RequestAttributesSequence = [item]
    header = parse_header(_encoded(ds), ExplicitVRLittleEndian)
    assert header.priorities == ((HEADER, "ROUTINE"), (SEQUENCE, "STAT"))
    assert parse_header(_encoded(make_dx(None)), ExplicitVRLittleEndian).priorities == ()


# ------------------------------------------------------------- the listener, end to end
@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[NodeSettings, Recorder]]:
    settings = NodeSettings.from_env(
        {
            "D2R_AE_TITLE": "D2RTEST",
            "D2R_HOST": "127.0.0.1",
            "D2R_PORT": str(free_port()),
            "D2R_SPOOL_DIR": str(tmp_path / "spool"),
            "D2R_MIN_FREE_BYTES": "0",
            "D2R_PRIORITY_RULES": "ED_CR1=stat",
        }
    )
    recorder = Recorder()
    spool = Spool(settings.spool_dir, min_free_bytes=0)
    server = start_server(settings, spool, recorder, block=False)
    assert server is not None
    try:
        yield settings, recorder
    finally:
        server.shutdown()


def _send(settings: NodeSettings, ds: Dataset, *, calling: str, priority: int) -> int:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds, priority=priority)
    finally:
        assoc.release()
    return int(status.Status)


@pytest.mark.integration
def test_the_listener_decides_from_the_rule_the_header_and_the_cstore_priority(
    listener: tuple[NodeSettings, Recorder],
) -> None:
    settings, recorder = listener
    by_rule, by_header, by_dimse, plain = (make_dx(None) for _ in range(4))
    by_header.RequestedProcedurePriority = "HIGH"
    assert _send(settings, by_rule, calling="ED_CR1", priority=DIMSE_LOW) == 0
    assert _send(settings, by_header, calling="CR2", priority=DIMSE_LOW) == 0
    assert _send(settings, by_dimse, calling="CR2", priority=DIMSE_HIGH) == 0
    assert _send(settings, plain, calling="CR2", priority=DIMSE_MEDIUM) == 0
    decided = {r.sop_instance_uid: r.priority for r, _ in recorder.instances}
    assert decided[by_rule.SOPInstanceUID] == PriorityDecision(
        Priority.STAT, "rule: calling AE ED_CR1"
    )
    assert decided[by_header.SOPInstanceUID] == PriorityDecision(Priority.URGENT, f"{HEADER} HIGH")
    assert decided[by_dimse.SOPInstanceUID] == PriorityDecision(
        Priority.URGENT, "C-STORE Priority HIGH"
    )
    assert decided[plain.SOPInstanceUID] == PriorityDecision(Priority.ROUTINE, "default")


# ---------------------------------------------------------------- the study database
def _with(
    priority: Priority, source: str, study: str, sop: str, t: float = 1000.0
) -> InstanceRecord:
    return replace(instance_row(study, sop, t=t), priority=PriorityDecision(priority, source))


def test_a_mixed_study_takes_its_highest_priority_and_records_the_source(
    store: StudyStore,
) -> None:
    store.record_instance(_with(Priority.ROUTINE, "default", "1.9", "1.9.1"), outcome="stored")
    assert store.get("1.9").priority == "routine"  # type: ignore[union-attr]
    store.record_instance(
        _with(Priority.URGENT, "C-STORE Priority HIGH", "1.9", "1.9.2"), outcome="stored"
    )
    # a lower priority later never lowers it
    store.record_instance(_with(Priority.LOW, "default", "1.9", "1.9.3"), outcome="stored")
    view = store.get("1.9")
    assert view is not None and view.priority == "urgent"
    details = [e.detail for e in store.events("1.9") if e.kind == "priority"]
    assert details == [
        "routine (default)",
        "raised from routine to urgent (C-STORE Priority HIGH) by instance 1.9.2",
    ]
    assert [i.priority.priority for i in store.instances("1.9") if i.priority] == [
        Priority.ROUTINE,
        Priority.URGENT,
        Priority.LOW,
    ]
    # an instance recorded without a decision (the spool check) leaves the study as it is
    store.record_instance(instance_row("1.9", "1.9.4"), outcome="stored")
    assert store.get("1.9").priority == "urgent"  # type: ignore[union-attr]


def test_an_operator_sets_the_priority_and_it_is_counted_by_priority(store: StudyStore) -> None:
    store.record_instance(instance_row("2.1", "2.1.1"), outcome="stored")
    store.record_instance(instance_row("2.2", "2.2.1"), outcome="stored")
    for uid in ("2.1", "2.2"):
        store.mark_queued(uid)
    assert store.set_priority("2.1", Priority.STAT, source="operator") == Priority.ROUTINE
    assert store.count_by_priority() == {"stat": 1, "urgent": 0, "routine": 1, "low": 0}
    assert store.priority_of("2.1") == Priority.STAT
    assert [e.detail for e in store.events("2.1") if e.kind == "priority"] == [
        "set from routine to stat (operator)"
    ]
    with pytest.raises(KeyError):
        store.set_priority("9.9", Priority.STAT, source="operator")


def test_an_urgent_study_completes_after_its_own_shorter_quiet_period(store: StudyStore) -> None:
    store.record_instance(_with(Priority.URGENT, "test", "3.1", "3.1.1"), outcome="stored")
    store.record_instance(_with(Priority.ROUTINE, "test", "3.2", "3.2.1"), outcome="stored")
    store.record_instance(_with(Priority.STAT, "test", "3.3", "3.3.1"), outcome="stored")

    def due(at: float, urgent: float | None) -> list[str]:
        return sorted(
            uid
            for uid, _ in store.completion_due(
                quiet_seconds=10, force_seconds=600, now=at, urgent_quiet_seconds=urgent
            )
        )

    assert due(1003, None) == []
    assert due(1003, 2) == ["3.1", "3.3"]
    assert due(1011, 2) == ["3.1", "3.2", "3.3"]
    assert NodeSettings.from_env({"D2R_URGENT_QUIET_SECONDS": "2"}).urgent_quiet_seconds == 2.0
    assert NodeSettings.from_env({}).urgent_quiet_seconds is None


def test_stow_rs_parts_take_the_network_rule_or_the_header(tmp_path: Path) -> None:
    from dicom_node.stow import StowReceiver

    recorder = Recorder()
    receiver = StowReceiver(
        Spool(tmp_path / "spool", min_free_bytes=0),
        recorder,
        priority=PriorityPolicy(parse_priority_rules("10.2.0.0/16=urgent")),
    )
    by_network, by_header = make_dx(None), make_dx(None)
    by_header.RequestedProcedurePriority = "STAT"
    for ds, client in ((by_network, "10.2.3.4"), (by_header, "127.0.0.1")):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        body = (
            b"--B0UNDARY\r\nContent-Type: application/dicom\r\n\r\n"
            + buf.getvalue()
            + b"\r\n--B0UNDARY--\r\n"
        )
        headers = {
            "content-type": 'multipart/related; type="application/dicom"; boundary=B0UNDARY',
            "content-length": str(len(body)),
        }
        status, _, _ = receiver(
            "POST", "/dicom-web/studies", headers, io.BytesIO(body), client, "u"
        )
        assert status == 200
    decided = {r.sop_instance_uid: r.priority for r, _ in recorder.instances}
    assert decided[by_network.SOPInstanceUID] == PriorityDecision(
        Priority.URGENT, "rule: network 10.2.0.0/16"
    )
    assert decided[by_header.SOPInstanceUID] == PriorityDecision(Priority.STAT, f"{HEADER} STAT")


def test_the_examples_in_the_docstrings_run() -> None:
    import doctest

    import dicom_node.priority
    import worker.messages

    for module in (dicom_node.priority, worker.messages):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
