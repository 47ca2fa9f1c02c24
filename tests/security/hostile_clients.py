"""Hostile clients against the real d2r processes, with each process's peak memory per probe.

Starts ``d2r serve`` (or ``d2r node`` + ``d2r worker`` over Redis and PostgreSQL) as a user does,
each process under an address-space limit, the HTTP endpoint on loopback with credentials
required, the status page showing patient names, and tokens and basic-auth users per role. Then
every probe runs over real sockets; around each one the peak resident set (VmHWM) of every
process is reset and read back, so the table shows what the probe cost each process:

 1. route spellings of the status page and its preview with a role that does not hold them;
 2. a Deflated DX whose 128 KiB inflate to 8192 x 8192 16-bit pixels, by STOW-RS and C-STORE;
 3. 64 concurrent wrong basic-auth guesses, from one address and from 64 addresses;
 4. a 256 MiB data set stored by C-STORE, then sent again under the same SOP Instance UID;
 5. one 256 MiB STOW-RS part, and more concurrent STOW-RS requests than the node takes;
 6. ``d2r serve`` with the tokens file's placeholder token (it must refuse to start);
 7. a SOP Instance UID carrying a newline and a forged log record, by C-STORE and STOW-RS;
 8. anonymous ``/healthz`` and ``/readyz``, with Redis stopped on the node + worker stack;
 9. the fuzz corpus (``fuzz/corpus/``) replayed over HTTP, STOW-RS and C-STORE.

Afterwards the processes must be alive, ``/healthz`` must answer 200, and every instance that was
acknowledged with success must be in the study database and on disk.

Run it as ``python -m tests.security.hostile_clients [--stack serve|node-worker]``: it prints the
table and writes it to ``test-artifacts/hostile-clients.txt``; the exit status is 1 when a probe
failed. ``tests/security/test_hostile_clients.py`` runs the same under pytest.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import io
import json
import logging
import re
import secrets
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE

from studydb.records import InstanceRecord
from studydb.store import StudyStore
from studydb.tables import instances_table
from tests.security.hostile import encode, write_raw
from tests.support import upper_layer
from tests.support.dicom_files import make_dx
from tests.support.memory import PeakMemory, descendants
from tests.support.postgres import postgres_server, scratch_database
from tests.support.processes import (
    REPO,
    Process,
    base_env,
    d2r_cmd,
    free_port,
    start_redis,
    wait_for,
    wait_port,
)

__all__ = ["STACKS", "Row", "format_table", "replay_corpus", "run", "write_table"]

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
#: Most a probe may add to any process's peak resident set.
GROWTH_LIMIT_MIB = 200.0
#: Address-space limits: the node never loads torch; the worker maps several GiB for it.
NODE_ADDRESS_SPACE = 4 * GIB
WORKER_ADDRESS_SPACE = 8 * GIB
#: Concurrent STOW-RS requests the node is configured to take (``D2R_STOW_MAX_CONCURRENT``).
STOW_MAX_CONCURRENT = 2
#: A family name that appears nowhere but in the patient's data set.
PATIENT_FAMILY = "Zyxwhostile"
#: What a forged record would look like at the start of a line of the node's text log.
FORGED_RECORD = "2026-01-01 00:00:00,000 WARNING MainProcess d2r.audit: forged record"
#: The token the shipped tokens-file example holds; the node must refuse to start with it.
PLACEHOLDER_TOKEN = "CHANGE-ME-to-the-output-of-openssl-rand-hex-32"
BIG_BYTES = 256 * MIB
BOMB_SIDE = 8192
BOUNDARY = "d2r-hostile-clients-boundary"
CORPUS = REPO / "fuzz" / "corpus"
ARTIFACT = REPO / "test-artifacts" / "hostile-clients.txt"
ROLES = ("metrics", "viewer", "ingest")
TERMINAL_STATES = {"done", "failed", "skipped"}


# ============================================================================== results
@dataclass
class Row:
    """One line of the table: what was sent, what came back, and what it cost."""

    probe: str
    answer: str
    ok: bool
    growth: dict[str, float] = field(default_factory=dict)
    bounded: bool = True  # whether GROWTH_LIMIT_MIB applies to this row

    @property
    def within_bound(self) -> bool:
        return not self.bounded or all(g < GROWTH_LIMIT_MIB for g in self.growth.values())

    @property
    def passed(self) -> bool:
        return self.ok and self.within_bound


def format_table(rows: list[Row], title: str) -> str:
    groups = sorted({g for r in rows for g in r.growth}, key=lambda g: (g != "node", g))
    head = ["probe", "answer", *[f"{g} MiB" for g in groups], "result"]
    lines = []
    for r in rows:
        result = "pass" if r.passed else ("FAIL (memory)" if r.ok else "FAIL")
        cells = [r.probe, r.answer]
        cells += [f"{r.growth[g]:.1f}" if g in r.growth else "-" for g in groups]
        lines.append([*cells, result])
    widths = [min(max(len(str(c)) for c in col), 90) for col in zip(head, *lines, strict=True)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(str(c)[:90].ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    failed = sum(not r.passed for r in rows)
    return "\n".join(
        [
            title,
            fmt(head),
            fmt(["-" * w for w in widths]),
            *map(fmt, lines),
            f"{len(rows) - failed} passed, {failed} failed; growth = peak resident set added "
            f"during the probe, limit {GROWTH_LIMIT_MIB:.0f} MiB per process",
        ]
    )


def write_table(text: str, path: Path = ARTIFACT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(text + "\n\n")
    return path


# ============================================================================== HTTP client
@dataclass(frozen=True)
class Answer:
    status: int  # 0: no answer
    headers: dict[str, str]
    body: bytes
    error: str = ""

    def __str__(self) -> str:
        return str(self.status) if self.status else f"no answer ({self.error})"


def http(
    port: int,
    method: str,
    target: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | Iterable[bytes] = b"",
    length: int | None = None,
    source: str = "127.0.0.1",
    timeout: float = 60.0,
) -> Answer:
    """One request on its own connection, the request line sent exactly as given."""
    head = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    chunks: Iterable[bytes] = [body] if isinstance(body, bytes) else body
    if length is None and isinstance(body, bytes) and (body or method == "POST"):
        length = len(body)
    if length is not None and length >= 0:  # -1: the headers given carry the framing
        head.append(f"Content-Length: {length}")
    error = ""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout, source_address=(source, 0))
    except OSError as exc:
        return Answer(0, {}, b"", f"connect: {exc.strerror or exc}")
    with sock:
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError as exc:  # the server may answer and close before the body is sent
            error = f"send: {exc.strerror or exc}"
        return _read_answer(sock, error)


def _read_answer(sock: socket.socket, error: str = "") -> Answer:
    data = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
            if len(data) > 64 * MIB:
                break
    except OSError as exc:
        error = error or f"receive: {exc.strerror or exc}"
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    if not match:
        return Answer(0, {}, bytes(data), error or "no status line")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(match.group(1)), headers, body, error)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def multipart(parts: list[Path | bytes]) -> tuple[Iterator[bytes], int]:
    """A ``multipart/related`` body of DICOM parts, streamed from disk; returns it and its size."""
    opening = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    closing = f"--{BOUNDARY}--\r\n".encode()
    sizes = [p.stat().st_size if isinstance(p, Path) else len(p) for p in parts]
    length = sum(len(opening) + s + 2 for s in sizes) + len(closing)

    def chunks() -> Iterator[bytes]:
        for part in parts:
            yield opening
            if isinstance(part, bytes):
                yield part
            else:
                with part.open("rb") as f:
                    while block := f.read(MIB):
                        yield block
            yield b"\r\n"
        yield closing

    return chunks(), length


STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def stored_sop_uids(answer: Answer) -> list[str]:
    """The SOP Instance UIDs a STOW-RS response lists as stored (Referenced SOP Sequence)."""
    if answer.status not in (200, 202):
        return []
    try:
        doc = json.loads(answer.body)
    except ValueError:
        return []
    items = doc.get("00081199", {}).get("Value", []) if isinstance(doc, dict) else []
    return [str(i["00081155"]["Value"][0]) for i in items if "00081155" in i]


# ============================================================================== DICOM client
def c_store(port: int, path: Path, timeout: float = 120.0) -> tuple[int | None, str]:
    """Send the Part 10 file at ``path`` on its own association, streamed from disk.

    Returns the response status (None without one) and what happened, in words.
    """
    from pydicom import dcmread

    meta = dcmread(path, stop_before_pixels=True, specific_tags=[]).file_meta
    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(meta.MediaStorageSOPClassUID, str(meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="D2R")
    if not assoc.is_established:
        return None, "association refused"
    try:
        rsp = assoc.send_c_store(path)
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
    except (ValueError, RuntimeError) as exc:
        return None, f"client refused to send: {exc}"[:80]
    finally:
        if assoc.is_established:
            assoc.release()
    return status, "no response (aborted)" if status is None else f"0x{status:04X}"


def raw_c_store(
    port: int, sop_class: str, syntax: str, sop_instance: bytes, dataset: bytes
) -> tuple[int | None, str]:
    """One C-STORE of ``dataset`` as it is, on an association of its own (no validation of
    what is sent); returns the response status (None without one) and what happened."""
    with upper_layer.associate(port, [(1, sop_class, syntax)]) as sock:
        if sock is None:
            return None, "association refused"
        command = upper_layer.c_store_rq(1, sop_class, sop_instance)
        with contextlib.suppress(OSError):  # the listener may abort mid-send
            sock.sendall(
                upper_layer.p_data(1, command, command=True)
                + upper_layer.p_data(1, dataset, command=False)
                + upper_layer.release_rq()
            )
        responses = upper_layer.store_responses(upper_layer.receive_all(sock))
    if not responses:
        return None, "no response (aborted)"
    return responses[0].status, f"0x{responses[0].status:04X}"


# ============================================================================== test data
def _dx(**kwargs: object) -> Dataset:
    ds = make_dx(None, rows=16, cols=16, **kwargs)  # type: ignore[arg-type]
    del ds.file_meta
    return ds


def _pixel_element(length: int) -> bytes:
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)


def deflated_bomb(path: Path, side: int = BOMB_SIDE) -> Dataset:
    """A Deflated Explicit VR Little Endian DX of ``side`` x ``side`` 16-bit zero pixels."""
    ds = _dx()
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    del ds.PixelData
    pixels = side * side * 2
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = io.BytesIO()
    out.write(z.compress(encode(ds) + _pixel_element(pixels)))
    zeros = bytes(MIB)
    for _ in range(pixels // MIB):
        out.write(z.compress(zeros))
    out.write(z.flush())
    write_raw(path, ds, out.getvalue(), DeflatedExplicitVRLittleEndian)
    return ds


def big_instance(path: Path, size: int = BIG_BYTES) -> Dataset:
    """A lateral chest DX of ``size`` bytes of zero pixels (a sparse file)."""
    ds = _dx(view_position="LL")
    ds.Columns = 8192
    ds.Rows = size // (8192 * 2)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    del ds.PixelData
    write_raw(path, ds, encode(ds) + _pixel_element(size), ExplicitVRLittleEndian)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size + size)
    return ds


def forged_uid_instance(path: Path) -> tuple[Dataset, bytes, bytes]:
    """A DX whose SOP Instance UID is followed by a newline and a forged log record, written
    as a Part 10 file whose File Meta carries the forged UID too; returns the data set, its
    raw bytes and the forged UID's bytes."""
    ds = _dx()
    forged = f"{ds.SOPInstanceUID}\n{FORGED_RECORD}"
    data = encode(ds)
    at = data.index(b"\x08\x00\x18\x00UI")
    (old,) = struct.unpack("<H", data[at + 6 : at + 8])
    value = forged.encode() + (b"\0" if len(forged) % 2 else b"")
    data = data[: at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + old :]
    meta_from = Dataset()
    meta_from.SOPClassUID = ds.SOPClassUID
    pydicom_log = logging.getLogger("pydicom")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of an invalid UID value, as intended
        pydicom_log.disabled = True
        try:
            meta_from.SOPInstanceUID = forged
            write_raw(path, meta_from, data, ExplicitVRLittleEndian)
        finally:
            pydicom_log.disabled = False
    return ds, data, forged.encode()


