"""``d2r``: one entry point, subcommands dispatched with lazy imports.

Each subcommand lives in its own module under :mod:`cli.commands` exposing
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only
when their subcommand runs, so ``d2r node`` never loads torch and
``d2r status`` never loads the model.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: subcommand -> (module under cli.commands, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve", "listener + worker in one command on embedded defaults (no Redis)"),
    "node": ("node", "run the DICOM listener (production split, Redis broker)"),
    "worker": ("worker", "run a D2R-Net Celery worker (production split, Redis broker)"),
    "status": ("status", "show recent studies and their states"),
    "retry": ("retry", "re-send the reports of a failed study"),
    "predict": ("predict", "run D2R-Net on DICOM files and print the report and lesions"),
    "init-model": (
        "init_model",
        "write a randomly initialised checkpoint (smoke tests, deployment checks)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2r", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", metavar="FILE", help="configuration file (KEY=VALUE lines, D2R_* names)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        _load(module).add_arguments(p)
    return parser


def _load(module: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(f"cli.commands.{module}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dicom_node.settings import ConfigError

    try:
        return int(_load(args._module).run(args))
    except ConfigError as exc:  # invalid configuration: one line naming the setting
        print(f"d2r {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
