"""Spool: atomic, byte-preserving writes; duplicate and conflict policy; full disk."""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom.dsutils import create_file_meta

from dicom_node.assembler import Assembler, AssemblerConfig
from dicom_node.errors import SpoolFullError, SpoolWriteError
from dicom_node.spool import (
    ORPHAN_TMP_SECONDS,
    STALE_TMP_SECONDS,
    Spool,
    dataset_offset,
    owner_tag,
    printable,
    printable_uid,
    safe_name,
)
from studydb.store import StudyStore

SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"


def meta(sop_uid: str) -> pydicom.dataset.FileMetaDataset:
    return create_file_meta(
        sop_class_uid=UID(SOP_CLASS),
        sop_instance_uid=UID(sop_uid),
        transfer_syntax=ExplicitVRLittleEndian,
    )


def payload(n: int = 4096, fill: int = 7) -> bytes:
    # a minimal, valid Explicit VR LE data set followed by filler in an OB element
    body = bytes([fill]) * n
    return (
        b"\x08\x00\x16\x00UI\x1c\x00"
        + SOP_CLASS.encode().ljust(28, b"\x00")
        + (b"\x09\x00\x10\x00OB\x00\x00" + len(body).to_bytes(4, "little") + body)
    )


def test_store_writes_bytes_as_received(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = payload()
    got = spool.store(
        study_instance_uid="1.2.3",
        sop_instance_uid="1.2.3.4",
        file_meta=meta("1.2.3.4"),
        dataset=memoryview(data),
    )
    assert got.outcome == "stored"
    assert got.path == tmp_path / "spool" / "instances" / "1.2.3" / "1.2.3.4.dcm"
    raw = got.path.read_bytes()
    assert raw[:132] == b"\x00" * 128 + b"DICM"
    assert raw[dataset_offset(raw) :] == data
    assert got.size == len(raw)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    ds = pydicom.dcmread(got.path)
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert ds.SOPClassUID == SOP_CLASS
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_duplicate_same_bytes_keeps_one_copy(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.store(
        study_instance_uid="1.2",
        sop_instance_uid="1.2.9",
        file_meta=meta("1.2.9"),
        dataset=payload(),
    )
    mtime = first.path.stat().st_mtime_ns
    again = spool.store(
        study_instance_uid="1.2",
        sop_instance_uid="1.2.9",
        file_meta=meta("1.2.9"),
        dataset=payload(),
    )
    assert again.outcome == "duplicate"
    assert again.path == first.path and again.sha256 == first.sha256
    assert first.path.stat().st_mtime_ns == mtime
    assert list(spool.conflicts_dir.rglob("*.dcm")) == []
    assert spool.conflicts == 0


def test_conflict_keeps_first_and_quarantines_new(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.store(
        study_instance_uid="1.2",
        sop_instance_uid="1.2.9",
        file_meta=meta("1.2.9"),
        dataset=payload(fill=1),
    )
    before = first.path.read_bytes()
    other = spool.store(
        study_instance_uid="1.2",
        sop_instance_uid="1.2.9",
        file_meta=meta("1.2.9"),
        dataset=payload(fill=2),
    )
    assert other.outcome == "conflict"
    assert first.path.read_bytes() == before
    assert other.path.parent == spool.conflicts_dir / "1.2"
    raw = other.path.read_bytes()
    assert raw[dataset_offset(raw) :] == payload(fill=2)
    assert spool.conflicts == 1
    # the same conflicting copy again: no third file, still a conflict
    again = spool.store(
        study_instance_uid="1.2",
        sop_instance_uid="1.2.9",
        file_meta=meta("1.2.9"),
        dataset=payload(fill=2),
    )
    assert again.outcome == "conflict" and again.path == other.path
    assert len(list(spool.conflicts_dir.rglob("*.dcm"))) == 1


def test_unsafe_uids_stay_inside_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    got = spool.store(
        study_instance_uid="../../etc",
        sop_instance_uid="a/b",
        file_meta=meta("1.2"),
        dataset=payload(),
    )
    assert got.path.resolve().is_relative_to((tmp_path / "s" / "instances").resolve())
    assert safe_name("../x") != safe_name("._x") and "/" not in safe_name("a/b")
    assert safe_name("1.2.840") == "1.2.840"


@pytest.mark.parametrize(
    "uid", ["1.2\nd2r.audit {}", "1.2\r", "\x1b[2J", "1.2\u2028x", "1.2\\x", "9" * 65, " 1.2"]
)
def test_a_uid_that_is_not_one_is_logged_escaped_on_one_line(uid: str) -> None:
    shown = printable_uid(uid)
    assert shown.isprintable() and shown.isascii()
    assert shown.startswith("(invalid UID '") and shown != uid
    assert printable(uid).encode("ascii").decode("unicode_escape") == uid  # nothing lost


def test_a_uid_is_logged_as_it_is() -> None:
    assert printable_uid("1.2.840.10008.5.1.4.1.1.1.1") == "1.2.840.10008.5.1.4.1.1.1.1"
    assert printable_uid("") == "(none)"
    assert printable("AE" * 100, 8) == "AEAEAEAE..."


def test_free_space_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path, min_free_bytes=10_000)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: usage._replace(free=10_000 + len(payload()) - 1)
    )
    with pytest.raises(SpoolFullError):
        spool.store(
            study_instance_uid="1", sop_instance_uid="1.1", file_meta=meta("1.1"), dataset=payload()
        )
    assert list(spool.instances_dir.rglob("*")) == []
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: usage._replace(free=10_000 + len(payload()))
    )
    assert (
        spool.store(
            study_instance_uid="1", sop_instance_uid="1.1", file_meta=meta("1.1"), dataset=payload()
        ).outcome
        == "stored"
    )


