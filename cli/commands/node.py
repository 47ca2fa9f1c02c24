"""``d2r node``: the DICOM listener, study assembler and reconciler (production split)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Configuration: D2R_* environment variables (see README)."


def run(args: argparse.Namespace) -> int:
    from cli.node import run_node
    from cli.runtime import (
        configure_logging,
        environment,
        multiprocess_dir,
        stop_event_on_signals,
        use_multiprocess_metrics,
    )
    from dicom_node.settings import NodeSettings

    env = environment(args)
    configure_logging(env)
    node = NodeSettings.from_env(env)
    if node.listener_processes > 1 and multiprocess_dir() is None:
        # one /metrics for all listener processes: each writes to this folder, one per node
        # name (nodes sharing the data folder must not clean each other's files)
        use_multiprocess_metrics(node.spool_dir.parent / "metrics" / node.node_name, clean=True)
    run_node(env, stop_event_on_signals(), default_broker=None)
    return 0
