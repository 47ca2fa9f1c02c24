"""Durable, atomic storage of received instances, byte for byte as they arrived.

Layout under the spool root::

    instances/<StudyInstanceUID>/<SOPInstanceUID>.dcm    first copy of each instance
    conflicts/<StudyInstanceUID>/<SOPInstanceUID>.<sha256[:16]>.dcm
                                                         different content, same SOP Instance UID
    tmp/                                                 partial writes (same filesystem)

A file is the 128-byte preamble, ``DICM``, the File Meta Information and the data
set bytes of the C-STORE request, unchanged (no decode, no re-encode). It is written
to ``tmp/``, flushed and fsync'ed, published with an atomic :func:`os.replace`, and the
directory is fsync'ed, all before :meth:`Spool.store` returns; only then may the
listener answer Success.

Duplicate policy (keyed on SOP Instance UID plus the SHA-256 of the data set bytes,
i.e. everything after the File Meta Information):

* same UID, same bytes -> outcome ``"duplicate"``: nothing new is written;
* same UID, different bytes -> outcome ``"conflict"``: the first copy is kept
  untouched, the new copy is persisted under ``conflicts/`` (one file per distinct
  content), counted in :attr:`Spool.conflicts` and logged; it is never silently
  dropped nor allowed to overwrite the first copy.

One process owns a spool directory; stores of the same SOP Instance UID from
concurrent associations are serialised by a per-UID lock.

UIDs are sanitised before they become path parts (see :func:`safe_name`).

Retention: :meth:`Spool.remove_study_files` deletes a finished study's files (the node's
assembler decides which studies and when); it never touches anything outside the spool root.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info

from dicom_node.errors import SpoolFullError, SpoolWriteError

__all__ = ["Outcome", "Spool", "SpooledInstance", "dataset_offset", "safe_name"]

logger = logging.getLogger(__name__)

Outcome = Literal["stored", "duplicate", "conflict"]

PREAMBLE = b"\x00" * 128 + b"DICM"
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_UNSAFE = re.compile(r"[^0-9A-Za-z._-]")
_CHUNK = 1 << 20


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
        self.conflicts_dir = self.root / "conflicts"
        self.tmp_dir = self.root / "tmp"
        for d in (self.instances_dir, self.conflicts_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._locks = tuple(threading.Lock() for _ in range(64))
        self._count_guard = threading.Lock()
        self.conflicts = 0

    def path_for(self, study_instance_uid: str, sop_instance_uid: str) -> Path:
        """Return where the first copy of an instance lives."""
        return (
            self.instances_dir
            / safe_name(study_instance_uid)
            / f"{safe_name(sop_instance_uid)}.dcm"
        )

    def study_dirs(self, study_instance_uid: str) -> tuple[Path, Path]:
        """The instance and conflict folders of one study."""
        name = safe_name(study_instance_uid)
        return self.instances_dir / name, self.conflicts_dir / name

    def remove_study_files(
        self, study_instance_uid: str, paths: Iterable[str | os.PathLike[str]]
    ) -> tuple[int, int]:
        """Delete ``paths`` and the study's quarantined copies; return (files, bytes) removed.

        Only files under the spool root are deleted (anything else is logged and kept);
        folders left empty are removed. Missing files are skipped.
        """
        root = self.root.resolve()
        _, conflicts = self.study_dirs(study_instance_uid)
        candidates = [Path(p) for p in paths]
        if conflicts.is_dir():
            candidates.extend(sorted(conflicts.iterdir()))
        removed = freed = 0
        parents: set[Path] = {conflicts}
        for path in candidates:
            resolved = path.resolve()
            if not resolved.is_relative_to(root):
                logger.warning("retention: %s is outside the spool; kept", path.name)
                continue
            try:
                size = resolved.stat().st_size
                resolved.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.warning("retention: cannot remove %s: %s", path.name, exc.strerror)
                continue
            removed += 1
            freed += size
            parents.add(resolved.parent)
        for parent in parents:
            with contextlib.suppress(OSError):  # not empty, or already gone
                parent.rmdir()
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
    ) -> SpooledInstance:
        """Persist one instance durably; see the module docstring for the policy.

        Parameters
        ----------
        study_instance_uid, sop_instance_uid : str
            Where to file it.
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
        final = self.path_for(study_instance_uid, sop_instance_uid)
        lock = self._uid_lock(sop_instance_uid)
        if final.exists():
            # a re-send: hash first, so that an identical copy writes nothing at all
            sha = hashlib.sha256(data).hexdigest()
            with lock:
                if self._existing_sha256(final) == sha:
                    return self._duplicate(final, sha, sop_instance_uid)
        tmp, size, sha = self._write_temp(final.name, file_meta, data)
        try:
            with lock:
                existing = self._existing_sha256(final)
                if existing == sha:
                    tmp.unlink()
                    return self._duplicate(final, sha, sop_instance_uid)
                if existing is None:
                    self._publish(tmp, final)
                    return SpooledInstance(final, size, sha, "stored")
                name = f"{safe_name(sop_instance_uid)}.{sha[:16]}.dcm"
                quarantine = self.conflicts_dir / safe_name(study_instance_uid) / name
                if quarantine.exists():
                    tmp.unlink()
                    logger.warning(
                        "conflicting SOP Instance %s already quarantined", sop_instance_uid
                    )
                else:
                    self._publish(tmp, quarantine)
        except OSError as exc:
            _discard(tmp)
            raise _translate(exc, "spool publish") from exc
        with self._count_guard:
            self.conflicts += 1
        logger.warning(
            "SOP Instance %s of study %s re-sent with different content; first copy kept, "
            "new copy quarantined as %s",
            sop_instance_uid,
            study_instance_uid,
            quarantine.name,
        )
        return SpooledInstance(quarantine, quarantine.stat().st_size, sha, "conflict")

    @staticmethod
    def _duplicate(final: Path, sha: str, sop_instance_uid: str) -> SpooledInstance:
        logger.info("duplicate SOP Instance %s (same content)", sop_instance_uid)
        return SpooledInstance(final, final.stat().st_size, sha, "duplicate")

    def _existing_sha256(self, path: Path) -> str | None:
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
        tmp = self.tmp_dir / f"{name}.{os.getpid()}.{threading.get_ident()}.part"
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
        logger.warning("could not remove partial file %s", tmp.name)
