"""Revision of the study database: the start-up check and ``d2r db upgrade`` (Alembic).

The migration scripts ship inside the package (:data:`SCRIPT_LOCATION`, ``studydb/migrations``),
so an installed wheel upgrades its own database. What a database is, at start:

===========  ==================================================================================
state        meaning and what :func:`prepare` does
===========  ==================================================================================
``empty``    no d2r tables: created by running every migration (under the migration lock)
``legacy``   d2r tables without a revision table (a release before migrations): compared with the
             baseline revision's tables and columns and, when they match, stamped as the baseline
``current``  at the newest revision this release knows: nothing to do
``behind``   at an older revision: :class:`~dicom_node.errors.SchemaBehindError` naming
             ``d2r db upgrade``, or upgraded under the lock with ``auto_upgrade``
``ahead``    at a revision this release does not know (a rollback after an upgrade):
             :class:`~dicom_node.errors.SchemaAheadError`
===========  ==================================================================================

Upgrades run under a lock so that several processes starting at once upgrade only once: an
exclusive ``flock`` on ``<database file>.migrate-lock`` for SQLite, a session advisory lock for
PostgreSQL (whose DDL is transactional as well).
"""

from __future__ import annotations

import fcntl
import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import Connection, Engine

from studydb.errors import SchemaAheadError, SchemaBehindError, UnknownSchemaError

__all__ = [
    "BASELINE",
    "SCRIPT_LOCATION",
    "SchemaState",
    "current_state",
    "prepare",
    "upgrade",
]

logger = logging.getLogger(__name__)


class _QuietAlembic(logging.Filter):
    """Drops Alembic's per-run chatter; "Running upgrade 0001 -> 0002" stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Context impl", "Will assume"))


logging.getLogger("alembic.runtime.migration").addFilter(_QuietAlembic())

#: The folder of the migration scripts (``env.py``, ``versions/``).
SCRIPT_LOCATION = Path(__file__).resolve().parent / "migrations"
#: The revision of the schema of releases before migrations.
BASELINE = "0001"
#: The PostgreSQL advisory lock key of migrations (any constant; "d2rmigr" in ASCII).
_PG_LOCK_KEY = 0x6432726D69677272
_VERSION_TABLE = "alembic_version"
_UPGRADE_HINT = "run `d2r db upgrade` (after a backup), or set D2R_DB_AUTO_UPGRADE=true"


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands: ``state`` is empty, legacy, current, behind or ahead."""

    state: str
    current: str | None
    head: str


