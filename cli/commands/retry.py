"""``d2r retry STUDY_UID``: re-send a failed study's reports (or reprocess it)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study_uid", help="StudyInstanceUID")
    parser.add_argument(
        "--reprocess",
        action="store_true",
        help="run the model again instead of re-sending the existing reports",
    )


def run(args: argparse.Namespace) -> int:
    import sys

    from cli.runtime import environment
    from dicom_node.settings import NodeSettings
    from dicom_node.studies import RECEIVING, SENDING, StudyStore

    settings = NodeSettings.from_env(environment(args))
    store = StudyStore(settings.database_url)
    try:
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
