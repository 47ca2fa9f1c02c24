"""The MLLP listener for signed reports: ORU^R01 in, an acknowledgement out, per frame.

:class:`Hl7Listener` accepts TCP (or TLS) connections on ``D2R_HL7_LISTEN_PORT`` and serves
each in its own thread, at most ``D2R_HL7_MAX_CONNECTIONS`` at once. A connection may carry
any number of messages, one MLLP frame each (``0x0B`` message ``0x1C 0x0D``), each answered
before the next is read; bytes outside a frame are ignored. A frame longer than
``D2R_HL7_MAX_MESSAGE_BYTES`` is answered ``AR`` and the connection closed; a connection
silent for ``D2R_HL7_IDLE_SECONDS`` (also in the middle of a frame, or of the TLS handshake)
is closed. What each message becomes is :mod:`feedback.match`'s decision.

Logs name the outcome, the MSA-1 code and the matched Study Instance UID; the message control
ID only as printable text, cut short; never report text or patient data.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
from typing import Any, Final

from delivery.mllp import END_BLOCK, START_BLOCK, frame
from feedback.match import ReportBook, receive, record_rejection
from feedback.oru import REJECT, OruRejected, build_ack, printable, read_oru
from feedback.settings import FeedbackSettings
from studydb.engine import Database
from studydb.errors import DatabaseUnavailable

__all__ = ["Hl7Listener"]

logger = logging.getLogger(__name__)

#: seconds each database call of one message may retry an unreachable database
DATABASE_WAIT_SECONDS: Final = 5.0
_CHUNK: Final = 65536


class Hl7Listener:
    """The signed-report MLLP listener.

    Parameters
    ----------
    book : ReportBook
        The study database (:class:`studydb.feedback.SignedReports`).
    settings : FeedbackSettings
        Port, message size and idle limits.
    host : str
        The address to listen on (``D2R_HOST``).
    sending_application : str
        MSH-3 of the acknowledgements (``D2R_AE_TITLE``).
    ssl_context : ssl.SSLContext or None
        Serve TLS with this server context.
    """

    def __init__(
        self,
        book: ReportBook,
        settings: FeedbackSettings,
        *,
        host: str,
        sending_application: str,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if settings.port < 0:
            raise ValueError("settings.port must be a port number or 0")
        self.book = book
        self.settings = settings
        self.sending_application = sending_application
        self.ssl_context = ssl_context
        #: one per connection served at once
        self.slots = threading.BoundedSemaphore(settings.max_connections)
        self.stopping = threading.Event()
        self._server = _Server((host, settings.port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="d2r-hl7-listener", daemon=True
        )

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose for port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting; connections being served end at their next read."""
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ one connection
    def serve(self, sock: socket.socket) -> None:
        """Answer every frame on ``sock`` until the peer closes, idles or oversteps."""
        sock.settimeout(self.settings.idle_seconds)
        try:
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
            self._frames(sock)
        except (TimeoutError, ssl.SSLError, OSError) as exc:
            logger.debug("HL7 connection ended: %s", type(exc).__name__)

    def _frames(self, sock: socket.socket) -> None:
        buffer = bytearray()
        limit = self.settings.max_message_bytes
        while not self.stopping.is_set():
            start = buffer.find(START_BLOCK)
            if start < 0:
                buffer.clear()  # nothing of a frame yet
            elif (end := buffer.find(END_BLOCK, start + 1)) >= 0:
                message = bytes(buffer[start + 1 : end])
                del buffer[: end + len(END_BLOCK)]
                sock.sendall(frame(self.answer(message)))
                continue
            elif len(buffer) - start - 1 > limit:
                reason = f"message larger than {limit} bytes"
                logger.warning("HL7 message refused: %s", reason)
                sock.sendall(frame(self._ack(REJECT, "", reason)))
                return
            chunk = sock.recv(_CHUNK)
            if not chunk:
                return
            buffer += chunk

    # ------------------------------------------------------------------ one message
    def answer(self, data: bytes) -> bytes:
        """The acknowledgement of one message (read, matched, stored and recorded)."""
        try:
            report = read_oru(data)
        except OruRejected as rejected:
            logger.warning("HL7 message answered %s: %s", rejected.code, rejected.reason)
            self._record_rejection(rejected)
            return self._ack(rejected.code, rejected.control_id, rejected.reason)
        try:
            with Database.retry_budget(DATABASE_WAIT_SECONDS):
                answer = receive(self.book, report)
        except DatabaseUnavailable:
            logger.error("signed report not stored: the study database is unavailable")
            reason = "the study database is unavailable; send the message again"
            return self._ack(REJECT, report.control_id, reason, report.sender)
        except Exception:
            logger.exception("signed report not stored")
            return self._ack(REJECT, report.control_id, "internal error", report.sender)
        logger.info(
            "signed-report message %s (status %s): %s, answered %s; study %s",
            printable(report.control_id, 20),
            printable(report.result_status, 2) or "-",
            answer.outcome,
            answer.code,
            answer.study_instance_uid or "-",
        )
        return self._ack(answer.code, report.control_id, answer.note, report.sender)

    def _record_rejection(self, rejected: OruRejected) -> None:
        try:
            with Database.retry_budget(DATABASE_WAIT_SECONDS):
                record_rejection(self.book, rejected)
        except Exception:
            logger.exception("could not record a rejected HL7 message")

    def _ack(
        self, code: str, control_id: str, reason: str, receiver: tuple[str, str] = ("", "")
    ) -> bytes:
        return build_ack(
            code,
            control_id=control_id,
            reason=reason,
            sending_application=self.sending_application,
            receiver=receiver,
        )


class _Server(socketserver.ThreadingTCPServer):
    """A TCP server handing each connection to :meth:`Hl7Listener.serve`, within the
    listener's connection slots."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], listener: Hl7Listener) -> None:
        self.listener = listener
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        slots = self.listener.slots
        while not slots.acquire(timeout=0.5):
            if self.listener.stopping.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.listener.slots.release()


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.listener.serve(self.request)