def _config(script_location: Path, connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.attributes["connection"] = connection
    return cfg


def _head(script_location: Path) -> str:
    head = ScriptDirectory.from_config(_config(script_location)).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations in {script_location}")
    return head


def _known(script_location: Path, revision: str) -> bool:
    try:
        script = ScriptDirectory.from_config(_config(script_location))
        return script.get_revision(revision) is not None
    except CommandError:
        return False


def _state(conn: Connection, script_location: Path) -> SchemaState:
    head = _head(script_location)
    tables = set(sa.inspect(conn).get_table_names())
    current = (
        MigrationContext.configure(conn).get_current_revision()
        if _VERSION_TABLE in tables
        else None
    )
    if current is None:
        state = "legacy" if tables & set(_baseline_columns()) else "empty"
    elif current == head:
        state = "current"
    else:
        state = "behind" if _known(script_location, current) else "ahead"
    return SchemaState(state=state, current=current, head=head)


def current_state(engine: Engine, *, script_location: Path | None = None) -> SchemaState:
    """Where ``engine``'s database stands against the migrations (reads only)."""
    with engine.connect() as conn:
        return _state(conn, script_location or SCRIPT_LOCATION)


@functools.cache
def _baseline_columns() -> dict[str, frozenset[str]]:
    """Tables and column names of the baseline revision, built in an in-memory SQLite."""
    from studydb.migrations.versions import r0001_baseline

    engine = sa.create_engine("sqlite://")
    try:
        with engine.begin() as conn, Operations.context(MigrationContext.configure(conn)):
            r0001_baseline.upgrade()
            insp = sa.inspect(conn)
            return {
                t: frozenset(c["name"] for c in insp.get_columns(t))
                for t in insp.get_table_names()
                if t != _VERSION_TABLE
            }
    finally:
        engine.dispose()


def _check_baseline(conn: Connection) -> None:
    insp = sa.inspect(conn)
    present = set(insp.get_table_names())
    problems = []
    for table, columns in sorted(_baseline_columns().items()):
        if table not in present:
            problems.append(f"table {table} missing")
            continue
        have = {c["name"] for c in insp.get_columns(table)}
        if missing := sorted(columns - have):
            problems.append(f"{table} lacks {', '.join(missing)}")
        if extra := sorted(have - columns):
            problems.append(f"{table} has unknown {', '.join(extra)}")
    if problems:
        raise UnknownSchemaError(
            "the database has d2r tables but no revision, and they are not the baseline schema "
            f"({'; '.join(problems)}); restore a backup of a d2r database or use an empty one"
        )


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction, held under the database's migration lock."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        with engine.connect() as conn:
            conn.execute(sa.select(sa.func.pg_advisory_lock(_PG_LOCK_KEY)))
            conn.commit()
            try:
                with conn.begin():
                    yield conn
            finally:
                conn.execute(sa.select(sa.func.pg_advisory_unlock(_PG_LOCK_KEY)))
                conn.commit()
        return
    database = url.database if url.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        with engine.begin() as conn:
            yield conn
        return
    lock_path = Path(f"{database}.migrate-lock")
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with engine.begin() as conn:
                yield conn
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def upgrade(
    engine: Engine, *, target: str = "head", script_location: Path | None = None
) -> tuple[SchemaState, SchemaState]:
    """Bring the database to ``target`` under the migration lock; returns (before, after).

    An empty database is created by the migrations; a legacy one is checked against the
    baseline and stamped first.

    Raises
    ------
    SchemaAheadError
        The database is at a revision these migrations do not know.
    UnknownSchemaError
        Tables without a revision that are not the baseline.
    """
    location = script_location or SCRIPT_LOCATION
    with _migration_lock(engine) as conn:
        before = _state(conn, location)
        if before.state == "ahead":
            raise _ahead(before)
        cfg = _config(location, conn)
        if before.state == "legacy":
            _check_baseline(conn)
            command.stamp(cfg, BASELINE)
            logger.info("database without a revision is the baseline; stamped %s", BASELINE)
        command.upgrade(cfg, target)
        after = _state(conn, location)
    if before.current != after.current:
        logger.info(
            "database upgraded from %s to %s", before.current or before.state, after.current
        )
    return before, after


def _ahead(state: SchemaState) -> SchemaAheadError:
    return SchemaAheadError(
        f"the database is at revision {state.current}, which this release (newest revision "
        f"{state.head}) does not know: a newer d2r upgraded it; run that release, or restore "
        "the backup taken before the upgrade (see docs/operations.md, rollback)"
    )


def prepare(
    engine: Engine, *, auto_upgrade: bool = False, script_location: Path | None = None
) -> SchemaState:
    """The start-up check: make the database usable by this release, or refuse.

    Creates an empty database, stamps a legacy one, upgrades a database behind only with
    ``auto_upgrade``. Returns the state found before any change.

    Raises
    ------
    SchemaBehindError
        Behind, without ``auto_upgrade`` (the message names ``d2r db upgrade``).
    SchemaAheadError, UnknownSchemaError
        See :func:`upgrade`.
    """
    location = script_location or SCRIPT_LOCATION
    found = current_state(engine, script_location=location)
    if found.state == "current":
        return found
    if found.state == "ahead":
        raise _ahead(found)
    if found.state == "behind" and not auto_upgrade:
        raise SchemaBehindError(
            f"the database is at revision {found.current}, this release needs {found.head}: "
            + _UPGRADE_HINT
        )
    if found.state == "legacy" and not auto_upgrade and found.head != BASELINE:
        with _migration_lock(engine) as conn:
            if _state(conn, location).state == "legacy":
                _check_baseline(conn)
                command.stamp(_config(location, conn), BASELINE)
        raise SchemaBehindError(
            f"the database is at the baseline revision {BASELINE} (stamped now), this release "
            f"needs {found.head}: " + _UPGRADE_HINT
        )
    upgrade(engine, script_location=location)
    return found