@dataclass
class Files:
    folder: Path
    patient: Path = field(init=False)
    patient_ds: Dataset = field(init=False)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.patient = self.folder / "patient.dcm"
        ds = make_dx(None, rows=256, cols=208)
        ds.PatientName = f"{PATIENT_FAMILY}^Probe"
        ds.save_as(self.patient, enforce_file_format=True)
        self.patient_ds = ds

    def small(self, name: str) -> tuple[Path, Dataset]:
        path = self.folder / f"{name}.dcm"
        ds = make_dx(None, rows=64, cols=48)
        ds.save_as(path, enforce_file_format=True)
        return path, ds


# ============================================================================== the stacks
@dataclass
class Target:
    """A running topology and what the probes know about it."""

    kind: str
    tmp: Path
    env: dict[str, str]
    dicom_port: int
    http_port: int
    tokens: dict[str, str]
    passwords: dict[str, str]  # role -> password of user "<role>-user"
    processes: dict[str, Process]
    memory: PeakMemory
    files: Files
    redis: Process | None = None
    redis_port: int = 0
    acknowledged: dict[str, str] = field(default_factory=dict)  # SOP UID -> study UID or ""
    _store: StudyStore | None = None

    @property
    def store(self) -> StudyStore:
        if self._store is None:
            self._store = StudyStore(self.env["D2R_DATABASE_URL"])
        return self._store

    @property
    def node(self) -> Process:
        return self.processes["node"]

    @property
    def spool(self) -> Path:
        return Path(self.env["D2R_SPOOL_DIR"])

    def instance(self, sop_uid: str) -> InstanceRecord | None:
        """The study database's record of an instance, by SOP Instance UID alone."""
        table = instances_table
        with self.store.engine.connect() as conn:
            row = conn.execute(sa.select(table).where(table.c.sop_instance_uid == sop_uid)).first()
        return None if row is None else InstanceRecord.from_row(row)

    def state(self, study_uid: str) -> tuple[str | None, str | None]:
        view = self.store.get(study_uid)
        return (None, None) if view is None else (view.state, view.reason)

    def wait_terminal(self, study_uid: str, timeout: float) -> tuple[str | None, str | None]:
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: self.state(study_uid)[0] in TERMINAL_STATES, timeout, study_uid)
        return self.state(study_uid)

    def ack(self, ds: Dataset) -> None:
        self.acknowledged[str(ds.SOPInstanceUID)] = str(ds.StudyInstanceUID)

    def get(self, target: str, role: str | None = None, **kw: object) -> Answer:
        headers = bearer(self.tokens[role]) if role else {}
        return http(self.http_port, "GET", target, headers=headers, **kw)  # type: ignore[arg-type]

    def stow(self, parts: list[Path | bytes], timeout: float = 120.0) -> Answer:
        chunks, length = multipart(parts)
        headers = {**bearer(self.tokens["ingest"]), "Content-Type": STOW_TYPE}
        return http(
            self.http_port,
            "POST",
            "/dicom-web/studies",
            headers=headers,
            body=chunks,
            length=length,
            timeout=timeout,
        )

    def log_texts(self) -> dict[str, str]:
        """Each process's text log (its stdout and stderr)."""
        return {n: p.log_path.read_text(errors="replace") for n, p in self.processes.items()}

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.log_tail()}" for n, p in self.processes.items())

    def close(self) -> None:
        for proc in [*reversed(self.processes.values()), self.redis]:
            if proc is not None:
                proc.stop()
        if self._store is not None:
            self._store.close()


