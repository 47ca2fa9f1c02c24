"""The one place a :class:`~model.predict.Predictor` is built from d2r's model settings.

The worker (:mod:`worker.context`), ``d2r predict`` and ``d2r evaluate`` all open the model
through :func:`open_predictor`, so a setting such as ``D2R_REPORT_CHOICE`` or
``D2R_INPUT_GATE`` means the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from model.predict import Predictor

__all__ = ["ModelOptions", "open_predictor"]


@dataclass(frozen=True)
class ModelOptions:
    """How to open a checkpoint: the model settings, or a command's flags over them.

    ``backend_setting`` and ``engine_setting`` name what chose the backend and the engine folder
    (a setting or a flag), so an error names what to change.
    """

    model_dir: Path
    device: str = "cpu"
    backend: str = "torch"
    engine_dir: Path | None = None
    torch_compile: bool = False
    input_gate: bool = True
    report_choice: str = "consistent"
    lesion_min_score: float | None = None
    backend_setting: str = "D2R_BACKEND"
    engine_setting: str = "D2R_ENGINE_DIR"

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> ModelOptions:
        """The worker's model settings (``D2R_MODEL`` must be set: see ``require_model``)."""
        return cls(
            model_dir=settings.require_model(),
            device=settings.device,
            backend=settings.backend,
            engine_dir=settings.engine_dir,
            torch_compile=settings.torch_compile,
            input_gate=settings.input_gate,
            report_choice=settings.report_choice,
            lesion_min_score=settings.lesion_min_score,
        )


def open_predictor(options: ModelOptions) -> Predictor:
    """Load the checkpoint and start its backend (raises as
    :meth:`~model.predict.Predictor.from_checkpoint` does)."""
    from model.predict import Predictor
    from report.grounding import report_chooser

    return Predictor.from_checkpoint(
        options.model_dir,
        device=options.device,
        lesion_score_threshold=options.lesion_min_score,
        backend=options.backend,
        engine_dir=options.engine_dir,
        torch_compile=options.torch_compile,
        setting=options.backend_setting,
        engine_setting=options.engine_setting,
        input_gate=options.input_gate,
        choose_report=report_chooser(options.report_choice),
    )