@pytest.mark.parametrize(
    ("err", "exc_type"),
    [(errno.ENOSPC, SpoolFullError), (errno.EDQUOT, SpoolFullError), (errno.EIO, SpoolWriteError)],
)
def test_fsync_errors_are_translated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, exc_type: type[Exception]
) -> None:
    spool = Spool(tmp_path)

    def failing_fsync(fd: int) -> Any:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(exc_type):
        spool.store(
            study_instance_uid="1", sop_instance_uid="1.1", file_meta=meta("1.1"), dataset=payload()
        )
    assert list(spool.tmp_dir.iterdir()) == []
    assert not spool.path_for("1", "1.1").exists()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_real_full_filesystem(tiny_fs: Path) -> None:
    spool = Spool(tiny_fs / "spool", min_free_bytes=0)
    small = spool.store(
        study_instance_uid="1",
        sop_instance_uid="1.1",
        file_meta=meta("1.1"),
        dataset=payload(8 * 1024),
    )
    assert small.outcome == "stored"
    # passes the free-space check (nothing reserved), then hits ENOSPC while writing:
    # the file meta and block rounding need more than the data set's own bytes
    free = shutil.disk_usage(tiny_fs).free
    big = payload(free - 48 - 16)
    assert len(big) < free
    with pytest.raises(SpoolFullError, match="No space left"):
        spool.store(
            study_instance_uid="1", sop_instance_uid="1.2", file_meta=meta("1.2"), dataset=big
        )
    assert list(spool.tmp_dir.iterdir()) == []
    assert not spool.path_for("1", "1.2").exists()
    assert spool.path_for("1", "1.1").read_bytes()[-16:] == payload(8 * 1024)[-16:]
    # the guard refuses before writing anything
    guarded = Spool(tiny_fs / "spool", min_free_bytes=free)
    with pytest.raises(SpoolFullError, match="guard"):
        guarded.store(
            study_instance_uid="1",
            sop_instance_uid="1.3",
            file_meta=meta("1.3"),
            dataset=payload(16),
        )


# ------------------------------------------------------------- streamed (chunked receive)
def stream(spool: Spool, sop_uid: str, data: bytes, pdv: int = 1000) -> Any:
    """Write a Part 10 file into an IncomingFile as pynetdicom's chunked receive does."""
    from pydicom.filewriter import write_file_meta_info

    incoming = spool.incoming()
    incoming.write(b"\x00" * 128)
    incoming.write(b"DICM")
    write_file_meta_info(incoming, meta(sop_uid))  # type: ignore[arg-type]
    for k in range(0, len(data), pdv):
        incoming.write(data[k : k + pdv])
        incoming.file.flush()
    return incoming


