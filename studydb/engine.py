"""The study database's engine: connections, transactions, and retries while the database is
unreachable (see the :mod:`studydb` docstring, "Database outages")."""

from __future__ import annotations

import fcntl
import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from d2r_core.errors import ConfigError
from studydb import schema
from studydb.errors import DatabaseUnavailable
from studydb.transitions import write_event

__all__ = [
    "Database",
    "hold_single_node_lock",
    "make_engine",
    "retrying",
    "transient_database_error",
]

logger = logging.getLogger(__name__)


_P = ParamSpec("_P")
_R = TypeVar("_R")
#: the retry budget of the calls in this context (None: the store's ``retry_seconds``)
_BUDGET: ContextVar[float | None] = ContextVar("d2r_db_retry_budget", default=None)
#: set while a public method runs, so that the methods it calls do not retry on their own
_RETRYING: ContextVar[bool] = ContextVar("d2r_db_retrying", default=False)
#: SQLSTATE classes of errors a new transaction may not meet: connection exception (08),
#: insufficient resources (53, e.g. too many connections), operator intervention (57, e.g. the
#: server shutting down or starting up), transaction rollback (40: serialization, deadlock)
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57")


def transient_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is (momentarily) unreachable or busy, not that the
    statement is wrong: the transaction was rolled back and may simply run again."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return False
    orig = exc.orig
    if type(orig).__module__.startswith("sqlite3"):
        return "locked" in str(orig) or "busy" in str(orig)
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is None:  # no answer from a server at all: refused, reset, closed
        return True
    return str(sqlstate)[:2] in _TRANSIENT_SQLSTATE_CLASSES


def _brief(exc: BaseException) -> str:
    """One line naming a database error (no statement, no parameters)."""
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {first[:200]}"


def retrying(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a study database method again while the database is unreachable, within the
    budget; then raise :class:`DatabaseUnavailable`."""

    @functools.wraps(method)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if _RETRYING.get():
            return method(*args, **kwargs)
        store = args[0]
        budget = _BUDGET.get()
        if budget is None:
            budget = float(getattr(store, "retry_seconds", 0.0))
        deadline = time.monotonic() + budget
        delay = 0.1
        token = _RETRYING.set(True)
        try:
            while True:
                try:
                    return method(*args, **kwargs)
                except sa.exc.DBAPIError as exc:
                    if not transient_database_error(exc):
                        raise
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise DatabaseUnavailable(
                            f"the study database did not answer within {budget:g} s ({_brief(exc)})"
                        ) from exc
                    logger.warning(
                        "study database unreachable (%s); retrying %s for up to %.0f s",
                        _brief(exc),
                        method.__name__,
                        left,
                    )
                    time.sleep(min(delay, left))
                    delay = min(delay * 2, 2.0)
        finally:
            _RETRYING.reset(token)

    return run


class Database:
    """The engine of a study database, its transactions and the retry budget of its calls.

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

    def __init__(self, url: str, *, auto_upgrade: bool = False, retry_seconds: float = 0.0) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError("url must be a non-empty SQLAlchemy URL")
        self.url = url
        self.retry_seconds = retry_seconds
        self.engine: Engine = make_engine(url)
        try:
            schema.prepare(self.engine, auto_upgrade=auto_upgrade)
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        with self.engine.begin() as conn:
            yield conn

    @staticmethod
    @contextmanager
    def retry_budget(seconds: float) -> Iterator[None]:
        """Calls in this block retry an unreachable database for ``seconds`` at most (0: once)."""
        token = _BUDGET.set(max(0.0, seconds))
        try:
            yield
        finally:
            _BUDGET.reset(token)

    @retrying
    def add_event(self, study_uid: str | None, kind: str, detail: str) -> None:
        """Append one event (no PHI: UIDs, states and reasons only)."""
        with self.transaction() as conn:
            write_event(conn, study_uid, kind, detail)


def hold_single_node_lock(url: str) -> IO[bytes] | None:
    """Hold, for this process's life, the lock that makes a SQLite database one node's alone.

    Several nodes share a PostgreSQL database; a SQLite file is one host's, and the assembler
    of a second node on it would compete for its write lock. Returns the open lock file (keep
    it), or None for other databases.

    Raises
    ------
    ConfigError
        Naming ``D2R_DATABASE_URL``, when another running node holds the lock.
    """
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    if parsed.database == ":memory:":
        return None
    path = Path(f"{parsed.database}.node-lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "ab")  # noqa: SIM115 - held open for the life of the process
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(
            "D2R_DATABASE_URL",
            f"another d2r node uses the SQLite database {parsed.database}; several nodes need "
            "one PostgreSQL database (postgresql+psycopg://...)",
        ) from None
    return handle


def make_engine(url: str) -> Engine:
    """The engine of a study database URL (SQLite: WAL, busy timeout, BEGIN IMMEDIATE)."""
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, pool_pre_ping=True
        )

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" below open the transaction: BEGIN IMMEDIATE takes the
            # write lock up front, so read-then-write sequences from several threads and
            # processes wait for each other (busy_timeout) instead of failing.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    connect_args: dict[str, Any] = {}
    if sa.engine.make_url(url).get_backend_name() == "postgresql":
        # a database host that does not answer at all fails a connection attempt in seconds
        connect_args["connect_timeout"] = 5
    return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
