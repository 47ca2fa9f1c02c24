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
    from delivery.dimse import AssociationPool
    from observability.audit import AuditLog

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
        self._store: StudyStore | None = None
        self._associations: AssociationPool | None = None

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked pool child: never reuse the parent's handles
            self._pid = os.getpid()
            self._predictor = None
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

    def _load(self) -> Any:
        from worker.predictor import ModelOptions, open_predictor

        settings = self.settings
        path = settings.require_model()
        try:
            predictor = open_predictor(ModelOptions.from_settings(settings))
            # a pinned hash must match what was actually loaded
            settings.verify_model_sha256(predictor.checkpoint_sha256)
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
