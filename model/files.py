"""The files of a checkpoint directory and its hash, without torch.

Settings checks (``worker.settings``) and ``d2r serve``'s listener process read these; importing
:mod:`model.checkpoint` or :mod:`model.gate` would load torch into a process that never runs the
model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Final

from model.errors import CheckpointError

WEIGHTS: Final = "weights.safetensors"
CONFIG: Final = "config.json"
VOCAB: Final = "vocab.json"
CLASSES: Final = "classes.json"
INFO: Final = "model.json"
#: the hashed files, in hash order
CHECKPOINT_FILES: Final[tuple[str, ...]] = (WEIGHTS, CONFIG, VOCAB, CLASSES, INFO)
#: optional input-gate statistics (:mod:`model.gate`); not hashed
GATE_FILE: Final = "gate.safetensors"


def checkpoint_sha256(path: Path) -> str:
    """Stable SHA-256 over the checkpoint files (names and contents, fixed order).

    Raises
    ------
    CheckpointError
        When one of :data:`CHECKPOINT_FILES` is missing.
    """
    digest = hashlib.sha256()
    for name in CHECKPOINT_FILES:
        file = Path(path) / name
        if not file.is_file():
            raise CheckpointError(f"{name}: missing from checkpoint {path}")
        inner = hashlib.sha256()
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                inner.update(chunk)
        digest.update(f"{name}\0{inner.hexdigest()}\n".encode())
    return digest.hexdigest()


__all__ = [
    "CHECKPOINT_FILES",
    "CLASSES",
    "CONFIG",
    "GATE_FILE",
    "INFO",
    "VOCAB",
    "WEIGHTS",
    "checkpoint_sha256",
]
