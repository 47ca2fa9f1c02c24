"""The root of d2r's exception tree.

Each package raises its own small tree under :class:`D2RError` and the entry points map it
to an exit status, a DIMSE status or a retry::

    D2RError
     +-- ConfigError                 an invalid setting (also a ValueError)
     +-- dicom_node.errors.NodeError     DICOM in, spool
     +-- studydb.errors.StudyDbError     the study database
     +-- model.errors.ModelError         checkpoint, preprocessing, backends
     +-- report.errors.ReportError       SR construction
     +-- delivery.errors.DeliveryError   senders
     +-- worker.errors.WorkerError       the pipeline's give-up reasons
     +-- training.errors.TrainingError, trt_build.errors.TrtBuildError   offline tools
"""

from __future__ import annotations

__all__ = ["ConfigError", "D2RError"]


class D2RError(Exception):
    """Base class of every error d2r raises on purpose."""


class ConfigError(D2RError, ValueError):
    """An invalid setting; ``str()`` is one line naming the setting.

    Parameters
    ----------
    setting : str
        The variable name, e.g. ``D2R_PORT``.
    message : str
        What is wrong with its value.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message
