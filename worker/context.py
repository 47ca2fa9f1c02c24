"""What a worker process holds between tasks: the model, the study database, open associations.

:class:`WorkerContext` loads each lazily, once per process; a forked pool child never reuses its
parent's handles.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from observability import metrics
from studydb.store import StudyStore
from worker.errors import PredictionError
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from pathlib import Path

    from delivery.dimse import AssociationPool
    from observability.audit import AuditLog
    from studydb.drift import GateReference

__all__ = ["WorkerContext"]

#: the logger these lines have always come from (operators' log filters name it)
logger = logging.getLogger("worker.tasks")


class WorkerContext:
    """Per-process resources: the model (loaded once) and the study database."""

    def __init__(self, settings: WorkerSettings, *, audit: AuditLog | None = None) -> None:
        self.settings = settings
        self.audit = audit
        self._lock = threading.Lock()
        self._pid = -1
        self._predictor: Any = None
        self._gate: GateReference | None = None
        self._store: StudyStore | None = None
        self._associations: AssociationPool | None = None

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked pool child: never reuse the parent's handles
            self._pid = os.getpid()
            self._predictor = None
            self._gate = None
            self._store = None
            self._associations = None

    @property
    def associations(self) -> AssociationPool:
        """Associations to DICOM destinations, kept between studies
        (``D2R_DICOM_ASSOCIATION_IDLE_SECONDS``)."""
        with self._lock:
            self._check_pid()
            if self._associations is None:
                from delivery.dimse import AssociationPool

                self._associations = AssociationPool(
                    self.settings.delivery.association_idle_seconds
                )
            return self._associations

    def close_associations(self) -> None:
        """Release the associations this process keeps open (at shutdown)."""
        with self._lock:
            pool = self._associations if self._pid == os.getpid() else None
            self._associations = None
        if pool is not None:
            pool.close()

    @property
    def store(self) -> StudyStore:
        """The study database (``D2R_DATABASE_URL``)."""
        with self._lock:
            self._check_pid()
            if self._store is None:
                self._store = StudyStore(
                    self.settings.node.database_url,
                    retry_seconds=self.settings.node.db_retry_seconds,
                )
            return self._store

    @property
    def predictor(self) -> Any:
        """The model (:class:`model.predict.Predictor`), loaded on first use.

        Raises
        ------
        PredictionError
            The model cannot be loaded, or is not the pinned one (``D2R_MODEL_SHA256``).
        """
        with self._lock:
            self._check_pid()
            if self._predictor is None:
                self._predictor = self._load()
            return self._predictor

    @property
    def gate_reference(self) -> GateReference | None:
        """The calibration of the loaded model's input gate, recorded with each study's gate
        score for drift monitoring (None: the gate is off). Loads the model first.

        Raises
        ------
        PredictionError
            As :attr:`predictor`.
        """
        _ = self.predictor
        return self._gate

    def _load(self) -> Any:
        from worker.predictor import ModelOptions, open_predictor

        settings = self.settings
        path = settings.require_model()
        try:
            predictor = open_predictor(ModelOptions.from_settings(settings))
            # a pinned hash must match what was actually loaded
            settings.verify_model_sha256(predictor.checkpoint_sha256)
            self._gate = _gate_reference(path, predictor) if predictor.input_gate else None
        except Exception as exc:
            raise PredictionError(f"cannot load the model from {path}: {exc}") from exc
        choice = predictor.backend_choice
        logger.info(
            "model %s %s loaded (sha256 %s), backend %s",
            predictor.name,
            predictor.version,
            predictor.checkpoint_sha256[:12],
            choice.describe(),
        )
        metrics.set_model_info(predictor.name, predictor.version)
        metrics.set_backend_info(choice.backend, choice.device, choice.policy, choice.fallback)
        return predictor


def _gate_reference(model_dir: Path, predictor: Any) -> GateReference | None:
    """The calibration of the input gate in ``model_dir`` (None: it has none). A calibration
    without the reference distribution of the score is said once: its score drift is not
    measured."""
    from model.gate import load_calibration
    from studydb.drift import GateReference

    calibration = load_calibration(model_dir)
    if calibration is None:
        return None
    if not calibration.reference:
        logger.warning(
            "the input gate of model %s %s keeps no reference distribution of its scores, so "
            "their drift is not measured; d2r calibrate-gate --model DIR --data DIR writes one",
            predictor.name,
            predictor.version,
        )
    return GateReference(
        threshold=calibration.threshold,
        percentile=calibration.percentile,
        calibration_images=calibration.calibration_images,
        quantiles=calibration.reference,
    )
