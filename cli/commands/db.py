"""``d2r db``: the study database's schema revision (``current``) and its migration (``upgrade``).

``d2r db current`` prints the revision, the newest this release knows and the state (empty,
legacy, current, behind, ahead); exit status 0 when the database is current, 1 otherwise.
``d2r db upgrade`` migrates it to the newest revision under the migration lock (take a backup
first, see docs/operations.md); a database without a revision table that holds the baseline
schema is stamped as the baseline first.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("current", "upgrade"), help="what to do")
    parser.epilog = "The database is D2R_DATABASE_URL (default: the SQLite file beside the spool)."


def run(args: argparse.Namespace) -> int:
    from cli.runtime import configure_logging, environment
    from dicom_node.settings import NodeSettings
    from studydb import schema
    from studydb.engine import make_engine

    env = environment(args)
    configure_logging(env)
    settings = NodeSettings.from_env(env)
    engine = make_engine(settings.database_url)
    try:
        if args.action == "current":
            found = schema.current_state(engine)
            print(f"revision: {found.current or '(none)'}")
            print(f"newest known: {found.head}")
            print(f"state: {found.state}")
            return 0 if found.state == "current" else 1
        before, after = schema.upgrade(engine)
        if before.current == after.current:
            print(f"already at revision {after.current}; nothing to do")
        else:
            print(f"upgraded from {before.current or before.state} to {after.current}")
        return 0
    finally:
        engine.dispose()