def write_credentials(folder: Path) -> tuple[Path, Path, dict[str, str], dict[str, str]]:
    """A tokens file with a token per role and one holding every role (``full``), and a users
    file with a user per role written by ``d2r http-user``."""
    tokens = {role: secrets.token_hex(32) for role in (*ROLES, "full")}
    tokens_file = folder / "tokens"
    tokens_file.write_text(
        "".join(
            f"{r}-client {','.join(ROLES) if r == 'full' else r} {t}\n" for r, t in tokens.items()
        )
    )
    users_file = folder / "users"
    passwords = {role: secrets.token_urlsafe(16) for role in ROLES}
    for role, password in passwords.items():
        subprocess.run(
            d2r_cmd("http-user", f"{role}-user", "--role", role, "--file", str(users_file))
            + ["--password-stdin"],
            input=password + "\n",
            text=True,
            check=True,
            capture_output=True,
            cwd=REPO,
            env=base_env(),
            timeout=60,
        )
    return tokens_file, users_file, tokens, passwords


def limited(cmd: list[str], address_space: int) -> list[str]:
    """``cmd`` run under an address-space limit (prlimit sets it, then executes ``cmd``)."""
    return ["prlimit", f"--as={address_space}:{address_space}", "--", *cmd]


def common_env(tmp: Path, tokens_file: Path, users_file: Path, **overrides: str) -> dict[str, str]:
    settings = {
        "D2R_SPOOL_DIR": str(tmp / "data" / "spool"),
        "D2R_DATABASE_URL": f"sqlite:///{tmp / 'data' / 'd2r.db'}",
        "D2R_HOST": "127.0.0.1",
        "D2R_PORT": str(free_port()),
        "D2R_HTTP_HOST": "127.0.0.1",
        "D2R_HTTP_PORT": str(free_port()),
        "D2R_HTTP_AUTH": "required",
        "D2R_STATUS_PAGE_PHI": "true",
        "D2R_HTTP_TOKENS_FILE": str(tokens_file),
        "D2R_HTTP_USERS_FILE": str(users_file),
        "D2R_STOW_MAX_CONCURRENT": str(STOW_MAX_CONCURRENT),
        "D2R_STUDY_QUIET_SECONDS": "2",
        "D2R_MIN_FREE_BYTES": "0",
        "D2R_LOG_LEVEL": "INFO",
    }
    return base_env(**{**settings, **overrides})


