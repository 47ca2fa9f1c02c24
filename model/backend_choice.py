"""``D2R_BACKEND=auto``: the fastest backend verified for this checkpoint on this device.

The policy (``docs/backends.md``, "Choosing a backend")::

    device   backend                                         when
    cpu      onnxruntime  over the export cache's entry       the export of this checkpoint
                                                              passed its parity check
             torch        otherwise (the reason is recorded)
    cuda     tensorrt     D2R_ENGINE_DIR holds engines of this checkpoint, GPU and TensorRT
             torch        otherwise, on CUDA (fp32)

The export cache behind the CPU choice is :mod:`model.export_cache`.

An explicit ``torch``, ``onnxruntime`` or ``tensorrt`` never comes here: it starts that backend
or refuses (:func:`model.backends.create_backend`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.backends import ONNXRUNTIME, TENSORRT, TORCH

AUTO = "auto"

#: why ``auto`` did not take its first choice: the ``reason`` label of
#: ``d2r_backend_fallbacks_total`` (a closed set, so the metric stays bounded)
FALLBACK_REASONS = (
    "onnxruntime_missing",
    "export_failed",
    "parity_failed",
    "cache_unusable",
    "load_failed",
    "engine_unusable",
)


@dataclass(frozen=True)
class CacheOutcome:
    """What :func:`model.export_cache.prepare_export` found or made: an entry to load, or why
    there is none."""

    export_dir: Path | None
    created: bool = False
    fallback: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class BackendChoice:
    """The backend a process runs and why.

    Parameters
    ----------
    backend : str
        ``torch``, ``onnxruntime`` or ``tensorrt``.
    engine_dir : Path or None
        The ONNX export or engine folder the backend loads (None for torch).
    policy : str
        ``auto`` or ``explicit`` (the setting named the backend).
    device : str
        The torch device.
    fallback : str or None
        One of :data:`FALLBACK_REASONS` when ``auto`` runs torch instead of its first choice.
    detail : str
        The reason in words (no patient data: paths, hashes and library messages only).
    """

    backend: str
    engine_dir: Path | None = None
    policy: str = "explicit"
    device: str = "cpu"
    fallback: str | None = None
    detail: str = ""

    def describe(self) -> str:
        """One line for the start-up log, ``/readyz`` and the SR's algorithm parameters.

        >>> BackendChoice("onnxruntime", policy="auto", detail="export checked").describe()
        'onnxruntime on cpu (D2R_BACKEND=auto: export checked)'
        >>> BackendChoice("torch", policy="auto", fallback="parity_failed").describe()
        'torch on cpu (D2R_BACKEND=auto, fallback parity_failed)'
        """
        why = f"D2R_BACKEND={self.policy}" if self.policy == AUTO else "set explicitly"
        if self.fallback is not None:
            why += f", fallback {self.fallback}"
        if self.detail:
            why += f": {self.detail}"
        return f"{self.backend} on {self.device} ({why})"


# --------------------------------------------------------------------------- the policy


def choose_cuda(*, engine_dir: Path | None, device: str) -> BackendChoice:
    """``auto`` on a GPU: TensorRT when ``D2R_ENGINE_DIR`` names an engine folder (the engine
    is checked as it loads; one that does not fit gives way to torch), else torch on CUDA."""
    if engine_dir is not None:
        return BackendChoice(TENSORRT, engine_dir, AUTO, device, detail="engine folder set")
    return BackendChoice(TORCH, None, AUTO, device, detail="no TensorRT engine configured")


def choose_cpu(outcome: CacheOutcome, *, device: str = "cpu") -> BackendChoice:
    """``auto`` on the CPU: onnxruntime over a checked cache entry, else torch with why."""
    if outcome.export_dir is not None:
        return BackendChoice(
            ONNXRUNTIME,
            outcome.export_dir,
            AUTO,
            device,
            detail=f"ONNX export of {outcome.export_dir.name[:12]} checked against torch",
        )
    return BackendChoice(
        TORCH, None, AUTO, device, fallback=outcome.fallback, detail=outcome.detail
    )


__all__ = [
    "AUTO",
    "FALLBACK_REASONS",
    "BackendChoice",
    "CacheOutcome",
    "choose_cpu",
    "choose_cuda",
]
