"""What every target shares: instrumentation, the atheris entry point, and property checks."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RSS_LIMIT_ENV",
    "STRICT_ENV",
    "KnownGap",
    "LogWatch",
    "OneInput",
    "PropertyViolation",
    "check",
    "fuzz_main",
    "instrumented",
    "peak_rss_mb",
    "rss_bounded",
    "tolerating",
]

#: one fuzz input in, nothing out; raises :class:`PropertyViolation` (or anything unexpected)
OneInput = Callable[[bytes], None]


class PropertyViolation(AssertionError):
    """A target's property does not hold for an input (atheris reports it as a crash)."""


#: set to 1 to fail on the known gaps too (see :class:`KnownGap`)
STRICT_ENV = "D2R_FUZZ_STRICT"


@dataclass(frozen=True)
class KnownGap:
    """A failure reported to the owner of the code and not fixed yet.

    A target tolerates it (unless ``D2R_FUZZ_STRICT=1``), so that a run goes on finding other
    failures instead of stopping at this one every time. Each has a focused regression test
    beside the code's own tests, marked ``xfail(strict=True)``: once the code is fixed that test
    passes, fails as XPASS, and the gap and the marker are removed together.
    """

    #: what is wrong, in a few words
    summary: str
    #: the file to fix, and the regression test that shows it
    where: str
    test: str
    #: whether an exception raised by the target is this failure
    matches: Callable[[BaseException], bool]


def tolerating(one_input: OneInput, gaps: Sequence[KnownGap]) -> OneInput:
    """``one_input``, returning normally where it fails with one of ``gaps``."""
    if not gaps or os.environ.get(STRICT_ENV) == "1":
        return one_input

    def tolerant(data: bytes) -> None:
        try:
            one_input(data)
        except Exception as exc:
            if not any(gap.matches(exc) for gap in gaps):
                raise

    return tolerant


def check(condition: object, message: str) -> None:
    """Raise :class:`PropertyViolation` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise PropertyViolation(message)


def _fuzzing() -> bool:
    """Whether this process runs a target as its entry point (``python -m fuzz.<target>``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", "") or ""
    return name.startswith("fuzz.") and name != "fuzz.__main__"


@contextlib.contextmanager
def instrumented(*include: str) -> Iterator[None]:
    """Imports in this block get atheris coverage instrumentation when a target runs as an
    entry point (``include``: the top-level packages to instrument); elsewhere (the replay
    tests) plain imports."""
    if not _fuzzing():
        yield
        return
    import atheris

    with atheris.instrument_imports(include=list(include)):
        yield


#: the environment variable the runner names the memory limit in (MiB of peak RSS)
RSS_LIMIT_ENV = "D2R_FUZZ_RSS_LIMIT_MB"


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) in MiB.

    Not ``getrusage``'s ``ru_maxrss``, which libFuzzer's own ``-rss_limit_mb`` reads: Linux
    carries that across ``fork`` and ``exec``, so a target started from a large process (the
    test suite) would start over the limit.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_bounded(one_input: OneInput, limit_mb: float) -> OneInput:
    """``one_input``, raising :class:`PropertyViolation` once the process's peak RSS passes
    ``limit_mb`` (checked after each input, at most every 50 ms)."""
    last = 0.0

    def bounded(data: bytes) -> None:
        nonlocal last
        one_input(data)
        now = time.monotonic()
        if now - last >= 0.05:
            last = now
            if (peak := peak_rss_mb()) > limit_mb:
                raise PropertyViolation(f"peak RSS {peak:.0f} MiB over the limit of {limit_mb:.0f}")

    return bounded


def fuzz_main(harness: Callable[[], contextlib.AbstractContextManager[OneInput]]) -> None:
    """Run ``harness``'s input function under atheris with this process's libFuzzer arguments
    (and the memory limit the runner names in :data:`RSS_LIMIT_ENV`)."""
    import atheris

    with harness() as one_input:
        limit = float(os.environ.get(RSS_LIMIT_ENV, "0") or 0)
        atheris.Setup(sys.argv, rss_bounded(one_input, limit) if limit > 0 else one_input)
        atheris.Fuzz()


class LogWatch(logging.Handler):
    """Remembers log records that mean something went wrong unexpectedly.

    A record with a traceback (``logger.exception``) at ERROR or above is a failure the code
    did not expect; with ``forbid`` each formatted message is also given to ``forbid``, which
    returns a complaint (or None). :meth:`raise_found` raises the first one, in the fuzzing
    thread, and forgets them all.
    """

    def __init__(
        self,
        *loggers: str,
        forbid: Callable[[str], str | None] | None = None,
        ignore: Callable[[logging.LogRecord], bool] | None = None,
    ) -> None:
        super().__init__(logging.DEBUG)
        self._found: list[str] = []
        self._lock = threading.Lock()
        self._forbid = forbid
        self._ignore = ignore
        self._loggers = loggers or ("",)

    def install(self, level: int | None = None) -> LogWatch:
        """Attach to the loggers (and set their level, when given, so that INFO is seen)."""
        for name in self._loggers:
            log = logging.getLogger(name)
            log.addHandler(self)
            if level is not None:
                log.setLevel(level)
        return self

    def uninstall(self) -> None:
        for name in self._loggers:
            logging.getLogger(name).removeHandler(self)

    def __enter__(self) -> LogWatch:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def emit(self, record: logging.LogRecord) -> None:
        if self._ignore is not None and self._ignore(record):
            return
        complaint: str | None = None
        if record.exc_info and record.levelno >= logging.ERROR:
            exc = record.exc_info[1]
            complaint = (
                f"unexpected exception logged by {record.name}: {record.getMessage()}\n"
                + "".join(traceback.format_exception(exc))
            )
        elif self._forbid is not None:
            complaint = self._forbid(record.getMessage())
            if complaint is not None:
                complaint = f"{record.name}: {complaint}: {record.getMessage()!r}"
        if complaint is not None:
            with self._lock:
                self._found.append(complaint)

    def raise_found(self) -> None:
        with self._lock:
            found, self._found = self._found, []
        if found:
            raise PropertyViolation(found[0])


def quiet_logging() -> None:
    """Keep log records and warnings about malformed input off the fuzzer's terminal (a
    :class:`LogWatch` still sees the records)."""
    logging.getLogger().addHandler(logging.NullHandler())
    logging.lastResort = None
    warnings.simplefilter("ignore")


def describe(obj: Any) -> str:
    """A short text for a failure message."""
    text = repr(obj)
    return text if len(text) <= 300 else text[:300] + "..."