def test_streamed_instance_is_the_same_file_as_a_stored_one(tmp_path: Path) -> None:
    data = payload(5000)
    reference = Spool(tmp_path / "a").store(
        study_instance_uid="1", sop_instance_uid="1.1", file_meta=meta("1.1"), dataset=data
    )
    spool = Spool(tmp_path / "b")
    incoming = stream(spool, "1.1", data)
    assert incoming.path.parent == spool.tmp_dir
    with incoming.dataset() as reader:
        assert reader.read() == data
        reader.seek(0)
        assert reader.read(8) == data[:8]
    got = spool.store_incoming(study_instance_uid="1", sop_instance_uid="1.1", incoming=incoming)
    assert got.outcome == "stored"
    assert got.path.read_bytes() == reference.path.read_bytes()
    assert got.sha256 == reference.sha256 == hashlib.sha256(data).hexdigest()
    assert got.size == reference.size
    assert list(spool.tmp_dir.iterdir()) == []


def test_streamed_duplicate_and_conflict(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.store_incoming(
        study_instance_uid="1", sop_instance_uid="1.1", incoming=stream(spool, "1.1", payload())
    )
    again = spool.store_incoming(
        study_instance_uid="1", sop_instance_uid="1.1", incoming=stream(spool, "1.1", payload())
    )
    assert (again.outcome, again.path, again.sha256) == ("duplicate", first.path, first.sha256)
    other = spool.store_incoming(
        study_instance_uid="1",
        sop_instance_uid="1.1",
        incoming=stream(spool, "1.1", payload(fill=9)),
    )
    assert other.outcome == "conflict"
    assert other.path.parent == spool.conflicts_dir / "1"
    raw = other.path.read_bytes()  # streamed to tmp/ as it arrived, then quarantined
    assert raw[dataset_offset(raw) :] == payload(fill=9)
    assert first.path.read_bytes()[-4:] == bytes([7]) * 4
    assert list(spool.tmp_dir.iterdir()) == []


def test_remembered_hash_follows_a_replaced_first_copy(tmp_path: Path) -> None:
    spool = Spool(tmp_path)

    def store() -> Any:
        return spool.store(
            study_instance_uid="1", sop_instance_uid="1.1", file_meta=meta("1.1"), dataset=payload()
        )

    first = store()
    # the first copy changes behind the spool's back (same size): its hash is read again
    replacement = spool.tmp_dir / "x"
    replacement.write_bytes(first.path.read_bytes()[:-1] + b"\x09")
    os.replace(replacement, first.path)
    assert store().outcome == "conflict"


@pytest.mark.parametrize(
    ("err", "exc_type"), [(errno.ENOSPC, SpoolFullError), (errno.EIO, SpoolWriteError)]
)
def test_streamed_write_error_is_kept_for_the_handler(
    tmp_path: Path, err: int, exc_type: type[Exception]
) -> None:
    spool = Spool(tmp_path)
    incoming = spool.incoming()
    incoming.write(b"\x00" * 128)

    class Failing:
        def write(self, data: Any) -> int:
            raise OSError(err, os.strerror(err))

        def close(self) -> None:
            pass

    real = incoming._fh
    incoming._fh = Failing()  # type: ignore[assignment]
    incoming.write(b"DICM")  # kept, not raised: pynetdicom would abort the association
    incoming._fh = real
    assert isinstance(incoming.failure(), exc_type)
    with pytest.raises(exc_type):
        spool.store_incoming(study_instance_uid="1", sop_instance_uid="1.1", incoming=incoming)
    assert list(spool.tmp_dir.iterdir()) == []


def test_incoming_without_a_temp_folder_fails_as_a_write_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.tmp_dir.rmdir()
    incoming = spool.incoming()
    incoming.write(b"\x00" * 200)
    incoming.file.flush()
    assert isinstance(incoming.failure(), SpoolWriteError)
    incoming.abandon()  # nothing to remove, no error


def test_abandoned_incoming_file_is_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    incoming = stream(spool, "1.1", payload()[:100])  # cut off mid data set
    incoming.abandon()
    assert list(spool.tmp_dir.iterdir()) == []
    assert not incoming.claim()  # a late handler does not take it


def test_streamed_instance_on_a_full_filesystem(tiny_fs: Path) -> None:
    spool = Spool(tiny_fs / "spool", min_free_bytes=0)
    big = payload(shutil.disk_usage(tiny_fs).free + 4096)
    incoming = stream(spool, "1.1", big, pdv=16384)
    assert isinstance(incoming.failure(), SpoolFullError)
    with pytest.raises(SpoolFullError, match="No space left"):
        spool.store_incoming(study_instance_uid="1", sop_instance_uid="1.1", incoming=incoming)
    assert list(spool.tmp_dir.iterdir()) == []
    assert not spool.path_for("1", "1.1").exists()


def test_a_likely_resend_starts_no_write_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dicom_node.spool as spool_module

    started: list[int] = []
    monkeypatch.setattr(spool_module, "_start_writeback", lambda fd, off, n: started.append(n))
    monkeypatch.setattr(spool_module, "_WRITEBACK_EVERY", 1024)
    spool = Spool(tmp_path)
    data = payload(8192)
    first = stream(spool, "1.1", data)
    assert started  # a new instance: its write-back starts while it arrives
    spool.store_incoming(study_instance_uid="1", sop_instance_uid="1.1", incoming=first)
    started.clear()
    again = stream(spool, "1.1", data)
    assert started == []
    assert again.path.stat().st_size > len(data)  # written as it arrived, never held in memory
    with again.dataset() as reader:
        assert reader.read() == data
    assert (
        spool.store_incoming(study_instance_uid="1", sop_instance_uid="1.1", incoming=again).outcome
        == "duplicate"
    )
    other = stream(spool, "1.2", data)
    assert started
    other.abandon()


# ------------------------------------------------------------- abandoned files in tmp/
def aged(path: Path, seconds: float) -> Path:
    """``path``, last written ``seconds`` ago."""
    path.touch()
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def ended_pid() -> int:
    child = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True, check=True)
    return int(child.stdout)


