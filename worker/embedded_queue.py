"""The embedded queue of ``d2r serve`` (``D2R_BROKER_URL=filesystem://``), served by priority.

kombu's file-system transport writes each message to a file named after the time it was sent
and hands out the first file in name order, so it serves messages in arrival order whatever
their priority. :class:`Transport` names each file after the message's priority first
(:func:`worker.messages.broker_priority`: 0 for ``stat`` ... 9 for ``low``), then the time, so
the next message a worker takes is the most urgent one, the oldest first within a priority, as
on Redis. The files keep kombu's ``<name>.<queue>.msg`` form (the queue-depth gauge reads it).
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils import json as kombu_json

__all__ = ["Transport", "message_file_name"]

#: kombu's JSON encoder (it also writes the types kombu reads back)
_dumps = cast(Callable[[Any], str], kombu_json.dumps)
#: the priority a message without one is filed under (``routine``)
DEFAULT_STEP = 6
_sequence = itertools.count()


def message_file_name(queue: str, priority: Any, now_ms: int, unique: str) -> str:
    """The file of one message: priority step, time, a unique part, then kombu's suffix.

    >>> message_file_name("d2r.report", 0, 1234, "u")
    '0_0000000001234_0000000000_u.d2r.report.msg'
    >>> sorted([message_file_name("q", 6, 1, "a"), message_file_name("q", 3, 9, "b")])[0][:1]
    '3'
    """
    step = priority if isinstance(priority, int) and 0 <= priority <= 9 else DEFAULT_STEP
    return f"{step}_{now_ms:013d}_{next(_sequence) % 10**10:010d}_{unique}.{queue}.msg"


class Channel(filesystem.Channel):
    """kombu's file-system channel, filing each message under its priority."""

    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        priority = (payload.get("properties") or {}).get("priority")
        name = message_file_name(queue, priority, int(time.monotonic() * 1000), uuid.uuid4().hex)
        path = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}.partial")
        try:  # written whole, then renamed: a reader never takes a half-written message
            with open(partial, "wb", buffering=0) as f:
                f.write(_dumps(payload).encode())
            os.rename(partial, path)
        except OSError as exc:
            raise ChannelError(f"cannot add file {name!r} to the queue folder") from exc


class Transport(filesystem.Transport):
    """kombu's file-system transport with :class:`Channel`."""

    Channel = Channel
