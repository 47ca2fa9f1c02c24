"""Exceptions of the offline training tools.

::

    TrainingError
    ├── DatasetError        a user's dataset is missing files or malformed (names every problem)
    ├── EvaluationInputError  invalid prediction records (names every bad line)
    └── MetricError         a metric failed its own consistency check (e.g. sacrebleu vs BLEU)
"""

from __future__ import annotations

from d2r_core.errors import D2RError


class TrainingError(D2RError):
    """Base of the training package's errors."""


class DatasetError(TrainingError):
    """A dataset on disk is missing files or is malformed.

    Parameters
    ----------
    problems : list of str
        One line per missing or malformed file.
    """

    def __init__(self, dataset: str, problems: list[str]) -> None:
        self.dataset = dataset
        self.problems = list(problems)
        super().__init__(f"{dataset}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))


class EvaluationInputError(TrainingError):
    """Prediction records are invalid; ``problems`` lists ``line N: reason`` entries."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid input:\n  " + "\n  ".join(problems))


class MetricError(TrainingError):
    """A metric disagrees with its cross-check."""
