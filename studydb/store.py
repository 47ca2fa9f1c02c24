"""The study database with all its roles, as the node and the worker open it."""

from __future__ import annotations

from studydb.deliveries import Deliveries
from studydb.ingest import IngestBook
from studydb.lifecycle import Lifecycle
from studydb.retention import Retention
from studydb.views import Views

__all__ = ["StudyStore"]


class StudyStore(IngestBook, Lifecycle, Deliveries, Retention, Views):
    """Study, instance, delivery and event records in a SQLAlchemy database.

    One engine serves every role. A caller that needs one role names that role's class in its
    signature (the status page :class:`~studydb.views.Views`, the receivers
    :class:`~studydb.ingest.IngestBook`), so what it may do is visible in its type.

    Parameters
    ----------
    url : str
        SQLAlchemy URL, e.g. ``sqlite:////var/lib/d2r/d2r.db`` or
        ``postgresql+psycopg://d2r@db/d2r``. An empty database is created by the migrations.
    auto_upgrade : bool
        Upgrade a database at an older schema revision instead of refusing it
        (:func:`studydb.schema.prepare`, which raises a :class:`~studydb.errors.SchemaError`).
    retry_seconds : float
        How long each call retries while the database is unreachable before it raises
        :class:`~studydb.errors.DatabaseUnavailable` (``D2R_DB_RETRY_SECONDS``).
    """
