"""Peak resident memory of running processes, read from ``/proc`` (Linux).

``echo 5 > /proc/PID/clear_refs`` resets a process's peak resident set (VmHWM) to its current
resident set (VmRSS); reading VmHWM afterwards gives the peak since the reset. Both need the
same user as the process (or root).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

__all__ = ["PeakMemory", "descendants", "status_kib"]

MIB_KIB = 1024


def status_kib(pid: int, field: str) -> int | None:
    """A ``kB`` field of ``/proc/PID/status`` (``VmHWM``, ``VmRSS``...); None once it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def descendants(pid: int) -> list[int]:
    """Every child of ``pid``, their children and so on (from ``/proc/PID/task/*/children``)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
                for child in map(int, text.split()):
                    out += [child, *descendants(child)]
    return out


class PeakMemory:
    """Peak resident-set growth of named groups of processes between :meth:`reset` and
    :meth:`growth_mib`.

    Parameters
    ----------
    groups : mapping of str to callable
        Each name's processes, asked again at every call (a restarted worker has a new pid).
    """

    def __init__(self, groups: Mapping[str, Callable[[], Iterable[int]]]) -> None:
        self.groups = dict(groups)
        self._base: dict[int, int] = {}

    def reset(self) -> None:
        self._base = {}
        for pids in self.groups.values():
            for pid in pids():
                with contextlib.suppress(OSError):
                    Path(f"/proc/{pid}/clear_refs").write_text("5")
                rss = status_kib(pid, "VmRSS")
                if rss is not None:
                    self._base[pid] = rss

    def growth_mib(self) -> dict[str, float]:
        """Per group: the sum over its processes of peak minus resident set at the reset
        (the whole peak of a process started since), in MiB."""
        out: dict[str, float] = {}
        for name, pids in self.groups.items():
            total = 0
            for pid in pids():
                hwm = status_kib(pid, "VmHWM")
                if hwm is not None:
                    total += max(0, hwm - self._base.get(pid, 0))
            out[name] = total / MIB_KIB
        return out
