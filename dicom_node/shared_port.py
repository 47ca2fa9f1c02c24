"""One DICOM port served by several listener processes (``D2R_LISTENER_PROCESSES``).

A listener process receives with one interpreter: decoding PDUs, hashing and writing data sets
take turns on its lock, so one process tops out at about one core however many associations
arrive at once. ``dcmtk storescp --fork`` scales with its senders by running a process per
association; the node does the same with a fixed set of processes sharing one port.

The first process (``d2r node``) binds and listens as before, so a second node started on the
same port still fails with "address in use". Each further listener process inherits that
listening socket (:class:`SharedPortServer` with ``inherited``). Every process waits on the
socket; the kernel wakes them all for a new connection and the first to accept takes it. A
process already serving associations waits :data:`ACCEPT_DELAY_PER_ASSOCIATION` per
association (at most :data:`MAX_ACCEPT_DELAY`) before it accepts, so an idle process takes
the next association: four senders spread over the processes instead of piling into the one
woken first. The socket is non-blocking in every process, so a process that loses the race
goes back to waiting. A listener process that stops only closes its own descriptor: shutting
the shared socket down would stop the others accepting too.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Final

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

__all__ = [
    "ACCEPT_DELAY_PER_ASSOCIATION",
    "MAX_ACCEPT_DELAY",
    "SharedPortServer",
    "start_shared_server",
]

#: seconds a process waits before accepting, per association it is serving
ACCEPT_DELAY_PER_ASSOCIATION: Final = 0.01
#: the longest such wait
MAX_ACCEPT_DELAY: Final = 0.1


class SharedPortServer(ThreadedAssociationServer):
    """A threaded association server whose listening socket other processes share.

    With ``inherited`` (a listening socket from the first process) it adopts that socket
    instead of binding; without, it binds and listens as pynetdicom's server does.
    """

    def __init__(self, *args: Any, inherited: socket.socket | None = None, **kwargs: Any) -> None:
        self._inherited = inherited
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self._inherited is None:
            super().server_bind()
        else:
            if self.socket is not None:
                self.socket.close()  # the unbound socket socketserver made
            self.socket = self._inherited
            self.server_address = self._inherited.getsockname()
        if self.socket is not None:
            self.socket.setblocking(False)

    def server_activate(self) -> None:
        if self._inherited is None:  # an inherited socket is listening already
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        busy = len(self.active_associations)
        if busy:  # let an idle process take it; accept() fails here if one did
            time.sleep(min(busy * ACCEPT_DELAY_PER_ASSOCIATION, MAX_ACCEPT_DELAY))
        return super().get_request()

    def server_close(self) -> None:
        if self._inherited is None:
            super().server_close()
        elif self.socket is not None:
            self.socket.close()


def start_shared_server(
    ae: AE,
    address: tuple[str, int],
    *,
    inherited: socket.socket | None = None,
    **kwargs: Any,
) -> SharedPortServer:
    """Serve ``ae`` on ``address`` (or on ``inherited``) in a thread, as ``AE.start_server``
    does with ``block=False``; ``kwargs`` are those of ``AE.start_server``."""
    server = ae.make_server(address, server_class=SharedPortServer, inherited=inherited, **kwargs)
    assert isinstance(server, SharedPortServer)
    thread = threading.Thread(target=server.serve_forever, name="d2r-shared-acceptor", daemon=True)
    thread.start()
    ae._servers.append(server)  # pynetdicom's server.shutdown() removes it from this list
    return server
