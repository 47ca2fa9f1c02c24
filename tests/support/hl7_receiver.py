"""An HL7 v2 receiver for tests: hl7apy's MLLP server in its own process.

``python -m tests.support.hl7_receiver --port P --folder DIR [--tls CERT KEY [--ca CA]]``

Every message it gets is saved as ``DIR/received/NNNN.hl7`` (the ER7 text, UTF-8) before it
answers. The answer follows ``DIR/mode``, read for each message (absent: ``AA``):

* ``AA``, ``AE``, ``AR`` (optionally followed by an HL7 table 0357 error code, e.g. ``AR 203``):
  an ACK with that MSA-1, MSA-2 the message's control ID, and an MSA-3 / ERR text naming the
  patient's family name (so a test can check that the sender keeps it out of its records);
* ``wrong-id``: ``AA`` for another control ID;
* ``close``: no answer, the connection is closed.

The ACK is built with hl7apy (v2.5.1 ``ACK``).
"""

from __future__ import annotations

import argparse
import itertools
import ssl
import sys
import threading
from pathlib import Path
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

_counter = itertools.count(1)
_lock = threading.Lock()

ERROR_TEXT = {
    "100": "Segment sequence error",
    "101": "Required field missing",
    "200": "Unsupported message type",
    "203": "Unsupported version id",
    "206": "Application record locked",
    "207": "Application internal error",
}


def segments(text: str) -> dict[str, Any]:
    """The first segment of each name in an ER7 message (parsed by hl7apy)."""
    message = parse_message(
        text.replace("\n", "\r"), validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False
    )
    found: dict[str, Any] = {}
    for child in message.children:
        found.setdefault(child.name, child)
    return found


class OruHandler(AbstractHandler):  # type: ignore[misc]
    def __init__(self, message: str, folder: Path) -> None:
        super().__init__(message)
        self.folder = folder

    def reply(self) -> str:
        with _lock:
            number = next(_counter)
            received = self.folder / "received"
            received.mkdir(exist_ok=True)
            path = received / f"{number:04d}.hl7"
            path.write_text(self.incoming_message, encoding="utf-8")  # before the answer
        mode_file = self.folder / "mode"
        mode = mode_file.read_text().split() if mode_file.exists() else []
        code = mode[0] if mode else "AA"
        if code == "close":
            raise ConnectionAbortedError("told to close without an answer")
        found = segments(self.incoming_message)
        msh = found["MSH"]
        control_id = msh.msh_10.to_er7()
        family = found["PID"].pid_5.to_er7().split("^")[0] if "PID" in found else ""
        ack = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
        ack.msh.msh_3 = "TESTRIS"
        ack.msh.msh_5 = msh.msh_3.to_er7()
        ack.msh.msh_9 = "ACK^R01^ACK"
        ack.msh.msh_10 = f"ACK{number:04d}"
        ack.msh.msh_11 = "P"
        ack.msh.msh_12 = "2.5.1"
        if msh.msh_18.to_er7():
            ack.msh.msh_18 = msh.msh_18.to_er7()
        msa = ack.add_segment("MSA")
        if code == "wrong-id":
            msa.msa_1 = "AA"
            msa.msa_2 = "SOMETHINGELSE"
        else:
            msa.msa_1 = code
            msa.msa_2 = control_id
        if code in ("AE", "AR"):
            msa.msa_3 = f"cannot file the result for patient {family}"
            error = mode[1] if len(mode) > 1 else ""
            err = ack.add_segment("ERR")
            if error:  # without one, the answer leaves the reason open (as AR may)
                err.err_3 = f"{error}^{ERROR_TEXT.get(error, 'Error')}^HL70357"
            err.err_4 = "E"
            err.err_8 = f"order unknown for {family}"
        return f"\x0b{ack.to_er7()}\x1c\r"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--ca", help="require a client certificate signed by this CA")
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    handlers = {"ORU^R01^ORU_R01": (OruHandler, args.folder)}
    server = MLLPServer("127.0.0.1", args.port, handlers, timeout=10)
    if args.tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*args.tls)
        if args.ca:
            context.load_verify_locations(args.ca)
            context.verify_mode = ssl.CERT_REQUIRED
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())


class Hl7Receiver:
    """Test-side handle of a receiver process: start, answer mode, what it received."""

    def __init__(self, folder: Path, port: int, *, tls: tuple[Path, Path] | None = None) -> None:
        self.folder = folder
        self.port = port
        self.tls = tls
        self.process: Any = None

    def start(self) -> Hl7Receiver:
        from tests.support.processes import Process, base_env, wait_port

        self.folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "tests.support.hl7_receiver", "--port", str(self.port)]
        cmd += ["--folder", str(self.folder)]
        if self.tls is not None:
            cmd += ["--tls", str(self.tls[0]), str(self.tls[1])]
        self.process = Process(cmd, env=base_env(), log=self.folder / "receiver.log")
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def answer(self, mode: str) -> None:
        """What to answer from now on (see the module docstring)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "mode").write_text(mode)

    def received(self) -> list[str]:
        """The messages received so far, oldest first."""
        folder = self.folder / "received"
        if not folder.exists():
            return []
        return [p.read_bytes().decode("utf-8") for p in sorted(folder.glob("*.hl7"))]
