"""Durable, atomic storage of received instances, byte for byte as they arrived.

Layout under the spool root::

    instances/<StudyInstanceUID>/<SOPInstanceUID>.dcm    first copy of each instance
    reports/<StudyInstanceUID>/<SOPInstanceUID>.dcm      first copy of each signed-report SR
                                                         (a study's report from the PACS, not
                                                         one of its instances)
    conflicts/<StudyInstanceUID>/<SOPInstanceUID>.<sha256[:16]>.dcm
                                                         different content, same SOP Instance UID
    tmp/                                                 partial writes (same filesystem)

A file is the 128-byte preamble, ``DICM``, the File Meta Information and the data
set bytes of the C-STORE request, unchanged (no decode, no re-encode). It is written
to ``tmp/``, flushed and fsync'ed, published with an atomic :func:`os.replace`, and the
directory is fsync'ed, all before :meth:`Spool.store` returns; only then may the
listener answer Success.

The listener streams instead: :meth:`Spool.incoming` opens an :class:`IncomingFile` in
``tmp/`` that pynetdicom's chunked receive (or the STOW-RS receiver) writes each fragment into
as it arrives; the file hashes the data set on the way and starts the write-back of every full
MiB, so that after the last fragment :meth:`Spool.store_incoming` has only the fsync, the rename
and the directory fsync left. Memory stays bounded whatever the size of the data set: a re-send
is written to ``tmp/`` like any other and compared by its streamed SHA-256 with the first
copy's (remembered, or read again from the file in 1 MiB blocks), never held in memory.

Duplicate policy (keyed on SOP Instance UID plus the SHA-256 of the data set bytes,
i.e. everything after the File Meta Information):

* same UID, same bytes -> outcome ``"duplicate"``: nothing new is written;
* same UID, different bytes -> outcome ``"conflict"``: the first copy is kept
  untouched, the new copy is persisted under ``conflicts/`` (one file per distinct
  content), counted in :attr:`Spool.conflicts` and logged; it is never silently
  dropped nor allowed to overwrite the first copy.

One node owns a spool directory (its listener processes share it); stores of the same SOP
Instance UID from concurrent associations are serialised by a per-UID lock.

Every file in ``tmp/`` is named after the process that opened it (``<pid>@<host>~...``, see
:func:`owner_tag`). Whoever opens one removes it, whatever way its request or association ends;
:meth:`Spool.sweep_tmp`, on the node's assembler cadence and at its start, removes what a crash
or a missed end left behind: a file that no :class:`IncomingFile` of this process holds and
that was not written for :data:`ORPHAN_TMP_SECONDS` when this process or a process of this
host that no longer runs opened it, or for :data:`STALE_TMP_SECONDS` when anyone else did
(another listener process, still running, or another host).

UIDs are sanitised before they become path parts (see :func:`safe_name`) and before they are
logged (see :func:`printable_uid`; other peer text through :func:`printable`).

Retention: :meth:`Spool.remove_study_files` deletes a finished study's files, its signed-report
SRs included (the node's assembler decides which studies and when); it never touches anything
outside the spool root.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info

from dicom_node.errors import SpoolFullError, SpoolWriteError

__all__ = [
    "IncomingFile",
    "Outcome",
    "Spool",
    "SpooledInstance",
    "ORPHAN_TMP_SECONDS",
    "STALE_TMP_SECONDS",
    "dataset_offset",
    "owner_tag",
    "printable",
    "printable_uid",
    "safe_name",
]

logger = logging.getLogger(__name__)

Outcome = Literal["stored", "duplicate", "conflict"]

PREAMBLE = b"\x00" * 128 + b"DICM"
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_UNSAFE = re.compile(r"[^0-9A-Za-z._-]")
_CHUNK = 1 << 20
#: bytes of a received file after which its write-back is started (``sync_file_range``)
_WRITEBACK_EVERY = 1 << 20
#: data set hashes of first copies kept in memory (a re-send is compared without a re-read)
_KNOWN_HASHES = 65536
#: longest File Meta Information (after the preamble) whose data set is hashed apart from it
MAX_FILE_META_BYTES = 64 * 1024
_VALID_UID = re.compile(r"[0-9][0-9.]{0,63}")
#: longest piece of peer text that :func:`printable` keeps
_PRINTABLE_CHARS = 128
#: a file in ``tmp/`` of this process (or of a process of this host that no longer runs) that no
#: :class:`IncomingFile` holds is removed once it was not written for this long (an IncomingFile
#: holds its file from creation to publication and :meth:`Spool.store` writes its own without a
#: pause: the bound only covers the instants in between)
ORPHAN_TMP_SECONDS = 60.0
#: a file in ``tmp/`` of another running process, another host, or of no known owner is removed
#: once it was not written for this long: far longer than a listener process keeps a file idle
#: (the peer's silence is bounded by ``D2R_NETWORK_TIMEOUT``, the handler's work by seconds)
STALE_TMP_SECONDS = 3600.0
_HOST = re.sub(r"[^0-9A-Za-z.-]", "_", socket.gethostname())[:64]
_OWNER = re.compile(r"(\d+)@([^~]*)~")


def owner_tag() -> str:
    """How the names of this process's files in ``tmp/`` start: ``<pid>@<host>~``."""
    return f"{os.getpid()}@{_HOST}~"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: running, as another user
        return True
    return True


