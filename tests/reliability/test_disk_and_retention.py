"""The free-space guard recovers by itself; spool retention removes only finished studies."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from d2r_core import statuses
from d2r_core.errors import ConfigError
from dicom_node.assembler import Assembler, AssemblerConfig
from dicom_node.settings import NodeSettings
from dicom_node.spool import Spool
from studydb.records import SPOOL_PURGED, InstanceRecord
from studydb.store import StudyStore
from tests.security.listener import running_listener, store_statuses, storescu
from tests.support.dicom_files import make_dx

GUARD = 1 << 20  # 1 MiB


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs: the spool can really run out of space."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.integration
def test_full_disk_refuses_then_accepts_again_once_space_returns(
    small_fs: Path, tmp_path: Path
) -> None:
    files = tmp_path / "files"
    files.mkdir()
    images = [make_dx(files / f"{n}.dcm", rows=64, cols=64, seed=n) for n in range(3)]
    paths = sorted(files.iterdir())
    with running_listener(
        tmp_path, D2R_SPOOL_DIR=str(small_fs / "spool"), D2R_MIN_FREE_BYTES=str(GUARD)
    ) as node:
        res = storescu(node.port, paths[0])
        assert store_statuses(res) == [statuses.SUCCESS]

        ballast = small_fs / "ballast"
        free = shutil.disk_usage(small_fs).free
        ballast.write_bytes(b"\0" * (free - GUARD // 2))  # now below the guard
        res = storescu(node.port, paths[1])
        assert store_statuses(res) == [statuses.OUT_OF_RESOURCES]
        assert node.store.instances(images[1].StudyInstanceUID) == []
        assert not list(node.spool.tmp_dir.iterdir())
        reasons = [r["reason"] for r in node.store.rejections()]
        assert len(reasons) == 1 and reasons[0].startswith("out of resources")

        ballast.unlink()  # an operator frees space: no restart needed
        res = storescu(node.port, paths[1], paths[2])
        assert store_statuses(res) == [statuses.SUCCESS, statuses.SUCCESS]
        for ds in images:
            (record,) = node.store.instances(ds.StudyInstanceUID)
            assert Path(record.path).is_file()


def test_retention_setting() -> None:
    assert NodeSettings().spool_retention_hours == 72.0
    assert NodeSettings.from_env({"D2R_SPOOL_RETENTION_HOURS": "0"}).spool_retention_hours == 0
    with pytest.raises(ConfigError, match="D2R_SPOOL_RETENTION_HOURS"):
        NodeSettings.from_env({"D2R_SPOOL_RETENTION_HOURS": "-1"})


def _receive(store: StudyStore, spool: Spool, study: str, sop: str, at: float) -> InstanceRecord:
    ds = make_dx(None, study_uid=study, sop_uid=sop, rows=16, cols=16)
    data = ds.PixelData  # any bytes do: the spool never parses them
    spooled = spool.store(
        study_instance_uid=study, sop_instance_uid=sop, file_meta=ds.file_meta, dataset=data
    )
    record = InstanceRecord(
        study_instance_uid=study,
        series_instance_uid=f"{study}.1",
        sop_instance_uid=sop,
        sop_class_uid=str(ds.SOPClassUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        modality="DX",
        body_part_examined="CHEST",
        view_position="PA",
        series_description="",
        path=str(spooled.path),
        size=spooled.size,
        sha256=spooled.sha256,
        calling_ae_title="MODALITY",
        received_at=datetime.fromtimestamp(at, UTC),
    )
    store.record_instance(record, outcome="stored")
    return record


def _report(store: StudyStore, spool: Spool, study: str) -> Path:
    generation = store.mark_queued(study)
    assert store.claim(study, generation=generation, owner="t", lease_seconds=60)
    sr = spool.root / "results" / study / "sr.dcm"
    sr.parent.mkdir(parents=True)
    sr.write_bytes(b"SR")
    assert store.mark_reported(
        study,
        owner="t",
        result_paths=[str(sr)],
        model_name="m",
        model_version="1",
        findings="",
        impression="",
        lesion_count=0,
        destinations=[],
    )
    return sr


def test_retention_removes_only_finished_studies(tmp_path: Path) -> None:
    store = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    spool = Spool(tmp_path / "spool")
    now = time.time()
    done = [_receive(store, spool, "1.1", "1.1.1", now - 5)]
    sr = _report(store, spool, "1.1")
    skipped = [_receive(store, spool, "1.2", "1.2.1", now - 5)]
    store.mark_skipped("1.2", "lateral only")
    failed = [_receive(store, spool, "1.3", "1.3.1", now - 5)]
    generation = store.mark_queued("1.3")
    assert store.claim("1.3", generation=generation, owner="t", lease_seconds=60)
    store.mark_failed("1.3", "model error", owner="t")
    processing = [_receive(store, spool, "1.4", "1.4.1", now - 5)]
    assert store.claim("1.4", generation=store.mark_queued("1.4"), owner="t", lease_seconds=60)
    receiving = [_receive(store, spool, "1.5", "1.5.1", now - 5)]
    conflict_dir = spool.conflicts_dir / "1.1"
    conflict_dir.mkdir()
    (conflict_dir / "1.1.1.abc.dcm").write_bytes(b"other copy")

    assembler = Assembler(
        store,
        AssemblerConfig(retention_seconds=3600.0),
        enqueue_report=lambda *a: None,
        enqueue_send=lambda *a: None,
        spool=spool,
    )
    assert assembler.purge_expired(now) == []  # nothing is old enough yet
    later = now + 3601.0
    assert sorted(assembler.purge_expired(later)) == ["1.1", "1.2"]
    for record in done + skipped:
        assert not Path(record.path).exists()
    assert not sr.exists() and not sr.parent.exists()
    assert not conflict_dir.exists()
    assert not (spool.instances_dir / "1.1").exists()
    for record in failed + processing + receiving:
        assert Path(record.path).is_file()
    (event,) = [e for e in store.events("1.1") if e.kind == SPOOL_PURGED]
    assert "removed 3 file(s)" in event.detail
    kept = store.get("1.1")
    assert kept is not None and kept.state == "done"  # the record stays
    assert assembler.purge_expired(later + 10) == []  # once only

    # retention 0 keeps everything for ever
    keep = Assembler(
        store,
        AssemblerConfig(retention_seconds=0.0),
        enqueue_report=lambda *a: None,
        enqueue_send=lambda *a: None,
        spool=spool,
    )
    assert keep.purge_expired(later + 10**9) == []
    assert Path(failed[0].path).is_file()
    store.close()


def test_retention_never_leaves_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(b"keep me")
    inside = spool.instances_dir / "9" / "9.1.dcm"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"x" * 10)
    link = spool.instances_dir / "9" / "link.dcm"
    os.symlink(outside, link)
    assert spool.remove_study_files("9", [inside, outside, link]) == (1, 10)
    assert outside.read_bytes() == b"keep me"
