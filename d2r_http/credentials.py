"""The HTTP endpoint's credential files as ``d2r http-user`` changes them.

A change reaches a running node in one of two ways. A node that reads the file itself
(``D2R_HTTP_USERS_FILE`` naming it, as in Kubernetes, where the kubelet updates the mounted
Secret) re-reads it when its modification time or size changes. A systemd unit that hands the
file over with ``LoadCredential=`` gives the node a copy made at start, so the change needs
``systemctl restart``; :func:`units_loading` finds such units.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from d2r_http.auth import hash_password, parse_roles

__all__ = ["remove_user", "set_user", "units_loading", "without_user"]

_LOAD_CREDENTIAL = re.compile(r"^\s*LoadCredential\s*=\s*[^:\s]+:(\S+)\s*$", re.MULTILINE)


def without_user(lines: Sequence[str], name: str) -> tuple[list[str], bool]:
    """The users file's ``lines`` without ``name``'s entry, and whether it had one.

    >>> without_user(["alice:viewer:scrypt$x", "bob:metrics:scrypt$y"], "alice")
    (['bob:metrics:scrypt$y'], True)
    """
    kept = [line for line in lines if line.split(":", 1)[0].strip() != name]
    return kept, len(kept) != len(lines)


def _rewrite(path: Path, lines: list[str]) -> None:
    """Replace ``path`` atomically with ``lines``, keeping its mode and, where allowed, owner."""
    st = path.stat()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("".join(f"{line}\n" for line in lines))
            out.flush()
            os.fchmod(out.fileno(), st.st_mode & 0o777)
            with contextlib.suppress(PermissionError):  # only root may give a file away
                os.fchown(out.fileno(), st.st_uid, st.st_gid)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def set_user(path: Path, name: str, roles: Iterable[str], password: str) -> bool:
    """Add or replace ``name`` in the users file (created 0600, else rewritten atomically with
    its mode kept); returns whether it was new."""
    if not name or any(c in name for c in ":\n\r") or name != name.strip():
        raise ValueError("a user name must be non-empty, without ':' or surrounding spaces")
    role_text = ",".join(sorted(parse_roles(",".join(roles))))
    if len(password) < 8:
        raise ValueError("the password must have at least 8 characters")
    entry = f"{name}:{role_text}:{hash_password(password)}"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(entry + "\n")
            out.flush()
            os.fsync(out.fileno())
        return True
    kept, found = without_user(path.read_text(encoding="utf-8").splitlines(), name)
    _rewrite(path, [*kept, entry])
    return not found


def remove_user(path: Path, name: str) -> None:
    """Remove ``name`` from the users file, rewritten atomically with its mode kept.

    Raises
    ------
    ValueError
        When the file does not exist or has no user ``name``.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    kept, found = without_user(lines, name)
    if not found:
        raise ValueError(f"no user {name!r} in {path}")
    _rewrite(path, kept)


def units_loading(path: Path, units: Mapping[str, str]) -> tuple[str, ...]:
    """The names of the ``units`` (name -> unit file text) whose ``LoadCredential=`` copies
    ``path`` at start, sorted.

    >>> units_loading(Path("/etc/d2r/http-users"),
    ...               {"d2r-node.service": "LoadCredential=http-users:/etc/d2r/http-users"})
    ('d2r-node.service',)
    """
    target = os.path.normpath(os.path.abspath(path))
    return tuple(
        sorted(
            name
            for name, text in units.items()
            if any(os.path.normpath(source) == target for source in _LOAD_CREDENTIAL.findall(text))
        )
    )
