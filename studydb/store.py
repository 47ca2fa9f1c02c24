"""The study database with all its roles, as the node and the worker open it."""

from __future__ import annotations

from studydb.deliveries import Deliveries
from studydb.feedback import SignedReports
from studydb.ingest import IngestBook
from studydb.lifecycle import Lifecycle
from studydb.retention import Retention
from studydb.views import Views

__all__ = ["StudyStore"]


class StudyStore(IngestBook, Lifecycle, Deliveries, Retention, Views, SignedReports):
    """Study, instance, delivery, event and signed-report records in a SQLAlchemy database.

    One engine serves every role. A caller that needs one role names that role's class in its
    signature (the status page :class:`~studydb.views.Views`, the receivers
    :class:`~studydb.ingest.IngestBook`), so what it may do is visible in its type.

    Its parameters are :class:`~studydb.engine.Database`'s: the URL, ``auto_upgrade`` and
    ``retry_seconds``.
    """
