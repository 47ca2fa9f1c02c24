"""``d2r``: the reporting node's command line.

Each subcommand is a module of :mod:`cli.commands` (``init_model`` is ``d2r init-model``) with a
docstring whose first line is its help, ``add_arguments(parser)`` and ``run(args) -> int``. Command
modules import only the standard library at module level; everything heavy is imported inside
``run()``, so ``d2r node`` never loads torch and ``d2r status`` never loads the model.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

import cli.commands


def _commands() -> dict[str, ModuleType]:
    found = {}
    for info in sorted(pkgutil.iter_modules(cli.commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        found[info.name.replace("_", "-")] = importlib.import_module(f"cli.commands.{info.name}")
    return found


def _help(module: ModuleType) -> str:
    first = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
    return first.split(":", 1)[1].strip() if first.startswith("``") and ":" in first else first


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2r", description="d2r: AI reporting node for chest radiographs (D2R-Net)."
    )
    parser.add_argument(
        "--config", metavar="FILE", help="configuration file (KEY=VALUE lines, D2R_* names)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _commands().items():
        help_text = _help(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_run=module.run)
        module.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from d2r_core.errors import ConfigError
    from studydb.errors import SchemaError

    try:
        return int(args._run(args))
    except ConfigError as exc:  # invalid configuration: one line naming the setting
        print(f"d2r {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except SchemaError as exc:  # the study database does not fit this release: one line
        print(f"d2r {args.command}: database: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
