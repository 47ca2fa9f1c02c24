"""``d2r config``: list the settings with their defaults; ``--check``: the effective configuration.

``d2r config --check`` reads the configuration as ``d2r node``, ``d2r worker`` and ``d2r serve``
do (the config file of ``--config`` or ``D2R_CONFIG``, overridden by the environment), builds
every package's settings from it and prints each setting with where its value came from
(default, config file or environment) and the value, passwords and tokens in URLs masked. An
invalid value exits 2 with the one-line error naming the setting. ``D2R_*`` names that no
setting reads (a typo) are listed without their values.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from d2r_core.settings_spec import Setting

#: ``D2R_*`` variables that are no settings: the config file's own path, and the broker that
#: ``d2r serve`` hands its worker processes
NOT_SETTINGS = ("D2R_CONFIG", "D2R_DEFAULT_BROKER")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate every setting and print its source and value (secrets masked); "
        "exit 2 with one line naming an invalid setting",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="configuration file (as d2r --config FILE; default: D2R_CONFIG)",
    )


def declared_settings() -> tuple[Setting[Any], ...]:
    """Every ``D2R_*`` setting of the product, in documentation order."""
    from d2r_core.settings_spec import catalogue
    from delivery.settings import SETTINGS as DELIVERY
    from dicom_node.settings import SETTINGS as NODE
    from feedback.settings import SETTINGS as FEEDBACK
    from observability.settings import SETTINGS as OBSERVABILITY
    from worker.settings import SETTINGS as WORKER

    return catalogue(NODE, DELIVERY, FEEDBACK, WORKER, OBSERVABILITY)


def validate(env: Mapping[str, str]) -> None:
    """Build every package's settings from ``env``, as the entry points do.

    Raises
    ------
    ConfigError
        Naming the first invalid setting.
    """
    from dicom_node.settings import NodeSettings
    from feedback.settings import FeedbackSettings
    from observability.settings import ObservabilitySettings
    from worker.settings import WorkerSettings

    NodeSettings.from_env(env)
    FeedbackSettings.from_env(env)
    WorkerSettings.from_env(env)  # also the delivery settings
    ObservabilitySettings.from_env(env)


def effective_lines(
    settings: tuple[Setting[Any], ...],
    file_values: Mapping[str, str],
    environ: Mapping[str, str],
) -> list[str]:
    """One line per setting (name, source, value with secrets masked), then the ``D2R_*``
    names no setting reads (without their values)."""
    env = {**file_values, **environ}  # as merged_environment: the environment wins
    width = max(len(s.name) for s in settings)
    lines = [f"{'SETTING':<{width}}  {'SOURCE':<11}  VALUE"]
    for setting in settings:
        source = setting.source(file_values, environ)
        lines.append(f"{setting.name:<{width}}  {source:<11}  {setting.shown_value(env)}")
    known = {s.name for s in settings} | set(NOT_SETTINGS)
    unknown = [
        (name, where)
        for where, values in (("config file", file_values), ("environment", environ))
        for name in sorted(values)
        if name.startswith("D2R_") and name not in known
    ]
    for name, where in unknown:
        lines.append(f"{name:<{width}}  {where:<11}  (not a d2r setting: ignored)")
    return lines


def reference_lines(settings: tuple[Setting[Any], ...]) -> list[str]:
    """Every setting with its default and meaning, by section."""
    import textwrap

    from d2r_core.settings_spec import plain_text

    lines: list[str] = []
    group = None
    for setting in settings:
        if setting.group is not group:
            group = setting.group
            lines.extend(([""] if lines else []) + [f"[{group.value}]"])
        lines.append(f"{setting.name} (default: {plain_text(setting.shown_default)})")
        lines.extend(
            textwrap.wrap(setting.plain_doc, 96, initial_indent="    ", subsequent_indent="    ")
        )
    return lines


def run(args: argparse.Namespace) -> int:
    import os

    from cli.runtime import environment
    from d2r_core.config import read_config_file

    settings = declared_settings()
    if not args.check:
        print("\n".join(reference_lines(settings)))
        return 0
    path = getattr(args, "config", None) or os.environ.get("D2R_CONFIG")
    validate(environment(args))
    file_values = read_config_file(path) if path else {}
    print(f"Configuration file: {path or 'none (the environment and the defaults)'}")
    print("\n".join(effective_lines(settings, file_values, os.environ)))
    return 0
