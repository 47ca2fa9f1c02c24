"""Exit codes and error lines shared by the offline model commands (predict, export, engines)."""

from __future__ import annotations

import sys
from pathlib import Path

EXIT_FAILURE = 1
EXIT_USAGE = 2


def fail(command: str, message: str, code: int) -> int:
    """Print one ``d2r COMMAND: message`` line to stderr and return ``code``."""
    print(f"d2r {command}: {message}", file=sys.stderr)
    return code


def checkpoint_problem(model_dir: str | None) -> str | None:
    """Why ``model_dir`` (``--model`` or ``D2R_MODEL``) cannot be used, or None."""
    if not model_dir:
        return "no model: pass --model DIR or set D2R_MODEL"
    if not Path(model_dir).is_dir():
        return f"{model_dir}: not a checkpoint directory"
    return None