def test_sweep_removes_only_the_files_nobody_writes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    tmp = spool.tmp_dir
    host = owner_tag().split("@", 1)[1]
    held = stream(spool, "1.1", payload()[:100])  # a STOW-RS part waiting for its request
    held.close()
    aged(held.path, 2 * STALE_TMP_SECONDS)
    mine_old = aged(tmp / f"{owner_tag()}old.part", ORPHAN_TMP_SECONDS + 5)
    mine_new = aged(tmp / f"{owner_tag()}new.part", ORPHAN_TMP_SECONDS - 5)
    ended = aged(tmp / f"{ended_pid()}@{host}abc.part", ORPHAN_TMP_SECONDS + 5)
    running = aged(tmp / f"{os.getppid()}@{host}abc.part", STALE_TMP_SECONDS - 5)
    running_old = aged(tmp / f"{os.getppid()}@{host}old.part", STALE_TMP_SECONDS + 5)
    elsewhere = aged(tmp / f"{ended_pid()}@elsewhere~abc.part", STALE_TMP_SECONDS - 5)
    unknown_old = aged(tmp / "1.2.3.dcm.part", STALE_TMP_SECONDS + 5)
    folder = tmp / "folder"
    folder.mkdir()
    with caplog.at_level("WARNING", logger="dicom_node.spool"):
        files, size = spool.sweep_tmp()
    left = set(tmp.iterdir())
    assert left == {held.path, mine_new, running, elsewhere, folder}
    assert not left & {mine_old, ended, running_old, unknown_old}
    assert (files, size) == (4, 0)
    assert "removed 4 stale file(s) (0 bytes)" in caplog.text
    assert "1.2.3" not in caplog.text  # counts only, no names
    assert held.claim()  # untouched: its handler still takes it
    spool.store_incoming(study_instance_uid="1", sop_instance_uid="1.1", incoming=held)
    assert spool.sweep_tmp() == (0, 0)


def test_a_lost_incoming_file_is_swept(tmp_path: Path) -> None:
    """An IncomingFile dropped without being published or removed no longer protects its file."""
    spool = Spool(tmp_path)
    incoming = stream(spool, "1.1", payload()[:100])
    path = incoming.path
    assert path.name.startswith(owner_tag())
    assert spool.sweep_tmp(now=time.time() + 2 * STALE_TMP_SECONDS) == (0, 0)  # held
    del incoming
    gc.collect()
    assert spool.sweep_tmp() == (0, 0)  # written just now
    size = path.stat().st_size
    assert spool.sweep_tmp(now=time.time() + ORPHAN_TMP_SECONDS + 1) == (1, size)
    assert not path.exists()


def test_the_assembler_sweeps_tmp_at_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    left = aged(spool.tmp_dir / f"{owner_tag()}crash.part", ORPHAN_TMP_SECONDS + 5)
    store = StudyStore(f"sqlite:///{tmp_path / 'd2r.db'}")
    try:
        assembler = Assembler(
            store,
            AssemblerConfig(),
            enqueue_report=lambda *_: None,
            enqueue_send=lambda *_: None,
            spool=spool,
        )
        assembler.tick()
    finally:
        store.close()
    assert not left.exists()