def safe_name(uid: str) -> str:
    """Return ``uid`` as a safe single path component.

    A conformant UID (digits and dots, at most 64 characters) is returned
    unchanged. Anything else has unsafe characters replaced by ``_`` and gets a
    short hash suffix, so two different raw values never share a name and no
    value can climb out of its directory.

    >>> safe_name("1.2.840.10008.1")
    '1.2.840.10008.1'
    >>> safe_name("../etc")[:7]
    '_.._etc'
    """
    if re.fullmatch(r"[0-9][0-9.]{0,63}", uid):
        return uid
    digest = hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"_{_UNSAFE.sub('_', uid)[:64]}-{digest}"


def printable(text: object, limit: int = _PRINTABLE_CHARS) -> str:
    r"""Peer-supplied text as one line of printable ASCII, safe to log.

    Control characters, backslashes and non-ASCII characters are escaped as Python escapes
    them (so a line break cannot start a forged log line); text over ``limit`` characters is
    cut and marked with ``...``.

    >>> printable("CT1\nd2r.audit x\x1b[2J")
    'CT1\\nd2r.audit x\\x1b[2J'
    >>> printable("x" * 200, 4)
    'xxxx...'
    """
    value = str(text)
    escaped = value[:limit].encode("unicode_escape").decode("ascii")
    return escaped + ("..." if len(value) > limit else "")


def printable_uid(uid: object) -> str:
    r"""A UID as it may be logged: a conformant-looking UID (digits and dots, at most 64
    characters) unchanged, anything else escaped by :func:`printable` and marked as invalid.

    >>> printable_uid("1.2.840.10008.1"), printable_uid(""), printable_uid("1.2\nx")
    ('1.2.840.10008.1', '(none)', "(invalid UID '1.2\\nx')")
    """
    value = str(uid)
    if not value:
        return "(none)"
    if _VALID_UID.fullmatch(value):
        return value
    return f"(invalid UID '{printable(value, 64)}')"


def dataset_offset(head: bytes) -> int:
    """Return where the data set starts in a Part 10 file whose first bytes are ``head``.

    ``head`` must hold at least the preamble, ``DICM`` and the File Meta
    Information Group Length element (144 bytes).
    """
    if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a Part 10 file with a File Meta Information Group Length")
    (group_length,) = struct.unpack("<I", head[140:144])
    return 144 + int(group_length)


@dataclass(frozen=True)
class SpooledInstance:
    """Where and how a received instance was persisted.

    Attributes
    ----------
    path : Path
        The file holding this content (under ``conflicts/`` for a conflict).
    size : int
        Size of that file in bytes.
    sha256 : str
        Hex SHA-256 of the data set bytes (after the File Meta Information).
    outcome : {"stored", "duplicate", "conflict"}
        See the module docstring.
    """

    path: Path
    size: int
    sha256: str
    outcome: Outcome


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _translate(exc: OSError, what: str) -> SpoolFullError | SpoolWriteError:
    if exc.errno in _FULL_ERRNOS:
        return SpoolFullError(f"{what}: {os.strerror(exc.errno or 0)}")
    return SpoolWriteError(f"{what}: {exc.strerror or type(exc).__name__}")


