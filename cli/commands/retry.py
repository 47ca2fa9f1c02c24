"""``d2r retry STUDY_UID``: re-send a failed study's reports (or reprocess it).

``--destination NAME`` re-sends to that destination only (as ``d2r status`` names it, or as
written in ``D2R_DESTINATIONS``). ``--priority stat|urgent|routine|low`` sets the study's
priority first (recorded in its events); alone, on a study that is not failed, it only changes
the priority: a queued study's job is sent again at the new priority by the running node.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from d2r_core.priority import PRIORITY_VALUES

if TYPE_CHECKING:
    from studydb.store import StudyStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study_uid", help="StudyInstanceUID")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--reprocess",
        action="store_true",
        help="run the model again instead of re-sending the existing reports",
    )
    which.add_argument(
        "--destination",
        metavar="NAME",
        help="re-send only this destination's failed delivery (e.g. mllp://ris:2575)",
    )
    parser.add_argument(
        "--priority",
        choices=PRIORITY_VALUES,
        help="set the study's priority (a queued study is served at it; deliveries follow it)",
    )


def _canonical(name: str) -> str:
    """The destination's name as the study database keys it (``mllp://RIS:2575/`` and
    ``mllp://ris:2575`` are one destination); a name that does not parse is taken as given."""
    from d2r_core.errors import ConfigError
    from delivery.destinations import parse_destination

    try:
        return parse_destination(name.strip()).name
    except ConfigError:
        return name.strip()


def run(args: argparse.Namespace) -> int:
    import sys

    from cli.runtime import environment
    from dicom_node.settings import NodeSettings
    from studydb.records import RECEIVING, SENDING
    from studydb.store import StudyStore

    settings = NodeSettings.from_env(environment(args))
    store = StudyStore(settings.database_url)
    try:
        if args.priority:
            changed = _set_priority(store, args.study_uid, args.priority)
            if changed is None:
                return 1
            if not args.reprocess and not args.destination:
                view = store.get(args.study_uid)
                if view is None or view.state != "failed":
                    return 0
        if args.destination:
            return _retry_destination(store, args.study_uid, _canonical(args.destination))
        try:
            before = store.get(args.study_uid)
            new = store.reset_for_retry(args.study_uid, reprocess=args.reprocess)
        except KeyError:
            print(f"d2r retry: no study {args.study_uid}", file=sys.stderr)
            return 1
        assert before is not None
        if new == SENDING and before.state != SENDING:
            print(f"{args.study_uid}: reports will be re-sent by the running node")
        elif new == RECEIVING and before.state != RECEIVING:
            print(f"{args.study_uid}: queued for a new report by the running node")
        else:
            print(
                f"d2r retry: study is {new}; nothing to retry"
                + ("" if args.reprocess else " (use --reprocess to run the model again)"),
                file=sys.stderr,
            )
            return 1
        return 0
    finally:
        store.close()


def _retry_destination(store: StudyStore, study_uid: str, destination: str) -> int:
    import sys

    if store.get(study_uid) is None:
        print(f"d2r retry: no study {study_uid}", file=sys.stderr)
        return 1
    delivery = store.delivery(study_uid, destination)
    if delivery is None:
        print(f"d2r retry: study {study_uid} has no delivery to {destination}", file=sys.stderr)
        return 1
    if delivery.state != "failed":
        print(
            f"d2r retry: the delivery to {destination} is {delivery.state}; nothing to retry",
            file=sys.stderr,
        )
        return 1
    store.reset_for_retry(study_uid, destination=destination)
    print(f"{study_uid}: reports will be re-sent to {destination} by the running node")
    return 0


def _set_priority(store: StudyStore, study_uid: str, priority: str) -> bool | None:
    """Set the study's priority; None when there is no such study."""
    import sys

    from d2r_core.priority import Priority

    try:
        before = store.set_priority(study_uid, Priority.parse(priority), source="operator")
    except KeyError:
        print(f"d2r retry: no study {study_uid}", file=sys.stderr)
        return None
    if before == priority:
        print(f"{study_uid}: priority is already {priority}")
        return False
    print(f"{study_uid}: priority {before} -> {priority}")
    return True