def _ready(port: int) -> bool:
    return http(port, "GET", "/readyz", timeout=5).status == 200


@contextlib.contextmanager
def serve_stack(tmp: Path) -> Iterator[Target]:
    """``d2r serve``: the node and its worker child; the node's own limit is tightened to
    :data:`NODE_ADDRESS_SPACE` once the worker (which inherits the larger one) has started."""
    tokens_file, users_file, tokens, passwords = write_credentials(tmp)
    env = common_env(tmp, tokens_file, users_file)
    node = Process(limited(d2r_cmd("serve"), WORKER_ADDRESS_SPACE), env=env, log=tmp / "serve.log")
    pid = node.pid
    memory = PeakMemory({"node": lambda: [pid], "worker": lambda: descendants(pid)})
    target = Target(
        "serve",
        tmp,
        env,
        int(env["D2R_PORT"]),
        int(env["D2R_HTTP_PORT"]),
        tokens,
        passwords,
        {"node": node},
        memory,
        Files(tmp / "files"),
    )
    try:
        wait_port(target.dicom_port, timeout=60)
        wait_for(lambda: _ready(target.http_port), 120, "d2r serve ready (worker and model)")
        subprocess.run(
            ["prlimit", "--pid", str(pid), f"--as={NODE_ADDRESS_SPACE}:{NODE_ADDRESS_SPACE}"],
            check=True,
        )
        yield target
    except BaseException:
        print(target.logs(), file=sys.stderr)
        raise
    finally:
        target.close()


@contextlib.contextmanager
def node_worker_stack(tmp: Path) -> Iterator[Target]:
    """``d2r node`` + ``d2r worker`` over a private Redis and PostgreSQL."""
    tokens_file, users_file, tokens, passwords = write_credentials(tmp)
    with postgres_server() as admin, scratch_database(admin, "d2r_hostile") as db_url:
        redis, broker = start_redis(tmp)
        env = common_env(
            tmp, tokens_file, users_file, D2R_BROKER_URL=broker, D2R_DATABASE_URL=db_url
        )
        target: Target | None = None
        try:
            node = Process(
                limited(d2r_cmd("node"), NODE_ADDRESS_SPACE), env=env, log=tmp / "node.log"
            )
            wait_port(int(env["D2R_PORT"]), timeout=60)
            worker = Process(
                limited(d2r_cmd("worker"), WORKER_ADDRESS_SPACE),
                env={**env, "D2R_HTTP_PORT": "0"},
                log=tmp / "worker.log",
            )
            memory = PeakMemory(
                {
                    "node": lambda: [node.pid, *descendants(node.pid)],
                    "worker": lambda: [worker.pid, *descendants(worker.pid)],
                }
            )
            target = Target(
                "node-worker",
                tmp,
                env,
                int(env["D2R_PORT"]),
                int(env["D2R_HTTP_PORT"]),
                tokens,
                passwords,
                {"node": node, "worker": worker},
                memory,
                Files(tmp / "files"),
                redis=redis,
                redis_port=int(broker.rsplit(":", 1)[1].split("/")[0]),
            )
            port = target.http_port
            wait_for(lambda: _ready(port), 60, "d2r node ready")
            yield target
        except BaseException:
            if target is not None:
                print(target.logs(), file=sys.stderr)
            raise
        finally:
            if target is not None:
                target.close()
            else:
                redis.stop()


# ============================================================================== probes
def measured(target: Target, probe: str, action: Callable[[], tuple[str, bool]]) -> Row:
    """Run ``action`` (returns the answer in words and whether it is the expected one) between
    a reset and a read of every process's peak resident set; an exception is a failed row."""
    target.memory.reset()
    try:
        answer, ok = action()
    except Exception as exc:  # the probe's own failure is a row of the table, not an abort
        answer, ok = f"probe error: {type(exc).__name__}: {exc}", False
    return Row(probe, answer, ok, target.memory.growth_mib())


def setup_study(target: Target) -> list[Row]:
    """The patient's study, sent and reported before the probes (it also warms the worker)."""
    files = target.files

    def send() -> tuple[str, bool]:
        status, words = c_store(target.dicom_port, files.patient)
        if status == 0:
            target.ack(files.patient_ds)
        state, reason = target.wait_terminal(str(files.patient_ds.StudyInstanceUID), 180)
        return f"C-STORE {words}; study {state}" + (f" ({reason})" if reason else ""), (
            status == 0 and state == "done"
        )

    row = measured(target, "0 patient study (setup; the worker loads the model)", send)
    row.bounded = False
    return [row]


def _route_spellings(path: str) -> list[str]:
    assert path.startswith("/studies/")
    rest = path[len("/studies/") :]
    return [
        path.lstrip("/"),
        "/" + path,
        "/." + path,
        "/%73tudies/" + rest,
        "/STUDIES/" + rest,
        path + "/",
    ]


