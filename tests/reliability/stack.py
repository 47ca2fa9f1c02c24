"""The production topology on loopback: ``d2r node`` + ``d2r worker`` over a real Redis, Orthanc as
the PACS, every process real and individually killable. Used by the fault-injection and load tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE

from studydb.records import StudyView
from studydb.store import StudyStore
from tests.support.orthanc import OrthancServer
from tests.support.processes import (
    Process,
    base_env,
    d2r_cmd,
    free_port,
    start_redis,
    wait_for,
    wait_port,
)

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def stack_env(model_dir: Path, tmp: Path, **overrides: str) -> dict[str, str]:
    """Production recovery settings (task time limit, visibility timeout, claim lease and
    heartbeat, reconciler period, attempts: all defaults); only the study quiet period and the
    send retry delay are short, so a test does not wait for a study to be complete."""
    env = base_env(
        D2R_MODEL=str(model_dir),
        D2R_SPOOL_DIR=str(tmp / "data" / "spool"),
        D2R_DATABASE_URL=f"sqlite:///{tmp / 'data' / 'd2r.db'}",
        D2R_AE_TITLE="D2R",
        D2R_HOST="127.0.0.1",
        D2R_STUDY_QUIET_SECONDS="1",
        D2R_STUDY_FORCE_SECONDS="5",
        D2R_SEND_RETRY_DELAY="0.5",
        D2R_MIN_FREE_BYTES="0",
        D2R_HTTP_PORT="0",
        D2R_LOG_LEVEL="INFO",
        D2R_AUDIT_LOG=str(tmp / "data" / "audit.jsonl"),
    )
    env.update(overrides)
    return env


@dataclass
class Stack:
    tmp: Path
    env: dict[str, str]
    orthanc: OrthancServer | None
    node_port: int
    redis: Process | None = None
    redis_port: int = 0
    node: Process | None = None
    workers: list[Process] = field(default_factory=list)
    _store: StudyStore | None = None

    # -- processes ---------------------------------------------------------------------------
    def start_redis(self) -> None:
        if self.redis_port:
            self.redis, _ = start_redis(self.tmp, self.redis_port)
        else:
            self.redis, url = start_redis(self.tmp)
            self.redis_port = int(url.rsplit(":", 1)[1].split("/")[0])
            self.env["D2R_BROKER_URL"] = url

    def start_node(self) -> Process:
        self.node = Process(d2r_cmd("node"), env=self.env, log=self.tmp / "node.log")
        wait_port(self.node_port, timeout=60)
        return self.node

    def start_worker(self, **env: str) -> Process:
        n = len(self.workers)
        worker = Process(
            d2r_cmd("worker", f"--hostname=w{n}@%h"),
            env={**self.env, **env},
            log=self.tmp / f"worker{n}.log",
        )
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for proc in [*self.workers, self.node, self.redis]:
            if proc is not None:
                proc.stop()
        if self._store is not None:
            self._store.close()

    def logs(self) -> str:
        parts = [f"--- node\n{self.node.log_tail() if self.node else ''}"]
        parts += [f"--- worker {n}\n{w.log_tail()}" for n, w in enumerate(self.workers)]
        return "\n".join(parts)

    # -- observation -------------------------------------------------------------------------
    @property
    def store(self) -> StudyStore:
        if self._store is None:
            self._store = StudyStore(self.env["D2R_DATABASE_URL"])
        return self._store

    def view(self, study_uid: str) -> StudyView | None:
        return self.store.get(study_uid)

    def state(self, study_uid: str) -> str | None:
        view = self.view(study_uid)
        return None if view is None else view.state

    def wait_states(self, study_uids: Iterable[str], states: set[str], timeout: float) -> None:
        uids = list(study_uids)
        try:
            wait_for(
                lambda: all(self.state(u) in states for u in uids),
                timeout,
                f"{len(uids)} studies in {states}",
                interval=0.25,
            )
        except TimeoutError as exc:
            pending = {u: self.state(u) for u in uids if self.state(u) not in states}
            raise AssertionError(f"{exc}: {pending}\n{self.logs()}") from exc

    def sr_classes(self, study_uid: str) -> list[str]:
        assert self.orthanc is not None
        return sorted(
            i["SOPClassUID"]
            for i in self.orthanc.find_instances(study_uid)
            if i.get("Modality") == "SR"
        )

    def assert_reported_exactly_once(self, study_uid: str, *, text_sr: bool = True) -> None:
        """One SR pair and one presentation state (the default ``D2R_OUTPUTS``) in the PACS,
        and one ``reported`` event per generation."""
        expected = sorted([COMPREHENSIVE_SR, BASIC_TEXT_SR] if text_sr else [COMPREHENSIVE_SR])
        assert self.sr_classes(study_uid) == expected, study_uid
        assert self.orthanc is not None
        states = [i for i in self.orthanc.find_instances(study_uid) if i.get("Modality") == "PR"]
        assert len(states) == 1, study_uid
        events = self.store.events(study_uid)
        reported = [e for e in events if e.kind == "reported"]
        view = self.view(study_uid)
        assert view is not None
        assert len(reported) == view.generation, [(e.kind, e.detail) for e in events]


def make_stack(orthanc_factory: Any, model_dir: Path, tmp: Path, **env: str) -> Stack:
    """Orthanc (routing to the node), Redis, and the settings; node and workers not started.

    With ``D2R_BROKER_URL`` in ``env`` the caller runs the broker (a Sentinel cluster, say) and
    no Redis is started.
    """
    node_port = free_port()
    orthanc = None
    if orthanc_factory is not None:
        orthanc = orthanc_factory(  # a fixed DICOM port: it may be stopped and started again
            modalities={"d2r": ("D2R", "127.0.0.1", node_port)}, dicom_port=free_port()
        )
        env.setdefault("D2R_DESTINATIONS", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    stack = Stack(
        tmp, stack_env(model_dir, tmp, D2R_PORT=str(node_port), **env), orthanc, node_port
    )
    if "D2R_BROKER_URL" not in env:
        stack.start_redis()
    return stack


def send_datasets(port: int, datasets: Iterable[Dataset], *, aet: str = "MODALITY") -> list[str]:
    """C-STORE each data set on its own association; returns the SOP UIDs answered Success.

    A refused connection, an abort or a failure status simply leaves the UID out: the sender
    only trusts what it saw acknowledged.
    """
    acknowledged = []
    for ds in datasets:
        ae = AE(ae_title=aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID))
        with contextlib.suppress(Exception):
            assoc = ae.associate("127.0.0.1", port, ae_title="D2R")
            if assoc.is_established:
                try:
                    response = assoc.send_c_store(ds)
                    if "Status" in response and int(response.Status) == 0:
                        acknowledged.append(str(ds.SOPInstanceUID))
                finally:
                    if assoc.is_established:
                        assoc.release()
    return acknowledged


def peak_rss_kib(pid: int) -> int:
    """Peak resident set (VmHWM) of ``pid`` and its children, in KiB (0 once it is gone)."""
    total = 0
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
            for child in map(int, text.split()):
                out += [child, *_children(child)]
    return out


def sigkill(proc: Process) -> None:
    """SIGKILL the process group of ``proc`` (the worker's pool children included)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.proc.wait(10)


def as_env(mapping: Mapping[str, str]) -> dict[str, str]:
    return dict(mapping)
