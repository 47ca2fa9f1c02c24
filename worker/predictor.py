"""The one place a :class:`~model.predict.Predictor` is built from d2r's model settings.

The worker (:mod:`worker.context`), ``d2r predict`` and ``d2r evaluate`` all open the model
through :func:`open_predictor`, so a setting such as ``D2R_REPORT_CHOICE``, ``D2R_INPUT_GATE``
or ``D2R_BACKEND=auto`` means the same everywhere. With ``auto``, :func:`choose_backend`
applies the policy of :mod:`model.backend_choice`; :func:`prepare_backend` makes the checked
ONNX export in a process of its own, so that a worker's pool children find it ready.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from worker.settings import WorkerSettings, default_backend_cache_dir

if TYPE_CHECKING:
    from model.backend_choice import BackendChoice
    from model.predict import Predictor

__all__ = ["ModelOptions", "choose_backend", "open_predictor", "prepare_backend"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelOptions:
    """How to open a checkpoint: the model settings, or a command's flags over them.

    ``backend_setting`` and ``engine_setting`` name what chose the backend and the engine folder
    (a setting or a flag), so an error names what to change.
    """

    model_dir: Path
    device: str = "cpu"
    backend: str = "auto"
    engine_dir: Path | None = None
    #: the export cache of ``auto`` (None: ``backend-cache`` beside the default spool)
    cache_dir: Path | None = None
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
            cache_dir=settings.backend_cache,
            torch_compile=settings.torch_compile,
            input_gate=settings.input_gate,
            report_choice=settings.report_choice,
            lesion_min_score=settings.lesion_min_score,
        )


def _cache_dir(options: ModelOptions) -> Path:
    from dicom_node.settings import SPOOL_DIR

    return options.cache_dir or default_backend_cache_dir(SPOOL_DIR.default)


def choose_backend(options: ModelOptions) -> BackendChoice:
    """The backend :func:`open_predictor` starts first: the one named, or ``auto``'s choice
    (which makes and checks the ONNX export on the CPU when the cache has none yet)."""
    from model.backend_choice import AUTO, BackendChoice, choose_cpu, choose_cuda
    from model.errors import CheckpointError
    from model.export_cache import prepare_export
    from model.files import checkpoint_sha256

    if options.backend != AUTO:
        return BackendChoice(options.backend, options.engine_dir, device=options.device)
    if options.device.startswith("cuda"):
        return choose_cuda(engine_dir=options.engine_dir, device=options.device)
    try:
        sha = checkpoint_sha256(options.model_dir)
    except CheckpointError:  # loading it names what is wrong with it
        return BackendChoice("torch", None, AUTO, options.device, detail="checkpoint unreadable")
    outcome = prepare_export(options.model_dir, sha, _cache_dir(options))
    return choose_cpu(outcome, device=options.device)


def prepare_backend(options: ModelOptions) -> BackendChoice | None:
    """Make ``auto``'s checked export now, in a fresh process, and return the choice (None
    when there is nothing to prepare: an explicit backend, or a GPU).

    The worker calls this before its pool starts: the export and the parity check load torch
    and spawn threads, which a process that later forks must not do, and a pool child must
    start in seconds.
    """
    from model.backend_choice import AUTO, choose_cpu
    from model.export_cache import prepare_export

    if options.backend != AUTO or options.device.startswith("cuda"):
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from model.files import checkpoint_sha256

    sha = checkpoint_sha256(options.model_dir)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        outcome = pool.submit(prepare_export, options.model_dir, sha, _cache_dir(options)).result()
    choice = choose_cpu(outcome, device=options.device)
    if choice.fallback is not None:
        logger.warning("D2R_BACKEND=auto runs torch: %s", choice.detail)
    elif outcome.created:
        logger.info("D2R_BACKEND=auto: exported and checked %s", outcome.export_dir)
    return choice


def open_predictor(options: ModelOptions) -> Predictor:
    """Load the checkpoint and start its backend (raises as
    :meth:`~model.predict.Predictor.from_checkpoint` does).

    With ``auto``, a first choice that does not start (an export or engine that fails to
    load) gives way to torch, with the reason in :attr:`Predictor.backend_choice`; an
    explicit backend is started or refused, never replaced.
    """
    from model.backend_choice import AUTO, BackendChoice
    from model.backends import TORCH, BackendError

    choice = choose_backend(options)
    try:
        return _open(options, choice)
    except BackendError as e:
        if choice.policy != AUTO or choice.backend == TORCH:
            raise
        reason = "engine_unusable" if choice.device.startswith("cuda") else "load_failed"
        logger.warning("D2R_BACKEND=auto: %s does not start (%s); running torch", choice.backend, e)
        fallback = BackendChoice(
            TORCH, None, AUTO, options.device, fallback=reason, detail=str(e)[:200]
        )
        return _open(options, fallback)


def _open(options: ModelOptions, choice: BackendChoice) -> Predictor:
    from model.predict import Predictor
    from report.grounding import report_chooser

    predictor = Predictor.from_checkpoint(
        options.model_dir,
        device=options.device,
        lesion_score_threshold=options.lesion_min_score,
        backend=choice.backend,
        engine_dir=choice.engine_dir,
        torch_compile=options.torch_compile,
        setting=options.backend_setting,
        engine_setting=options.engine_setting,
        input_gate=options.input_gate,
        choose_report=report_chooser(options.report_choice),
    )
    predictor.backend_choice = choice
    return predictor