def probe_routes(target: Target) -> list[Row]:
    """Route spellings with the wrong role: 400, 403 or 404, never a page with the name."""
    study = str(target.files.patient_ds.StudyInstanceUID)
    rows = []

    def control() -> tuple[str, bool]:
        a = target.get(f"/studies/{study}", "viewer")
        shows = PATIENT_FAMILY.lower().encode() in a.body.lower()
        return f"{a} (viewer; page names the patient: {shows})", a.status == 200 and shows

    rows.append(measured(target, "1 /studies/<uid> as viewer (control)", control))
    pages = ((f"/studies/{study}", "metrics"), (f"/studies/{study}/preview.png", "ingest"))
    for page, role in pages:
        for spelling in _route_spellings(page):
            shown = spelling.replace(study, "<uid>")

            def ask(spelling: str = spelling, role: str = role) -> tuple[str, bool]:
                a = target.get(spelling, role)
                leaked = PATIENT_FAMILY.lower().encode() in a.body.lower()
                ok = a.status in (400, 403, 404) and not leaked
                return f"{a}{' with the patient name' if leaked else ''}", ok

            rows.append(measured(target, f"1 GET {shown} as {role}", ask))
    return rows


def probe_bomb(target: Target) -> list[Row]:
    """A Deflated DX inflating to 8192 x 8192 x 16 bits, by STOW-RS and by C-STORE."""
    rows = []
    folder = target.files.folder
    for way in ("STOW-RS", "C-STORE"):
        path = folder / f"bomb-{way}.dcm"
        ds = deflated_bomb(path)
        study = str(ds.StudyInstanceUID)

        def send(path: Path = path, ds: Dataset = ds, way: str = way) -> tuple[str, bool]:
            size = path.stat().st_size // KIB
            if way == "STOW-RS":
                a = target.stow([path])
                stored = str(ds.SOPInstanceUID) in stored_sop_uids(a)
                words = f"STOW {a} ({size} KiB; stored: {stored})"
            else:
                status, words = c_store(target.dicom_port, path)
                stored = status == 0
                words = f"C-STORE {words} ({size} KiB)"
            if stored:
                target.ack(ds)
            return words, True

        rows.append(measured(target, f"2 deflated 8192x8192 DX by {way}", send))

        def outcome(study: str = study, ds: Dataset = ds) -> tuple[str, bool]:
            if str(ds.SOPInstanceUID) not in target.acknowledged:
                return "not stored (refused at ingest)", True
            state, reason = target.wait_terminal(study, 60)
            worker_alive = all(p.alive() for p in target.processes.values())
            if target.kind == "serve":
                worker_alive = bool(descendants(target.node.pid))
            ok = state in ("skipped", "failed") and bool(reason) and worker_alive
            return f"study {state} ({reason}); worker alive: {worker_alive}", ok

        rows.append(measured(target, f"2   its study ({way})", outcome))

        def index() -> tuple[str, bool]:
            a = target.get("/", "viewer")
            return f"{a}", a.status == 200

        rows.append(measured(target, "2   GET / as viewer (PHI on)", index))

        def preview(study: str = study) -> tuple[str, bool]:
            a = target.get(f"/studies/{study}/preview.png", "viewer")
            if a.status != 200:
                return f"{a} (refused)", a.status in (404, 409, 413, 415, 422)
            width, height = struct.unpack(">II", a.body[16:24]) if len(a.body) >= 24 else (0, 0)
            small = width * height <= 1024 * 1024
            return f"200 PNG {width}x{height}{' (placeholder)' if small else ''}", small

        rows.append(measured(target, "2   GET preview.png as viewer", preview))
    return rows


def probe_guesses(target: Target) -> list[Row]:
    """64 concurrent wrong basic-auth guesses from one address, then from 64 addresses,
    while ``/healthz`` is polled from another address."""
    rows = []
    for label, sources in (
        ("one address", ["127.0.0.2"]),
        ("64 addresses", [f"127.0.1.{i}" for i in range(1, 65)]),
    ):

        def attack(sources: list[str] = sources) -> tuple[str, bool]:
            stop = threading.Event()
            health: list[str] = []

            def poll() -> None:
                while not stop.is_set():
                    a = target.get("/healthz", timeout=5)
                    if a.status != 200:
                        health.append(str(a))
                    stop.wait(0.2)

            def guess(n: int) -> int:
                user = "viewer-user" if n % 2 else f"guess-{n}"
                headers = basic(user, f"wrong-{secrets.token_hex(8)}")
                a = http(
                    target.http_port,
                    "GET",
                    "/",
                    headers=headers,
                    source=sources[n % len(sources)],
                    timeout=60,
                )
                return a.status

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            with ThreadPoolExecutor(64) as pool:
                statuses = Counter(pool.map(guess, range(64)))
            stop.set()
            poller.join(10)
            ok = set(statuses) <= {401, 429, 503} and not health
            answers = ", ".join(f"{n}x{s}" for s, n in sorted(statuses.items()))
            return f"{answers}; /healthz misses: {len(health)}", ok

        rows.append(measured(target, f"3 64 wrong basic-auth guesses, {label}", attack))

    page = f"/studies/{target.files.patient_ds.StudyInstanceUID}"

    def right() -> tuple[str, bool]:
        credential = basic("viewer-user", target.passwords["viewer"])
        a = http(target.http_port, "GET", page, headers=credential)
        b = http(target.http_port, "GET", page, headers=credential, source="127.0.0.2")
        return f"{a} from an address without guesses; {b} from the guessing one", True

    row = measured(target, "3   right credential afterwards (shown)", right)
    rows.append(row)
    return rows


def probe_big_c_store(target: Target) -> list[Row]:
    """A 256 MiB data set by C-STORE, then again under the same SOP Instance UID."""
    path = target.files.folder / "big-c-store.dcm"
    ds = big_instance(path)
    rows = []
    for label in ("first send", "re-send, same SOP Instance UID"):

        def send() -> tuple[str, bool]:
            status, words = c_store(target.dicom_port, path)
            if status == 0:
                target.ack(ds)
            return f"C-STORE {words}", status == 0

        rows.append(measured(target, f"4 256 MiB C-STORE, {label}", send))
    return rows