def _load_writeback() -> Callable[[int, int, int], object] | None:
    """``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`` from the C library, if any.

    Starts the write-back of a range without waiting for it (Linux); the final fsync then finds
    most of the file already on its way to the disk. None where the call does not exist.
    """
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE

    def start(fd: int, offset: int, length: int) -> object:
        return function(fd, offset, length, write)

    return start


_start_writeback = _load_writeback()


class _NoBuffer:
    def flush(self) -> None:
        pass


class IncomingFile:
    """A received data set being written to the spool's ``tmp/`` while its PDVs arrive.

    It has what pynetdicom's chunked receive needs of its temporary file (``write``,
    ``file.flush``, ``name``, ``close``). The SHA-256 of the data set (the bytes after the File
    Meta Information) is computed on the way. An I/O error, also one opening the file, is kept
    in :attr:`error` and later bytes are dropped: the C-STORE handler answers it with a status
    instead of pynetdicom aborting the association.

    Every byte goes to the file as it arrives; only the File Meta Information (at most
    :data:`MAX_FILE_META_BYTES`) is kept in memory until the data set starts. A likely re-send
    (``known`` SOP Instance UID) starts no write-back: if it is identical it is removed before
    the page cache reaches the disk.
    """

    def __init__(
        self, directory: Path, *, known: Callable[[str], bool] = lambda sop_uid: False
    ) -> None:
        self.error: OSError | None = None
        #: whether the spool holds a first copy of a SOP Instance UID (a likely re-send)
        self._known = known
        self._writeback = _start_writeback is not None
        self.size = 0
        self._fh: io.FileIO | None = None
        #: what pynetdicom flushes after each PDV (unbuffered writes: nothing to flush)
        self.file: Any = _NoBuffer()
        self.name = str(directory / "unopened.part")
        self._digest = hashlib.sha256()
        self._head: bytearray | None = bytearray()  # until the data set offset is known
        self._started = 0  # bytes whose write-back was started
        self._claimed = False
        self._settled = False  # published or removed by the spool: the name is no longer ours
        self._lock = threading.Lock()
        try:
            fd, name = tempfile.mkstemp(prefix=owner_tag(), suffix=".part", dir=directory)
        except OSError as exc:
            self.error = exc
            return
        self.name = name
        self._fh = io.FileIO(fd, "wb")
        with _HELD_LOCK:
            _HELD.add(self)

    @property
    def path(self) -> Path:
        return Path(self.name)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        count = len(view)
        if self.error is None and self._fh is not None:
            self._write_out(view)
        self._hash(view)
        self.size += count
        if (
            self._writeback
            and _start_writeback is not None
            and self._fh is not None
            and self.error is None
            and self.size - self._started >= _WRITEBACK_EVERY
        ):
            _start_writeback(self._fh.fileno(), self._started, self.size - self._started)
            self._started = self.size
        return count

    def _hash(self, view: memoryview) -> None:
        head = self._head
        if head is None:
            self._digest.update(view)
            return
        head += view
        if len(head) < 144:
            return
        try:
            offset = dataset_offset(bytes(head[:144]))
        except ValueError:
            offset = 0  # not a spool file's layout: hash everything (never a spool copy)
        if offset > 132 + MAX_FILE_META_BYTES:
            offset = 0  # a File Meta Information this long is not ours: never held in memory
        if len(head) >= offset:
            self._digest.update(head[offset:])
            self._head = None
            if offset and self._known(_meta_sop_instance_uid(bytes(head[:offset]))):
                self._writeback = False  # most likely an identical re-send, removed unsynced

    def sha256(self) -> str:
        return self._digest.hexdigest()

    def _write_out(self, view: memoryview) -> None:
        assert self._fh is not None
        try:
            rest = view
            while rest:
                rest = rest[self._fh.write(rest) or 0 :]
        except OSError as exc:
            self.error = exc
        except ValueError:  # closed: the association ended while its last PDV was written
            self.error = OSError(errno.EBADF, "file closed")

    def dataset(self) -> io.BufferedReader:
        """The data set (after the File Meta Information), readable and seekable from 0."""
        return io.BufferedReader(_Window(self.name, self.dataset_start()), 1 << 16)

    def dataset_start(self) -> int:
        with open(self.name, "rb") as f:
            return dataset_offset(f.read(144))

    @property
    def claimed(self) -> bool:
        """Whether a handler (or :meth:`abandon`) took the file."""
        return self._claimed

    def claim(self) -> bool:
        """Take the file for the C-STORE handler; False once :meth:`abandon` took it."""
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def abandon(self) -> None:
        """Remove a file no handler took (the association ended mid data set)."""
        if self.claim():
            self.close()
            self.discard()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()

    def discard(self) -> None:
        """Remove the temporary file if it is still there (not published)."""
        if self._fh is not None and not self._settled:
            self._settle()
            _discard(self.path)

    def _settle(self) -> None:
        """The spool published or removed the file: :meth:`discard` must not touch its name."""
        self._settled = True
        with _HELD_LOCK:
            _HELD.discard(self)

    def failure(self) -> SpoolFullError | SpoolWriteError | None:
        """The error kept while writing, as the spool's exception (None when all went well)."""
        return None if self.error is None else _translate(self.error, "spool write")

    def sync(self) -> None:
        """Raise the kept write error, or flush the file to stable storage and close it.

        The file may have been closed already (a STOW-RS part waits closed for the rest of its
        request): it is then opened again for the fsync, which covers every descriptor.
        """
        if self.error is not None:
            raise self.error
        assert self._fh is not None  # opened, since no error was kept
        if self._fh.closed:
            fd = os.open(self.name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        os.fsync(self._fh.fileno())
        self._fh.close()


#: the files of this process not yet published or removed (weakly: a lost one is swept later)
_HELD: weakref.WeakSet[IncomingFile] = weakref.WeakSet()
_HELD_LOCK = threading.Lock()


def _held_names() -> set[str]:
    with _HELD_LOCK:
        return {os.path.basename(f.name) for f in _HELD}


def _meta_sop_instance_uid(head: bytes) -> str:
    """Media Storage SOP Instance UID of a Part 10 file's first bytes ("" if unreadable)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True)
        return str(ds.file_meta.get("MediaStorageSOPInstanceUID", ""))
    except Exception:  # only a hint: a file the spool cannot read is simply written back
        return ""


class _Window(io.RawIOBase):
    """A read-only view of a file from ``start`` on, with positions relative to ``start``."""

    def __init__(self, path: str, start: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._start = start
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = os.pread(self._fd, len(buffer), self._start + self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = offset
        elif whence == 1:
            self._pos += offset
        else:
            self._pos = os.fstat(self._fd).st_size - self._start + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class Spool:
    """The spool directory.

    Parameters
    ----------
    root : Path
        Spool root; created if missing.
    min_free_bytes : int
        Refuse (``SpoolFullError``) a store that would leave less free space than this.
    """

    def __init__(self, root: str | os.PathLike[str], *, min_free_bytes: int = 0) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, got {min_free_bytes}")
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.instances_dir = self.root / "instances"
        self.reports_dir = self.root / "reports"
        self.conflicts_dir = self.root / "conflicts"
        self.tmp_dir = self.root / "tmp"
        for d in (self.instances_dir, self.reports_dir, self.conflicts_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._locks = tuple(threading.Lock() for _ in range(64))
        self._count_guard = threading.Lock()
        self.conflicts = 0
        self._known: OrderedDict[Path, tuple[tuple[int, int, int], str]] = OrderedDict()
        self._known_names: dict[str, int] = {}  # file stems (safe SOP UIDs) in ``_known``
        self._known_guard = threading.Lock()

    def path_for(
        self, study_instance_uid: str, sop_instance_uid: str, *, report: bool = False
    ) -> Path:
        """Return where the first copy of an instance (``report``: of a signed-report SR)
        lives."""
        folder = self.reports_dir if report else self.instances_dir
        return folder / safe_name(study_instance_uid) / f"{safe_name(sop_instance_uid)}.dcm"

    def study_dirs(self, study_instance_uid: str) -> tuple[Path, Path]:
        """The instance and conflict folders of one study."""
        name = safe_name(study_instance_uid)
        return self.instances_dir / name, self.conflicts_dir / name

    def remove_study_files(
        self, study_instance_uid: str, paths: Iterable[str | os.PathLike[str]]
    ) -> tuple[int, int]:
        """Delete ``paths``, the study's quarantined copies and its signed-report SRs; return
        (files, bytes) removed.

        Only files under the spool root are deleted (anything else is logged and kept);
        folders left empty are removed. Missing files are skipped.
        """
        root = self.root.resolve()
        _, conflicts = self.study_dirs(study_instance_uid)
        reports = self.reports_dir / safe_name(study_instance_uid)
        candidates = [Path(p) for p in paths]
        for folder in (conflicts, reports):
            if folder.is_dir():
                candidates.extend(sorted(folder.iterdir()))
        removed = freed = 0
        parents: set[Path] = {conflicts, reports}
        for path in candidates:
            resolved = path.resolve()
            if not resolved.is_relative_to(root):
                logger.warning("retention: %s is outside the spool; kept", printable(path.name))
                continue
            try:
                size = resolved.stat().st_size
                resolved.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.warning(
                    "retention: cannot remove %s: %s", printable(path.name), exc.strerror
                )
                continue
            removed += 1
            freed += size
            parents.add(resolved.parent)
        for parent in parents:
            with contextlib.suppress(OSError):  # not empty, or already gone
                parent.rmdir()
        return removed, freed

    def instance_files(self) -> Iterable[Path]:
        """Every first copy in ``instances/`` (the spool check compares them with the database)."""
        try:
            studies = sorted(os.scandir(self.instances_dir), key=lambda e: e.name)
        except OSError as exc:
            logger.warning("cannot list the spool's instances/: %s", exc.strerror)
            return
        for study in studies:
            if not study.is_dir(follow_symlinks=False):
                continue
            try:
                names = sorted(e.name for e in os.scandir(study.path) if e.name.endswith(".dcm"))
            except OSError:
                continue  # removed meanwhile (retention)
            for name in names:
                yield Path(study.path) / name

    def data_set_sha256(self, path: Path) -> str | None:
        """The SHA-256 of the data set of the file at ``path`` (None if absent), as the
        duplicate check computes it."""
        return self._existing_sha256(path)

    def sweep_tmp(
        self,
        *,
        now: float | None = None,
        orphan_seconds: float = ORPHAN_TMP_SECONDS,
        stale_seconds: float = STALE_TMP_SECONDS,
    ) -> tuple[int, int]:
        """Remove the files in ``tmp/`` that nobody writes any more; return (files, bytes).

        A file an :class:`IncomingFile` of this process holds is kept, whatever its age (a
        STOW-RS part waits closed for the rest of its request). Any other is removed once not
        written for ``orphan_seconds`` when this process, or a process of this host that no
        longer runs, opened it, or for ``stale_seconds`` otherwise (see the module docstring).
        """
        now = time.time() if now is None else now
        held = _held_names()
        mine = owner_tag()
        running: dict[int, bool] = {}
        removed = freed = 0
        try:
            entries = list(os.scandir(self.tmp_dir))
        except OSError as exc:
            logger.warning("cannot list the spool's tmp/: %s", exc.strerror)
            return 0, 0
        for entry in entries:
            if entry.name in held:
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue  # the spool writes files only
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # published or removed meanwhile
            limit = stale_seconds
            owner = _OWNER.match(entry.name)
            if entry.name.startswith(mine):
                limit = orphan_seconds
            elif owner is not None and owner.group(2) == _HOST:
                pid = int(owner.group(1))
                if pid not in running:
                    running[pid] = _pid_running(pid)
                if not running[pid]:
                    limit = orphan_seconds
            if now - st.st_mtime < limit:
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.warning("cannot remove a stale file from the spool's tmp/: %s", exc.strerror)
                continue
            removed += 1
            freed += st.st_size
        if removed:
            logger.warning(
                "removed %d stale file(s) (%d bytes) from the spool's tmp/", removed, freed
            )
        return removed, freed

    def check_free_space(self, incoming: int) -> None:
        """Raise :class:`SpoolFullError` if storing ``incoming`` bytes would cross the guard."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as exc:
            raise _translate(exc, "disk usage") from exc
        if free - incoming < self.min_free_bytes:
            raise SpoolFullError(
                f"{free} bytes free, {incoming} incoming, guard {self.min_free_bytes}"
            )

    def _uid_lock(self, sop_instance_uid: str) -> threading.Lock:
        """Return the lock serialising stores of ``sop_instance_uid`` (striped by hash)."""
        digest = hashlib.blake2s(sop_instance_uid.encode("utf-8", "surrogateescape")).digest()
        return self._locks[digest[0] % len(self._locks)]

    def store(
        self,
        *,
        study_instance_uid: str,
        sop_instance_uid: str,
        file_meta: FileMetaDataset,
        dataset: bytes | memoryview,
        report: bool = False,
    ) -> SpooledInstance:
        """Persist one instance durably; see the module docstring for the policy.

        Parameters
        ----------
        study_instance_uid, sop_instance_uid : str
            Where to file it.
        report : bool
            File it under ``reports/``: a signed-report SR, not an instance of the study.
        file_meta : FileMetaDataset
            File Meta Information (e.g. pynetdicom's ``event.file_meta``).
        dataset : bytes or memoryview
            The encoded data set as received.

        Raises
        ------
        SpoolFullError
            Free space below the guard, or ENOSPC/EDQUOT while writing.
        SpoolWriteError
            Any other I/O failure. No partial file is left behind.
        """
        data = memoryview(dataset).cast("B")
        self.check_free_space(len(data))
        final = self.path_for(study_instance_uid, sop_instance_uid, report=report)
        lock = self._uid_lock(sop_instance_uid)
        if final.exists():
            # a re-send: hash first, so that an identical copy writes nothing at all
            sha = hashlib.sha256(data).hexdigest()
            with lock:
                if self._existing_sha256(final) == sha:
                    return self._duplicate(final, sha, sop_instance_uid)
        tmp, size, sha = self._write_temp(final.name, file_meta, data)
        return self._settle(tmp, size, sha, final, study_instance_uid, sop_instance_uid)

    def incoming(self) -> IncomingFile:
        """A new file in ``tmp/`` for a data set about to arrive (see :class:`IncomingFile`)."""
        return IncomingFile(self.tmp_dir, known=self._has_first_copy)

    def _has_first_copy(self, sop_instance_uid: str) -> bool:
        """Whether a first copy of ``sop_instance_uid`` was written or read by this spool."""
        with self._known_guard:
            return bool(sop_instance_uid) and safe_name(sop_instance_uid) in self._known_names

    def store_incoming(
        self,
        *,
        study_instance_uid: str,
        sop_instance_uid: str,
        incoming: IncomingFile,
        report: bool = False,
    ) -> SpooledInstance:
        """Persist a streamed instance durably: the policy, ``report`` and errors of
        :meth:`store`.

        ``incoming`` holds the whole Part 10 file already; what is left is the free-space
        guard, the fsync, the atomic rename and the directory fsync. An identical re-send is
        compared by its streamed SHA-256 before the fsync and removed; nothing of the data set
        is held in memory. The temporary file never outlives this call.
        """
        tmp = incoming.path
        try:
            failure = incoming.failure()
            if failure is not None:
                raise failure
            self.check_free_space(0)  # the file is written already: its bytes count as used
            final = self.path_for(study_instance_uid, sop_instance_uid, report=report)
            sha = incoming.sha256()
            if final.exists():
                with self._uid_lock(sop_instance_uid):
                    if self._existing_sha256(final) == sha:
                        incoming.close()
                        incoming.discard()
                        return self._duplicate(final, sha, sop_instance_uid)
            try:
                incoming.sync()
            except OSError as exc:
                raise _translate(exc, "spool write") from exc
        except BaseException:
            incoming.close()
            incoming.discard()
            raise
        incoming._settle()  # published or removed by _settle, whatever happens
        return self._settle(tmp, incoming.size, sha, final, study_instance_uid, sop_instance_uid)

    def _settle(
        self,
        tmp: Path,
        size: int,
        sha: str,
        final: Path,
        study_instance_uid: str,
        sop_instance_uid: str,
    ) -> SpooledInstance:
        """Publish a durable temp file: first copy, duplicate (removed) or conflict."""
        try:
            with self._uid_lock(sop_instance_uid):
                existing = self._existing_sha256(final)
                if existing == sha:
                    tmp.unlink()
                    return self._duplicate(final, sha, sop_instance_uid)
                if existing is None:
                    if self._publish_first(tmp, final):
                        self._remember_published(final, sha)
                        return SpooledInstance(final, size, sha, "stored")
                    # another node published a first copy meanwhile: compare with it
                    existing = self._existing_sha256(final)
                    if existing == sha:
                        tmp.unlink()
                        return self._duplicate(final, sha, sop_instance_uid)
                name = f"{safe_name(sop_instance_uid)}.{sha[:16]}.dcm"
                quarantine = self.conflicts_dir / safe_name(study_instance_uid) / name
                if quarantine.exists():
                    tmp.unlink()
                    logger.warning(
                        "conflicting SOP Instance %s already quarantined",
                        printable_uid(sop_instance_uid),
                    )
                else:
                    self._publish(tmp, quarantine)
        except (OSError, SpoolWriteError) as exc:
            _discard(tmp)
            if isinstance(exc, SpoolWriteError):
                raise
            raise _translate(exc, "spool publish") from exc
        with self._count_guard:
            self.conflicts += 1
        logger.warning(
            "SOP Instance %s of study %s re-sent with different content; first copy kept, "
            "new copy quarantined as %s",
            printable_uid(sop_instance_uid),
            printable_uid(study_instance_uid),
            printable(quarantine.name),
        )
        return SpooledInstance(quarantine, quarantine.stat().st_size, sha, "conflict")

    @staticmethod
    def _duplicate(final: Path, sha: str, sop_instance_uid: str) -> SpooledInstance:
        logger.info("duplicate SOP Instance %s (same content)", printable_uid(sop_instance_uid))
        return SpooledInstance(final, final.stat().st_size, sha, "duplicate")

    def _existing_sha256(self, path: Path) -> str | None:
        """The data set hash of the copy at ``path`` (None if absent).

        Remembered for the files this spool wrote or read, keyed on inode, size and
        modification time, so that a re-send is compared without reading the first copy again.
        """
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SpoolWriteError(f"cannot read existing copy: {exc}") from exc
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._known_guard:
            known = self._known.get(path)
        if known is not None and known[0] == identity:
            return known[1]
        sha = self._hash_file(path)
        if sha is not None:
            self._remember(path, identity, sha)
        return sha

    def _remember(self, path: Path, identity: tuple[int, int, int], sha: str) -> None:
        with self._known_guard:
            if path not in self._known:
                self._known_names[path.stem] = self._known_names.get(path.stem, 0) + 1
            self._known[path] = (identity, sha)
            self._known.move_to_end(path)
            while len(self._known) > _KNOWN_HASHES:
                old, _ = self._known.popitem(last=False)
                if self._known_names.get(old.stem, 0) <= 1:
                    self._known_names.pop(old.stem, None)
                else:
                    self._known_names[old.stem] -= 1

    def _remember_published(self, path: Path, sha: str) -> None:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            self._remember(path, (st.st_ino, st.st_size, st.st_mtime_ns), sha)

    @staticmethod
    def _hash_file(path: Path) -> str | None:
        try:
            with open(path, "rb") as f:
                offset = dataset_offset(f.read(144))
                f.seek(offset)
                digest = hashlib.sha256()
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise SpoolWriteError(f"cannot read existing copy: {exc}") from exc
        return digest.hexdigest()

    def _write_temp(
        self, name: str, file_meta: FileMetaDataset, data: memoryview
    ) -> tuple[Path, int, str]:
        """Write and fsync a temp file; hash ``data`` in parallel (both release the GIL)."""
        tmp = self.tmp_dir / f"{owner_tag()}{name}.{threading.get_ident()}.part"
        digest = hashlib.sha256()
        hasher = threading.Thread(target=digest.update, args=(data,), daemon=True)
        hasher.start()
        try:
            with open(tmp, "wb") as f:
                f.write(PREAMBLE)
                write_file_meta_info(DicomFileLike(f), file_meta, enforce_standard=True)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
        except OSError as exc:
            _discard(tmp)
            raise _translate(exc, "spool write") from exc
        finally:
            hasher.join()
        return tmp, size, digest.hexdigest()

    @staticmethod
    def _publish_first(tmp: Path, final: Path) -> bool:
        """Publish ``tmp`` as ``final`` unless a file of that name exists (False then).

        A hard link fails when the name exists, also when another node sharing the spool
        publishes the same instance at the same moment; where links are not supported, the
        rename of :meth:`_publish` is used.
        """
        parent = final.parent
        created = not parent.exists()
        parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            os.replace(tmp, final)
        else:
            tmp.unlink()
        _fsync_dir(parent)
        if created:
            _fsync_dir(parent.parent)
        return True

    @staticmethod
    def _publish(tmp: Path, final: Path) -> None:
        """Atomically rename ``tmp`` to ``final`` and make the new name durable."""
        parent = final.parent
        created = not parent.exists()
        parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        _fsync_dir(parent)
        if created:
            _fsync_dir(parent.parent)


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        logger.warning("could not remove partial file %s", printable(tmp.name))
