"""Exceptions of the study database::

    D2RError
    └── StudyDbError
        ├── DatabaseUnavailable      the study database did not answer within the retry budget
        └── SchemaError              the study database's schema does not fit this release
            ├── SchemaBehindError    an older revision: ``d2r db upgrade`` (or D2R_DB_AUTO_UPGRADE)
            ├── SchemaAheadError     a newer revision than this release knows (a rollback)
            └── UnknownSchemaError   tables without a revision that are not the baseline schema

A receiver answers :class:`DatabaseUnavailable` with a failure status (the sender sends again),
a worker puts its job back on the queue; the entry points print a :class:`SchemaError` as one
line and exit.
"""

from __future__ import annotations

from d2r_core.errors import D2RError

__all__ = [
    "DatabaseUnavailable",
    "SchemaAheadError",
    "SchemaBehindError",
    "SchemaError",
    "StudyDbError",
    "UnknownSchemaError",
]


class StudyDbError(D2RError):
    """Base class of every error raised on purpose by :mod:`studydb`."""


class DatabaseUnavailable(StudyDbError):
    """The study database could not be reached (restart, failover, network) in time.

    Raised once the caller's retry budget is spent; nothing was written. A receiver answers it
    with a failure status, a worker puts its job back on the queue.
    """


class SchemaError(StudyDbError):
    """The study database cannot be used by this release as it is; ``str()`` is one line."""


class SchemaBehindError(SchemaError):
    """The database is at an older revision than this release needs."""


class SchemaAheadError(SchemaError):
    """The database is at a revision this release does not know (written by a newer release)."""


class UnknownSchemaError(SchemaError):
    """The database holds tables, but no revision and not the baseline schema."""