def probe_stow(target: Target) -> list[Row]:
    """One 256 MiB STOW-RS part; then more concurrent requests than the node takes."""
    path = target.files.folder / "big-stow.dcm"
    ds = big_instance(path)

    def big() -> tuple[str, bool]:
        a = target.stow([path], timeout=300)
        stored = str(ds.SOPInstanceUID) in stored_sop_uids(a)
        if stored:
            target.ack(ds)
        return f"STOW {a} (stored: {stored})", a.status in (200, 413)

    rows = [measured(target, "5 one 256 MiB STOW-RS part", big)]
    n = 2 * STOW_MAX_CONCURRENT
    parts = [target.files.small(f"stow-concurrent-{i}") for i in range(n)]

    def concurrent() -> tuple[str, bool]:
        bodies = []
        for path, _ds in parts:
            chunks, length = multipart([path])
            bodies.append((b"".join(chunks), length))
        socks = []
        for body, length in bodies:
            s = socket.create_connection(("127.0.0.1", target.http_port), 60)
            head = (
                f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                f"Authorization: Bearer {target.tokens['ingest']}\r\n"
                f"Content-Type: {STOW_TYPE}\r\nContent-Length: {length}\r\n\r\n"
            )
            s.sendall(head.encode() + body[: len(body) // 2])
            socks.append(s)
        time.sleep(1.5)  # every request is in flight, its body half sent
        early = [bool(select.select([s], [], [], 0)[0]) for s in socks]
        answers = []
        for s, (body, _length) in zip(socks, bodies, strict=True):
            error = ""
            try:
                s.sendall(body[len(body) // 2 :])
            except OSError as exc:
                error = f"send: {exc.strerror or exc}"
            answers.append(_read_answer(s, error))
            s.close()
        for a, (_path, ds) in zip(answers, parts, strict=True):
            if str(ds.SOPInstanceUID) in stored_sop_uids(a):
                target.ack(ds)
        statuses = [a.status for a in answers]
        busy = [a for a in answers if a.status == 503]
        ok = (
            statuses.count(200) == STOW_MAX_CONCURRENT
            and len(busy) == n - STOW_MAX_CONCURRENT
            and all("retry-after" in a.headers for a in busy)
        )
        words = ", ".join(
            f"{a}{'+Retry-After' if 'retry-after' in a.headers else ''}" for a in answers
        )
        return f"{words} (answered before the body: {sum(early)})", ok

    rows.append(
        measured(target, f"5 {n} concurrent STOW-RS (limit {STOW_MAX_CONCURRENT})", concurrent)
    )
    return rows


def probe_placeholder(tmp: Path) -> list[Row]:
    """``d2r serve`` with the example tokens file's placeholder: it must not start."""
    folder = tmp / "placeholder"
    folder.mkdir()
    tokens_file = folder / "tokens"
    tokens_file.write_text(f"pacs ingest {PLACEHOLDER_TOKEN}\n")
    env = common_env(folder, tokens_file, folder / "users")
    env.pop("D2R_HTTP_USERS_FILE")
    proc = Process(d2r_cmd("serve"), env=env, log=folder / "serve.log")
    port = int(env["D2R_HTTP_PORT"])
    deadline = time.monotonic() + 60
    started = False
    while proc.alive() and time.monotonic() < deadline:
        if http(port, "GET", "/healthz", timeout=2).status == 200:
            started = True
            break
        time.sleep(0.2)
    code = proc.stop()
    text = proc.log_path.read_text(errors="replace")
    naming = [line for line in text.splitlines() if "D2R_HTTP_TOKENS_FILE" in line]
    leaked = PLACEHOLDER_TOKEN in text
    ok = not started and code not in (0, None) and bool(naming) and not leaked
    answer = (
        "started and served /healthz"
        if started
        else f"exit {code}; lines naming D2R_HTTP_TOKENS_FILE: {len(naming)}"
    ) + ("; the token is in the output" if leaked else "")
    return [Row("6 serve with the placeholder token", answer, ok, bounded=False)]


def probe_log_forging(target: Target) -> list[Row]:
    """A SOP Instance UID with a newline and a forged record, by C-STORE and STOW-RS."""
    rows = []
    path = target.files.folder / "forged.dcm"
    ds, data, forged = forged_uid_instance(path)
    for way, command_uid in (
        ("C-STORE (command+data set)", forged),
        ("C-STORE (data set)", str(ds.SOPInstanceUID).encode()),
    ):

        def send(command_uid: bytes = command_uid) -> tuple[str, bool]:
            status, words = raw_c_store(
                target.dicom_port, ds.SOPClassUID, ExplicitVRLittleEndian, command_uid, data
            )
            return f"C-STORE {words}", status != 0  # refused or aborted, never stored

        rows.append(measured(target, f"7 forged UID by {way}", send))

    def stow() -> tuple[str, bool]:
        a = target.stow([path])
        return f"STOW {a}", a.status != 0 and not stored_sop_uids(a)

    rows.append(measured(target, "7 forged UID by STOW-RS", stow))

    def log() -> tuple[str, bool]:
        time.sleep(0.5)
        forged = [
            name
            for name, text in target.log_texts().items()
            for line in text.splitlines()
            if line.startswith(FORGED_RECORD)
        ]
        return f"log lines starting like the forged record: {len(forged)} {forged}", not forged

    rows.append(measured(target, "7   process logs (stderr)", log))
    return rows


_LEAKS = re.compile(
    r"/|\\|127\.0\.0\.1|localhost|::1|root|postgres|redis|errno|refused|traceback|"
    r"[A-Za-z]+(Error|Exception)\b|\d{4,5}",
    re.IGNORECASE,
)


def _check_body(a: Answer, hostname: str) -> tuple[dict[str, str], list[str]]:
    """The checks of a probe answer and anything in them naming a host, user, path or error."""
    try:
        doc = json.loads(a.body)
    except ValueError:
        return {}, [f"not JSON: {a.body[:60]!r}"]
    checks = doc.get("checks", {}) if isinstance(doc, dict) else {}
    leaks = [
        f"{k}: {v}"[:80]
        for k, v in checks.items()
        if _LEAKS.search(str(v)) or hostname.lower() in str(v).lower()
    ]
    extra = set(doc) - {"status", "checks"} if isinstance(doc, dict) else set()
    leaks += [f"field {k}" for k in sorted(extra)]
    return checks, leaks


def probe_health(target: Target) -> list[Row]:
    """Anonymous ``/healthz`` and ``/readyz``; on node + worker also with Redis stopped."""
    hostname = socket.gethostname()
    rows = []

    def healthy() -> tuple[str, bool]:
        answers = [target.get(p) for p in ("/healthz", "/readyz")]
        leaks = [leak for a in answers for leak in _check_body(a, hostname)[1]]
        ok = all(a.status == 200 for a in answers) and not leaks
        return f"{answers[0]}, {answers[1]}{'; ' + '; '.join(leaks) if leaks else ''}", ok

    rows.append(measured(target, "8 anonymous /healthz, /readyz", healthy))
    if target.redis is None:
        return rows

    def broker_down() -> tuple[str, bool]:
        assert target.redis is not None
        target.redis.stop()
        try:
            ready = target.get("/readyz", timeout=30)
            health = target.get("/healthz", timeout=30)
        finally:
            target.redis, _ = start_redis(target.tmp, target.redis_port)
        checks, leaks = _check_body(ready, hostname)
        failing = sorted(k for k, v in checks.items() if v != "ok")
        ok = ready.status == 503 and failing == ["broker"] and not leaks
        ok = ok and health.status == 200 and not _check_body(health, hostname)[1]
        words = f"/readyz {ready} failing {failing}, /healthz {health}"
        return words + (f"; leaks {'; '.join(leaks)}" if leaks else ""), ok

    rows.append(measured(target, "8 anonymous /readyz, Redis stopped", broker_down))
    return rows


# ------------------------------------------------------------------------------ fuzz corpus
#: corpus folders of targets whose inputs are not sent to the node by a client
NOT_CLIENT_INPUTS = {
    "hl7_ack": "what a RIS answers d2r's HL7 sender",
    "destination": "the text of D2R_DESTINATIONS",
}


def replay_corpus(target: Target, corpus: Path = CORPUS) -> list[Row]:
    """Replay the fuzz targets' corpus (``fuzz/corpus/<target>/``) against the running node,
    one row per target, each input decoded as its target decodes it (``fuzz/<target>.py``):

    * ``http_request``: the raw bytes of one connection, the fuzz credentials replaced by this
      node's (a token of every role, the ``metrics`` token, a ``viewer`` user);
    * ``stow``: a STOW-RS request (flags byte, boundary line, body), posted with the ``ingest``
      token;
    * ``cstore``: after an accepted association, a C-STORE data set or raw PDUs;
    * ``dicom_header``: a data set in the transfer syntax its first byte picks, sent by
      C-STORE; when it is stored, its study's preview is asked for.

    Every input must be answered without a server error (5xx other than 503); ``/healthz``
    must answer 200 afterwards. A missing corpus, an empty or unknown folder fails its row.
    """
    if not corpus.is_dir():
        return [Row("9 fuzz corpus", f"{corpus} absent: nothing replayed", False, bounded=False)]
    replayers: dict[str, Callable[[Target, bytes], str]] = {
        "http_request": _replay_http,
        "stow": _replay_stow,
        "cstore": _replay_c_store,
        "dicom_header": _replay_header,
    }
    rows = []
    folders = sorted(p for p in corpus.iterdir() if p.is_dir())
    if not folders:
        return [Row("9 fuzz corpus", f"{corpus} has no folders", False, bounded=False)]
    for folder in folders:
        if folder.name in NOT_CLIENT_INPUTS:
            reason = NOT_CLIENT_INPUTS[folder.name]
            rows.append(
                Row(f"9 corpus {folder.name}/", f"not replayed: {reason}", True, bounded=False)
            )
            continue
        replay = replayers.get(folder.name)
        if replay is None:
            rows.append(Row(f"9 corpus {folder.name}/", "unknown target", False, bounded=False))
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file())

        def run_all(
            files: list[Path] = files, replay: Callable[[Target, bytes], str] = replay
        ) -> tuple[str, bool]:
            if not files:
                return "no inputs", False
            outcomes = Counter(replay(target, p.read_bytes()) for p in files)
            health = target.get("/healthz", timeout=10)
            bad = sum(n for o, n in outcomes.items() if o.startswith("BAD"))
            summary = ", ".join(f"{n}x{o}" for o, n in outcomes.most_common(6))
            ok = not bad and health.status == 200
            return f"{len(files)} inputs: {summary}; /healthz {health}", ok

        rows.append(measured(target, f"9 corpus {folder.name}/", run_all))
    return rows


def _fuzz_target(name: str) -> Any:
    """The fuzz target module ``fuzz.<name>``, which decodes its corpus inputs (tooling outside
    the product's type-checked packages, hence loaded by name)."""
    return importlib.import_module(f"fuzz.{name}")


#: the address the HTTP corpus comes from (its wrong credentials count against it alone)
CORPUS_SOURCE = "127.0.0.3"


def _replay_http(target: Target, data: bytes) -> str:
    http_request = _fuzz_target("http_request")

    fuzz_basic = base64.b64encode(f"{http_request.USER}:{http_request.PASSWORD}".encode())
    ours = base64.b64encode(f"viewer-user:{target.passwords['viewer']}".encode())
    data = data.replace(http_request.FULL_TOKEN.encode(), target.tokens["full"].encode())
    data = data.replace(http_request.METRICS_TOKEN.encode(), target.tokens["metrics"].encode())
    data = data.replace(fuzz_basic, ours)
    sock = socket.create_connection(
        ("127.0.0.1", target.http_port), 30, source_address=(CORPUS_SOURCE, 0)
    )
    with sock:
        error = ""
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            error = str(exc)
        answer = _read_answer(sock, error)
    return _judge_http(answer)


def _replay_stow(target: Target, data: bytes) -> str:
    route, headers, body = _fuzz_target("stow").request_of(data)
    headers = {k.title(): v for k, v in headers.items()}
    if "Transfer-Encoding" in headers:  # the body as one chunk, then the last chunk
        body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n" if body else b"0\r\n\r\n"
    headers.update(bearer(target.tokens["ingest"]))
    a = http(target.http_port, "POST", route, headers=headers, body=body, length=-1)
    for sop in stored_sop_uids(a):
        target.acknowledged[sop] = ""
    return _judge_http(a)


def _judge_http(a: Answer) -> str:
    if a.status >= 500 and a.status not in (501, 503):  # an unknown method; busy
        return f"BAD {a.status}"
    return str(a.status) if a.status else "closed"


def _replay_c_store(target: Target, data: bytes) -> str:
    cstore = _fuzz_target("cstore")
    if not data:
        return "empty"
    context_id, abstract, syntax = cstore.CONTEXTS[(data[0] >> 1) % len(cstore.CONTEXTS)]
    payload = data[1:]
    if data[0] & 1:  # raw: the bytes after the association, as they are
        with upper_layer.associate(target.dicom_port, cstore.CONTEXTS) as sock:
            if sock is None:
                return "association refused"
            with contextlib.suppress(OSError):
                sock.sendall(payload)
            answer = upper_layer.receive_all(sock, half_close_after=cstore.RAW_IDLE_SECONDS)
        statuses = [r.status for r in upper_layer.store_responses(answer)]
        return "raw: " + (",".join(f"0x{s:04X}" for s in statuses) or "no response")
    return _store_data_set(target, abstract, syntax, payload)


def _replay_header(target: Target, data: bytes) -> str:
    dicom_header = _fuzz_target("dicom_header")
    if not data:
        return "empty"
    syntax = str(dicom_header.SYNTAXES[data[0] % len(dicom_header.SYNTAXES)])
    return _store_data_set(target, "1.2.840.10008.5.1.4.1.1.1.1", syntax, data[1:], preview=True)


def _store_data_set(
    target: Target, abstract: str, syntax: str, payload: bytes, *, preview: bool = False
) -> str:
    """C-STORE ``payload`` under its own SOP Instance UID where the header gives one."""
    from dicom_node.errors import InstanceRejected
    from dicom_node.metadata import parse_header

    try:
        header = parse_header(payload, syntax)
        sop, study = header.sop_instance_uid, header.study_instance_uid
    except InstanceRejected:
        sop, study = "1.2.826.0.1.3680043.8.498.99", ""
    status, words = raw_c_store(target.dicom_port, abstract, syntax, sop.encode(), payload)
    if status is not None and status >= 0xC000 and status != 0xC000:
        words = f"BAD {words}"  # an unexpected failure, not "cannot understand"
    if status == 0:
        target.acknowledged[sop] = study
        if preview and study:
            a = target.get(f"/studies/{study}/preview.png", "viewer")
            words += f" preview {_judge_http(a)}"
    return words


# ------------------------------------------------------------------------------ afterwards
def final_checks(target: Target) -> list[Row]:
    rows = []
    names = {n: p.alive() for n, p in target.processes.items()}
    if target.kind == "serve":
        names["worker"] = bool(descendants(target.node.pid))
    rows.append(
        Row(
            "after: processes alive",
            ", ".join(f"{n} {'alive' if a else 'GONE'}" for n, a in names.items()),
            all(names.values()),
            bounded=False,
        )
    )
    health = target.get("/healthz", timeout=10)
    rows.append(Row("after: /healthz", str(health), health.status == 200, bounded=False))
    missing = []
    for sop in target.acknowledged:
        rec = target.instance(sop)
        if rec is None:
            missing.append(f"{sop} not in the database")
            continue
        path = Path(rec.path)
        path = path if path.is_absolute() else target.spool / path
        if not path.is_file() or path.stat().st_size != rec.size:
            missing.append(f"{sop} not on disk")
    rows.append(
        Row(
            "after: acknowledged instances kept",
            f"{len(target.acknowledged) - len(missing)}/{len(target.acknowledged)} in the "
            f"database and on disk" + (f"; {missing[:3]}" if missing else ""),
            not missing,
            bounded=False,
        )
    )
    return rows


# ============================================================================== running
STACKS = ("serve", "node-worker")


def run(stack: str, tmp: Path) -> list[Row]:
    """Start ``stack`` under ``tmp``, run its probes, stop it; returns the table's rows."""
    rows: list[Row] = []
    if stack == "serve":
        with serve_stack(tmp) as target:
            for step in (
                setup_study,
                probe_routes,
                probe_health,
                probe_log_forging,
                probe_bomb,
                probe_big_c_store,
                probe_stow,
                replay_corpus,
                probe_guesses,
                final_checks,
            ):
                rows += step(target)
        rows += probe_placeholder(tmp)
    elif stack == "node-worker":
        with node_worker_stack(tmp) as target:
            for step in (
                setup_study,
                probe_health,
                probe_routes,
                probe_log_forging,
                probe_bomb,
                probe_stow,
                probe_guesses,
                final_checks,
            ):
                rows += step(target)
    else:
        raise ValueError(f"stack must be one of {', '.join(STACKS)}, not {stack!r}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.security.hostile_clients")
    parser.add_argument("--stack", choices=STACKS, default="serve")
    parser.add_argument("--output", type=Path, default=ARTIFACT, help="append the table here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="d2r-hostile-") as tmp:
        rows = run(args.stack, Path(tmp))
    title = (
        f"hostile clients against d2r {args.stack} "
        f"({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
        f"{time.monotonic() - started:.0f} s)"
    )
    text = format_table(rows, title)
    print(text)
    write_table(text, args.output)
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
