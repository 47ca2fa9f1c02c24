"""``d2r http-user NAME --role ROLE``: add or replace a basic-auth user of the HTTP endpoint;
``d2r http-user NAME --remove``: remove one.

Writes ``NAME:ROLES:scrypt$...`` to the users file (``--file``, default ``D2R_HTTP_USERS_FILE``),
created with mode 0600; a rewrite keeps the file's mode. A node that reads the file itself
re-reads it when it changes; a systemd unit that copies it with ``LoadCredential=`` needs
``systemctl restart``, and the command says which. The password is asked twice on the terminal,
or read as one line from standard input with ``--password-stdin``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

#: where systemd unit files live (administrator's first)
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="user name (no ':')")
    parser.add_argument(
        "--role",
        action="append",
        choices=("metrics", "viewer", "ingest", "feedback"),
        help="a role of the user (repeat for several; required unless --remove)",
    )
    parser.add_argument("--remove", action="store_true", help="remove the user")
    parser.add_argument("--file", help="the users file (default: D2R_HTTP_USERS_FILE)")
    parser.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )


def when_effective(path: Path, loading_units: Sequence[str]) -> str:
    """How the change to ``path`` reaches the node, given the systemd units that load it.

    >>> when_effective(Path("/etc/d2r/http-users"), ["d2r-worker@.service"])
    "systemd copies /etc/d2r/http-users at start (LoadCredential=): run `systemctl restart 'd2r-worker@*.service'` for the change to take effect"
    """  # noqa: E501
    if not loading_units:
        return f"a running d2r that reads {path} picks the change up at its next request"
    names = " ".join(
        f"'{u.replace('@.', '@*.')}'" if "@." in u else u for u in sorted(loading_units)
    )
    return (
        f"systemd copies {path} at start (LoadCredential=): run `systemctl restart {names}` "
        "for the change to take effect"
    )


def _installed_units() -> dict[str, str]:
    """The text of the installed ``d2r*.service`` unit files, the first found per name."""
    found: dict[str, str] = {}
    for folder in UNIT_DIRS:
        for unit in sorted(Path(folder).glob("d2r*.service")):
            if unit.name not in found:
                try:
                    found[unit.name] = unit.read_text(encoding="utf-8")
                except OSError:
                    continue
    return found


def _password(args: argparse.Namespace) -> str | None:
    import getpass
    import sys

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != password:
        print("d2r http-user: the passwords differ", file=sys.stderr)
        return None
    return password


def run(args: argparse.Namespace) -> int:
    import sys

    from cli.runtime import environment
    from d2r_core.config import has_placeholder
    from d2r_http.credentials import remove_user, set_user, units_loading

    path = args.file or environment(args).get("D2R_HTTP_USERS_FILE")
    if not path:
        print("d2r http-user: give --file or set D2R_HTTP_USERS_FILE", file=sys.stderr)
        return 2
    if args.remove == bool(args.role):
        print("d2r http-user: give --role (add or replace) or --remove", file=sys.stderr)
        return 2
    try:
        if args.remove:
            remove_user(Path(path), args.name)
            done = f"removed {args.name} from {path}"
        else:
            password = _password(args)
            if password is None:
                return 1
            if has_placeholder(password):
                print("d2r http-user: the password is the CHANGE-ME placeholder", file=sys.stderr)
                return 1
            new = set_user(Path(path), args.name, args.role, password)
            roles = ",".join(sorted(args.role))
            done = f"{'added' if new else 'replaced'} {args.name} ({roles}) in {path}"
    except (OSError, ValueError) as exc:
        print(f"d2r http-user: {exc}", file=sys.stderr)
        return 1
    print(f"{done}; {when_effective(Path(path), units_loading(Path(path), _installed_units()))}")
    return 0
