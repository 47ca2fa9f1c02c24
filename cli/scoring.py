"""Scoring drafts against signed reports, wired: the labeler of ``d2r evaluate`` passed to
:func:`feedback.scoring.score_pending`, once (``d2r feedback``) or periodically (``d2r node``).

The labeler (medspaCy on a blank spaCy pipeline, ``training.evaluation.labeler``) is part of
the offline tools; an image without them (the node image) has no scoring, and says so once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["Scorer", "load_labeler", "score_now"]

logger = logging.getLogger("d2r")

LabelFunction = Callable[[Sequence[str]], Sequence[Mapping[str, int | None]]]


def load_labeler() -> tuple[LabelFunction, str]:
    """The labeler's function and its ``name version``.

    Raises
    ------
    ImportError
        When the labeler or its libraries (medspaCy, spaCy) are not installed.
    """
    from training.evaluation.labeler import label_reports, labeler_info

    info = labeler_info()
    return label_reports, f"{info['name']} {info['version']}"


def score_now(store: Any, *, batch: int = 100) -> int:
    """Score every signed report not scored yet; how many were."""
    from feedback.scoring import score_pending

    label, name = load_labeler()
    total = 0
    while scored := score_pending(store, label, labeler=name, limit=batch):
        total += scored
    return total


class Scorer:
    """A thread of ``d2r node`` scoring new signed reports every ``seconds``."""

    def __init__(self, store: Any, seconds: float) -> None:
        self._store = store
        self._seconds = seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="d2r-scorer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        # The labeler (spaCy) is loaded at the first signed report, not when the node starts:
        # most nodes start many times before a RIS sends one, and some never get any.
        labeler_checked = False
        while not self._stop.wait(self._seconds):
            try:
                if not self._store.unscored_reports(1):
                    continue
                if not labeler_checked:
                    try:
                        load_labeler()
                    except ImportError as exc:
                        logger.info(
                            "signed reports are not scored here: the labeler is missing (%s)", exc
                        )
                        return
                    labeler_checked = True
                score_now(self._store)
            except Exception:
                logger.exception("scoring signed reports failed; trying again later")
