"""Run a real Orthanc PACS on loopback for integration tests.

Orthanc (Debian package ``orthanc``) runs in a working directory of its own,
with a generated JSON configuration and free ports. Orthanc 1.10 has no
listen-address option and binds every interface, so tests only ever use
loopback peers. Talk to it over REST with :meth:`OrthancServer.get`,
:meth:`OrthancServer.upload` and friends; DICOM peers use
``("127.0.0.1", server.dicom_port)`` and ``server.aet``.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.support.errors import OrthancError

logger = logging.getLogger(__name__)

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
"""Where the Debian package installs the server binary."""

DICOMWEB_PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)
"""Where the Debian package ``orthanc-dicomweb`` installs its plugin."""

LOOPBACK = "127.0.0.1"
LOG_TAIL_CHARS = 3000


def free_port() -> int:
    """Return a TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def find_orthanc() -> Path | None:
    """Return the Orthanc binary, or None where it is not installed."""
    for candidate in ORTHANC_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    found = shutil.which("Orthanc")
    return Path(found) if found else None


def find_dicomweb_plugin() -> Path | None:
    """Return the DICOMweb plugin library, or None where it is not installed."""
    for candidate in DICOMWEB_PLUGIN_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def build_config(
    workdir: Path,
    *,
    aet: str,
    http_port: int,
    dicom_port: int,
    modalities: Mapping[str, tuple[str, str, int]],
    dicomweb_plugin: Path | None,
    max_pdu: int | None,
    dicomweb_servers: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Return the Orthanc configuration for a loopback test server.

    Parameters
    ----------
    workdir
        Directory that holds the storage and index.
    aet
        Orthanc's own Application Entity Title.
    http_port, dicom_port
        Ports of the REST and DICOM servers.
    modalities
        Remote DICOM peers, name -> (AET, host, port).
    dicomweb_plugin
        Path of the DICOMweb plugin to load, or None for no plugin at all.
    max_pdu
        Maximum PDU length Orthanc announces, or None for its default.
    dicomweb_servers
        Remote DICOMweb servers of the plugin (``DicomWeb.Servers``), name -> its settings
        (``Url``, ``HttpHeaders``, ...); targets of ``POST /dicom-web/servers/{name}/stow``.
    """
    storage = str(workdir / "db")
    config: dict[str, Any] = {
        "Name": f"d2r-test-{aet}",
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "Plugins": [str(dicomweb_plugin)] if dicomweb_plugin else [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpCompressionEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "DicomModalities": {
            name: {"AET": peer_aet, "Host": host, "Port": port}
            for name, (peer_aet, host, port) in modalities.items()
        },
        "DicomScuTimeout": 30,
        "UnknownSopClassAccepted": False,
        "OverwriteInstances": True,
        "StableAge": 2,
        "SyncStorageArea": False,
        "SaveJobs": False,
        "ConcurrentJobs": 2,
        "HttpThreadsCount": 20,
    }
    if max_pdu is not None:
        config["MaximumPduLength"] = max_pdu
    if dicomweb_plugin is not None:
        config["DicomWeb"] = {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
            "Ssl": False,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
            "Servers": {name: dict(server) for name, server in (dicomweb_servers or {}).items()},
        }
    return config


class OrthancServer:
    """A real Orthanc process on free loopback ports.

    Parameters
    ----------
    workdir
        Empty (or absent) directory for the configuration, storage and log.
    aet
        Orthanc's Application Entity Title.
    modalities
        Remote DICOM peers, name -> (AET, host, port), usable as targets of
        :meth:`store_to_modality`.
    dicomweb
        Load the Debian DICOMweb plugin (``/dicom-web/`` and ``/wado``).
    max_pdu
        Maximum PDU length, or None for Orthanc's default (16384).
    dicom_port
        A fixed DICOM port (e.g. to bring a "PACS" back where it was); free port otherwise.
    dicomweb_servers
        Remote DICOMweb servers for the plugin (see :func:`build_config`).
    http_port
        A fixed HTTP port (e.g. to bring a DICOMweb archive back where it was).
    extra_config
        Configuration keys that replace the defaults (e.g. ``AuthenticationEnabled``); the
        REST helpers of this class do not authenticate.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        dicomweb: bool = False,
        max_pdu: int | None = None,
        dicom_port: int | None = None,
        dicomweb_servers: Mapping[str, Mapping[str, Any]] | None = None,
        http_port: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        if not aet or len(aet) > 16:
            raise ValueError(f"aet must be 1 to 16 characters, got {aet!r}")
        self.workdir = Path(workdir)
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.dicomweb = dicomweb
        self.max_pdu = max_pdu
        self.dicomweb_servers = dict(dicomweb_servers or {})
        self.http_port = 0
        self.dicom_port = 0
        self._fixed_dicom_port = dicom_port
        self._fixed_http_port = http_port
        self.extra_config = dict(extra_config or {})
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        self._process: subprocess.Popen[bytes] | None = None

    # -- life cycle --------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Root URL of the REST API, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def running(self) -> bool:
        """Whether the Orthanc process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 20) -> None:
        """Start Orthanc and wait until ``GET /system`` answers.

        Raises
        ------
        OrthancError
            If the binary or plugin is missing, or the server exits or does
            not answer within ``timeout`` seconds (the message holds the log tail).
        """
        if self.running:
            return
        binary = find_orthanc()
        if binary is None:
            raise OrthancError("Orthanc is not installed (Debian package 'orthanc')")
        plugin = None
        if self.dicomweb:
            plugin = find_dicomweb_plugin()
            if plugin is None:
                raise OrthancError("DICOMweb plugin missing (Debian package 'orthanc-dicomweb')")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = self._fixed_http_port or free_port()
        self.dicom_port = self._fixed_dicom_port or free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        config = build_config(
            self.workdir,
            aet=self.aet,
            http_port=self.http_port,
            dicom_port=self.dicom_port,
            modalities=self.modalities,
            dicomweb_plugin=plugin,
            max_pdu=self.max_pdu,
            dicomweb_servers=self.dicomweb_servers,
        )
        config.update(self.extra_config)
        self.config_path.write_text(json.dumps(config, indent=2))
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [str(binary), str(self.config_path)],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        logger.info(
            "Orthanc pid %d, HTTP %d, DICOM %d", self._process.pid, self.http_port, self.dicom_port
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise OrthancError(f"Orthanc exited with code {code}:\n{self.log_tail()}")
            try:
                self.get("/system", timeout=1.0)
                return
            except OrthancError as exc:
                if "HTTP 401" in str(exc):  # authentication on: it answers
                    return
                if time.monotonic() > deadline:
                    self.stop()
                    raise OrthancError(
                        f"Orthanc did not answer within {timeout} s:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise OrthancError(
                        f"Orthanc did not answer within {timeout} s:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def stop(self, timeout: float = 10, *, graceful: bool = True) -> None:
        """Stop Orthanc.

        Parameters
        ----------
        timeout
            Seconds to wait after SIGTERM before SIGKILL.
        graceful
            Send SIGTERM first (Orthanc then needs about 3 s to stop its
            servers). False kills at once, for throw-away test storage.
        """
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if graceful:
            process.terminate()
            try:
                process.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                pass
        process.kill()
        process.wait(timeout)

    def __enter__(self) -> OrthancServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """Return the end of Orthanc's log file."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"

    # -- REST ----------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str | None = None,
        accept: str | None = None,
        timeout: float = 60,
    ) -> bytes:
        """Send one REST request and return the raw response body.

        Raises
        ------
        OrthancError
            On an HTTP error status; the message holds Orthanc's answer.
        """
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        req = urllib.request.Request(self.base_url + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        if accept:
            req.add_header("Accept", accept)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                data: bytes = response.read()
                return data
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:1000]
            raise OrthancError(f"{method} {path} -> HTTP {e.code}: {detail}") from e

    def get(self, path: str, *, timeout: float = 60) -> Any:
        """``GET`` a REST path and decode the JSON answer."""
        return json.loads(self.request("GET", path, timeout=timeout))

    def post_json(self, path: str, payload: Any) -> Any:
        """``POST`` a JSON payload and decode the JSON answer."""
        body = json.dumps(payload).encode()
        answer = self.request("POST", path, body, content_type="application/json")
        return json.loads(answer) if answer.strip() else None

    def upload(self, path: Path) -> dict[str, Any]:
        """Store one DICOM file through ``POST /instances``.

        Returns
        -------
        dict
            Orthanc's answer: ``ID``, ``ParentStudy``, ``ParentSeries``, ``Status``...
        """
        answer = self.request(
            "POST", "/instances", Path(path).read_bytes(), content_type="application/dicom"
        )
        result: dict[str, Any] = json.loads(answer)
        return result

    def store_to_modality(
        self, modality: str, resources: list[str], synchronous: bool = True
    ) -> dict[str, Any]:
        """C-STORE Orthanc resources (any level, by Orthanc ID) to a modality."""
        payload = {"Resources": resources, "Synchronous": synchronous}
        result: dict[str, Any] = self.post_json(f"/modalities/{modality}/store", payload)
        return result

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """Map a DICOM UID to Orthanc resources (``POST /tools/lookup``)."""
        answer = self.request("POST", "/tools/lookup", uid.encode(), content_type="text/plain")
        result: list[dict[str, Any]] = json.loads(answer)
        return result

    def instance_file(self, orthanc_id: str) -> bytes:
        """Return the stored DICOM file of an instance."""
        return self.request("GET", f"/instances/{orthanc_id}/file")

    def find_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Return the instances of a study with their simplified tags.

        Each item is ``{"ID": <orthanc id>, "SOPClassUID", "SOPInstanceUID",
        "SeriesInstanceUID", "Modality", "SeriesNumber", ...}``, built from the
        instance's and its series' simplified tags. Empty if the study is unknown.
        """
        studies = [r for r in self.lookup(study_uid) if r.get("Type") == "Study"]
        found: list[dict[str, Any]] = []
        for study in studies:
            for series in self.get(f"/studies/{study['ID']}/series"):
                series_tags = series.get("MainDicomTags", {})
                for instance_id in series.get("Instances", []):
                    tags = self.get(f"/instances/{instance_id}/simplified-tags")
                    item: dict[str, Any] = {
                        "ID": instance_id,
                        "Modality": series_tags.get("Modality"),
                        "SeriesNumber": series_tags.get("SeriesNumber"),
                    }
                    item.update(tags)
                    found.append(item)
        return found

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Register (or replace) a remote DICOM peer through ``PUT /modalities/<name>``."""
        body = json.dumps({"AET": aet, "Host": host, "Port": port}).encode()
        self.request("PUT", f"/modalities/{name}", body, content_type="application/json")
        self.modalities[name] = (aet, host, port)


class OrthancServers:
    """Orthanc servers started under one folder on demand (a benchmark's ``orthanc_factory``):
    call with :class:`OrthancServer`'s keyword arguments; :meth:`stop` stops them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.servers: list[OrthancServer] = []

    def __call__(self, **kwargs: Any) -> OrthancServer:
        server = OrthancServer(self.workdir / f"orthanc{len(self.servers)}", **kwargs)
        self.servers.append(server)
        server.start()
        return server

    def stop(self) -> None:
        for server in self.servers:
            server.stop(graceful=False)
