"""``d2r node``: the DICOM listener, study assembler and reconciler (production split)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Configuration: D2R_* environment variables (see README)."


def run(args: argparse.Namespace) -> int:
    from cli.runtime import configure_logging, environment, run_node, stop_event_on_signals

    env = environment(args)
    configure_logging(env)
    run_node(env, stop_event_on_signals(), default_broker=None)
    return 0
