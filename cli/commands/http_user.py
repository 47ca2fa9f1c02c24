"""``d2r http-user NAME --role ROLE``: add or replace a basic-auth user of the HTTP endpoint.

Writes ``NAME:ROLES:scrypt$...`` to the users file (``--file``, default ``D2R_HTTP_USERS_FILE``),
created with mode 0600; a running node re-reads it. The password is asked twice on the terminal,
or read as one line from standard input with ``--password-stdin``.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="user name (no ':')")
    parser.add_argument(
        "--role",
        action="append",
        required=True,
        choices=("metrics", "viewer", "ingest"),
        help="a role of the user (repeat for several)",
    )
    parser.add_argument("--file", help="the users file (default: D2R_HTTP_USERS_FILE)")
    parser.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )


def run(args: argparse.Namespace) -> int:
    import getpass
    import sys
    from pathlib import Path

    from cli.runtime import environment
    from observability.auth import set_user

    path = args.file or environment(args).get("D2R_HTTP_USERS_FILE")
    if not path:
        print("d2r http-user: give --file or set D2R_HTTP_USERS_FILE", file=sys.stderr)
        return 2
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            print("d2r http-user: the passwords differ", file=sys.stderr)
            return 1
    try:
        new = set_user(Path(path), args.name, args.role, password)
    except ValueError as exc:
        print(f"d2r http-user: {exc}", file=sys.stderr)
        return 1
    print(f"{'added' if new else 'replaced'} {args.name} ({','.join(sorted(args.role))}) in {path}")
    return 0
