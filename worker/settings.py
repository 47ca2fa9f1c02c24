"""Worker configuration: :class:`WorkerSettings`, built once by an entry point.

Shares the node's settings (spool, database, destinations, AE title, send retries) and adds the
broker, the model and the task limits, each declared once below (:data:`SETTINGS`) with its
default, parser and documentation. Every invalid value raises
:class:`dicom_node.settings.ConfigError` naming the setting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from d2r_core.config import (
    int_at_least,
    parse_bool,
    positive_float,
    refuse_placeholder,
)
from d2r_core.errors import ConfigError
from d2r_core.outputs import DEFAULT_OUTPUT_NAMES, parse_output_names
from d2r_core.settings_spec import Group, Setting
from delivery.settings import DeliverySettings
from dicom_node.settings import NodeSettings

FILESYSTEM_BROKER = "filesystem://"
#: ``D2R_BROKER_URL`` of a Redis behind Sentinel starts with this; ``;`` separates the sentinels
SENTINEL_BROKER = "sentinel://"
#: a sentinel's port when an entry names none
SENTINEL_PORT = 26379
_SENTINEL_MASTER = re.compile(r"[A-Za-z0-9._-]{1,128}")
#: the checkpoint shipped in the repository: trained on the synthetic phantom only, every SR it
#: produces is labelled "not for diagnostic use"; ``D2R_MODEL`` replaces it
BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "d2r-demo-phantom"
#: ``D2R_BACKEND``: ``auto`` chooses among the other three (``model.backend_choice``)
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
#: ``D2R_SR_ROI_ENCODING``: how the TID 1500 SR holds each box (``report.build.RoiEncoding``)
SR_ROI_ENCODINGS = ("tid1410", "tid1501")
#: the Python package each backend needs (checked before the worker starts)
_BACKEND_PACKAGES = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}


def _broker_url(text: str) -> str:
    scheme, sep, _ = text.partition("://")
    if scheme == "sentinel" and sep:
        _sentinel_list(text)
        text = ";".join(entry.strip() for entry in text.split(";"))
    elif not sep or scheme not in ("redis", "rediss", "filesystem", "amqp", "amqps", "memory"):
        raise ValueError(
            "expected redis://host:port/db (production), "
            "sentinel://host:port;sentinel://host:port;... (Redis Sentinel) "
            "or filesystem:// (embedded)"
        )
    return refuse_placeholder(text, "D2R_BROKER_URL")


def _sentinel_list(text: str) -> list[tuple[str, int]]:
    """The ``(host, port)`` of each entry of a ``sentinel://...;sentinel://...`` list.

    Every entry may carry the master's password and database (``sentinel://:pw@host:port/0``),
    and then all carry the same: the broker client takes them from whichever sentinel it is
    using. Spaces around ``;`` are allowed. Messages name the entry by position, never its
    text (it may hold a password).
    """
    sentinels: list[tuple[str, int]] = []
    first: tuple[str | None, str | None, str] | None = None
    for n, entry in enumerate(text.split(";"), start=1):
        where = f"sentinel entry {n}"
        parts = urlsplit(entry.strip())
        if parts.scheme != "sentinel":
            raise ValueError(f"{where}: expected sentinel://host:port, each entry separated by ;")
        host = parts.hostname
        try:
            port = SENTINEL_PORT if parts.port is None else parts.port
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError(f"{where}: the port is not a number in 1-65535")
        if not host:
            raise ValueError(f"{where}: no host")
        if parts.query or parts.fragment:
            raise ValueError(f"{where}: unexpected ?query or #fragment")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"{where}: the database must be a number (/0), not a name")
        auth = (parts.username, parts.password, db or "0")
        if first is None:
            first = auth
        elif auth != first:
            raise ValueError(f"{where}: every entry must name the same password and database")
        sentinels.append((host, port))
    return sentinels


def _sentinel_master(text: str) -> str:
    if not _SENTINEL_MASTER.fullmatch(text):
        raise ValueError(
            f"expected the Sentinel master name: letters, digits, '.', '-' and '_', got {text!r}"
        )
    return text


def _report_choice(text: str) -> str:
    from report.grounding import REPORT_CHOICES

    if text not in REPORT_CHOICES:
        raise ValueError(f"expected one of {', '.join(REPORT_CHOICES)}")
    return text


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"expected a number in [0, 1], got {text!r}")
    return value


def _sha256(text: str) -> str:
    value = text.lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("expected 64 hexadecimal digits (d2r init-model prints the hash)")
    return value


def _roi_encoding(text: str) -> str:
    value = text.strip().lower()
    if value not in SR_ROI_ENCODINGS:
        raise ValueError(f"expected one of {', '.join(SR_ROI_ENCODINGS)}, got {text!r}")
    return value


def _device(text: str) -> str:
    if text == "cpu" or text == "cuda" or text.startswith("cuda:"):
        return text
    raise ValueError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _backend(text: str) -> str:
    if text not in BACKENDS:
        raise ValueError(f"expected one of {', '.join(BACKENDS)}, got {text!r}")
    return text


def _check_backend_settings(
    backend: str, device: str, engine_dir: Path | None, torch_compile: bool
) -> None:
    """Consistency of ``D2R_BACKEND`` with the device, engine directory and compile flag."""
    if backend in ("onnxruntime", "tensorrt") and engine_dir is None:
        what = "an ONNX export (d2r export-onnx)" if backend == "onnxruntime" else "an engine"
        raise ConfigError("D2R_ENGINE_DIR", f"D2R_BACKEND={backend} needs {what} directory")
    if backend == "tensorrt" and not device.startswith("cuda"):
        raise ConfigError("D2R_DEVICE", f"D2R_BACKEND=tensorrt needs cuda, got {device!r}")
    if torch_compile and backend != "torch":
        raise ConfigError("D2R_TORCH_COMPILE", f"applies only to D2R_BACKEND=torch, not {backend}")


def default_backend_cache_dir(spool_dir: Path) -> Path:
    """``D2R_BACKEND_CACHE_DIR`` when unset: ``backend-cache`` beside the spool."""
    return spool_dir.parent / "backend-cache"


def default_batch_max(device: str) -> int:
    """``D2R_BATCH_MAX`` when unset: 8 on a GPU, where a batch costs little more than one
    study; 1 on the CPU, where it costs about as much as its studies one by one."""
    return 8 if device.startswith("cuda") else 1


def _batch_wait_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected milliseconds, a number >= 0, got {text!r}") from None
    if not 0.0 <= value <= 10_000.0:
        raise ValueError(f"expected milliseconds between 0 and 10000, got {text!r}")
    return value


def _checkpoint_sha256(model_path: Path) -> str:
    """The checkpoint's hash; an unreadable checkpoint is refused naming ``D2R_MODEL``."""
    from model.files import checkpoint_sha256  # not at the top: the node image has no model

    try:
        return checkpoint_sha256(model_path)
    except Exception as e:  # a bad checkpoint is reported by the model loader
        raise ConfigError("D2R_MODEL", f"{model_path}: {e}") from e


def default_model_path() -> Path | None:
    """The bundled demo checkpoint (:data:`BUNDLED_MODEL`) when present, else ``None``."""
    return BUNDLED_MODEL if (BUNDLED_MODEL / "model.json").is_file() else None


# --- the worker's settings, declared once (README.md "Configuration" is made from them) ---

BROKER_URL = Setting(
    "D2R_BROKER_URL",
    "redis://127.0.0.1:6379/0",
    _broker_url,
    "Celery broker; Redis Sentinel: the sentinels separated by `;`, "
    "`sentinel://host:26379;sentinel://host2:26379;sentinel://host3:26379`",
    Group.QUEUE,
    shown="`redis://127.0.0.1:6379/0` (`serve`: embedded `filesystem://`)",
    secret=True,
)
BROKER_SENTINEL_MASTER = Setting(
    "D2R_BROKER_SENTINEL_MASTER",
    "d2r",
    _sentinel_master,
    "the Redis Sentinel master name, used when `D2R_BROKER_URL` is a `sentinel://` list",
    Group.QUEUE,
)
TASK_TIME_LIMIT = Setting(
    "D2R_TASK_TIME_LIMIT",
    600.0,
    positive_float,
    "hard limit of one report task (seconds); a claim is never renewed beyond it",
    Group.QUEUE,
)
VISIBILITY_TIMEOUT = Setting(
    "D2R_VISIBILITY_TIMEOUT",
    720.0,
    positive_float,
    "Redis visibility timeout; must exceed the time limit",
    Group.QUEUE,
    shown="time limit + 120",
    default_from=lambda env: TASK_TIME_LIMIT.read(env) + 120.0,
)
CLAIM_LEASE_SECONDS = Setting(
    "D2R_CLAIM_LEASE_SECONDS",
    30.0,
    positive_float,
    "a worker's claim on a study expires this long after its last renewal; the reconciler then "
    "re-queues the study",
    Group.ASSEMBLY,
)
CLAIM_HEARTBEAT_SECONDS = Setting(
    "D2R_CLAIM_HEARTBEAT_SECONDS",
    10.0,
    positive_float,
    "how often a working worker renews its claim; must be shorter than the lease",
    Group.ASSEMBLY,
)
MODEL: Setting[Path | None] = Setting(
    "D2R_MODEL",
    None,
    Path,
    "D2R-Net checkpoint directory",
    Group.MODEL,
    shown="the bundled demo model",
    default_from=lambda env: default_model_path(),
)
WORKER_CONCURRENCY = Setting(
    "D2R_WORKER_CONCURRENCY",
    1,
    int_at_least(1),
    "pool processes per worker (one model each)",
    Group.MODEL,
)
DEVICE = Setting("D2R_DEVICE", "cpu", _device, "`cpu`, `cuda` or `cuda:N`", Group.MODEL)
BATCH_MAX = Setting(
    "D2R_BATCH_MAX",
    1,
    int_at_least(1),
    "studies a worker runs through the model as one batch: it claims up to this many queued "
    "studies, each with its own lease, and builds and sends each study's SRs separately",
    Group.MODEL,
    shown="`8` on `cuda`, `1` on `cpu`",
    default_from=lambda env: default_batch_max(DEVICE.read(env)),
)
BATCH_WAIT_MS = Setting(
    "D2R_BATCH_WAIT_MS",
    20.0,
    _batch_wait_ms,
    "how long a worker waits for more queued studies to fill a batch (milliseconds; `0`: only "
    "those already queued)",
    Group.MODEL,
)
MODEL_SHA256: Setting[str | None] = Setting(
    "D2R_MODEL_SHA256",
    None,
    _sha256,
    "the checkpoint hash the worker must load (`d2r init-model` and `d2r train` print it)",
    Group.MODEL,
)
BACKEND = Setting(
    "D2R_BACKEND",
    "auto",
    _backend,
    "`auto` (the fastest backend verified for this checkpoint and device: onnxruntime on "
    "the CPU, TensorRT or torch on a GPU), or exactly `torch`, `onnxruntime` or `tensorrt` "
    "(see `docs/backends.md`)",
    Group.MODEL,
)
BACKEND_CACHE_DIR: Setting[Path | None] = Setting(
    "D2R_BACKEND_CACHE_DIR",
    None,
    Path,
    "where `D2R_BACKEND=auto` keeps its checked ONNX exports, one per checkpoint "
    "(default `backend-cache` beside the spool)",
    Group.MODEL,
)
ENGINE_DIR: Setting[Path | None] = Setting(
    "D2R_ENGINE_DIR",
    None,
    Path,
    "ONNX export or TensorRT engine directory for those backends",
    Group.MODEL,
)
TORCH_COMPILE = Setting(
    "D2R_TORCH_COMPILE",
    False,
    parse_bool,
    "run the torch backend through `torch.compile`",
    Group.MODEL,
)
LESION_MIN_SCORE: Setting[float | None] = Setting(
    "D2R_LESION_MIN_SCORE",
    None,
    _unit_interval,
    "report lesions from this detector score up (0..1)",
    Group.OUTPUT,
    shown="the checkpoint's",
)
INPUT_GATE = Setting(
    "D2R_INPUT_GATE",
    True,
    parse_bool,
    "decline images outside the checkpoint's validated inputs (abstention SR, study `done` with "
    "reason `abstained: ...`); a checkpoint without `gate.safetensors` is refused at start (fit "
    "one with `d2r calibrate-gate --model DIR --data DIR`); `off` writes a note saying so in "
    "every SR",
    Group.OUTPUT,
    shown="`on`",
)
REPORT_CHOICE = Setting(
    "D2R_REPORT_CHOICE",
    "consistent",
    _report_choice,
    "which of the report generator's beam hypotheses (5) becomes the report: `consistent`, the "
    "one that agrees best with the detected boxes (fewest boxes the text denies, then most "
    "boxes it states, then fewest findings without a box, then the most probable; "
    "`docs/model.md`), or `probable`, the most probable (beam of the checkpoint's `beam_size`)",
    Group.OUTPUT,
)
TEXT_SR = Setting(
    "D2R_TEXT_SR",
    True,
    parse_bool,
    "also send the Basic Text SR; `false` removes `text` from `D2R_OUTPUTS`",
    Group.DELIVERY,
)


OUTPUTS: Setting[tuple[str, ...]] = Setting(
    "D2R_OUTPUTS",
    DEFAULT_OUTPUT_NAMES,
    parse_output_names,
    "the objects sent for each study, comma-separated: `tid1500` (the TID 1500 SR), `text` "
    "(the Basic Text SR), `gsps` (a presentation state drawing the boxes in most viewers), `sc` "
    "(a Secondary Capture with the boxes burned in); at least one SR "
    "(`docs/what-the-reader-sees.md`)",
    Group.DELIVERY,
)
SR_TRACKING_IDENTIFIER = Setting(
    "D2R_SR_TRACKING_IDENTIFIER",
    "lesion",
    str,
    "prefix of each lesion's Tracking Identifier; `Cornerstone3DTools@^0.1.0:RectangleROI` (used "
    "verbatim) lets OHIF turn the boxes into editable rectangles",
    Group.DELIVERY,
)
SR_ROI_ENCODING = Setting(
    "D2R_SR_ROI_ENCODING",
    "tid1410",
    _roi_encoding,
    "how the TID 1500 SR holds each box: `tid1410` planar ROI groups (what 3D Slicer, highdicom "
    'and IHE AIR consumers read as a bounding box; OHIF labels a box "Certainty of Finding: '
    '87.00 %"), or `tid1501` groups with the box under the Certainty NUM and Comment labels, '
    'which OHIF shows as "Pleural effusion 47 %" plus the grounded sentence '
    '(`docs/air-conformance.md`, "Box labels in OHIF")',
    Group.DELIVERY,
)
#: every setting :class:`WorkerSettings` reads besides the node's and the delivery's
SETTINGS: tuple[Setting[Any], ...] = (
    BROKER_URL,
    BROKER_SENTINEL_MASTER,
    TASK_TIME_LIMIT,
    VISIBILITY_TIMEOUT,
    CLAIM_LEASE_SECONDS,
    CLAIM_HEARTBEAT_SECONDS,
    MODEL,
    WORKER_CONCURRENCY,
    DEVICE,
    BATCH_MAX,
    BATCH_WAIT_MS,
    MODEL_SHA256,
    BACKEND,
    BACKEND_CACHE_DIR,
    ENGINE_DIR,
    TORCH_COMPILE,
    LESION_MIN_SCORE,
    INPUT_GATE,
    REPORT_CHOICE,
    TEXT_SR,
    OUTPUTS,
    SR_TRACKING_IDENTIFIER,
    SR_ROI_ENCODING,
)


@dataclass(frozen=True)
class WorkerSettings:
    """Settings of a worker process (and of the node's view of the queue)."""

    node: NodeSettings
    #: where the results go (``D2R_DESTINATIONS``) and how the senders connect
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    broker_url: str = BROKER_URL.default
    #: the Sentinel master group a ``sentinel://`` broker URL names (``D2R_BROKER_SENTINEL_MASTER``)
    broker_sentinel_master: str = BROKER_SENTINEL_MASTER.default
    model_path: Path | None = MODEL.default
    device: str = DEVICE.default
    backend: str = BACKEND.default
    #: ONNX export (onnxruntime) or TensorRT engine (tensorrt, or auto on a GPU) directory,
    #: ``D2R_ENGINE_DIR``
    engine_dir: Path | None = ENGINE_DIR.default
    #: the checked ONNX exports of ``D2R_BACKEND=auto`` (``D2R_BACKEND_CACHE_DIR``; None: beside
    #: the spool, :attr:`backend_cache`)
    backend_cache_dir: Path | None = BACKEND_CACHE_DIR.default
    #: wrap the torch backend's graphs in ``torch.compile`` (``D2R_TORCH_COMPILE``)
    torch_compile: bool = TORCH_COMPILE.default
    task_time_limit: float = TASK_TIME_LIMIT.default
    visibility_timeout: float = VISIBILITY_TIMEOUT.default
    #: a claim holds this long unless renewed (``D2R_CLAIM_LEASE_SECONDS``)
    claim_lease_seconds: float = CLAIM_LEASE_SECONDS.default
    #: the worker renews its claim this often while it works (``D2R_CLAIM_HEARTBEAT_SECONDS``)
    claim_heartbeat_seconds: float = CLAIM_HEARTBEAT_SECONDS.default
    concurrency: int = WORKER_CONCURRENCY.default
    text_sr: bool = TEXT_SR.default
    #: the objects written and sent for each study (``D2R_OUTPUTS``; ``report.outputs.Output``
    #: values); ``text`` only while :attr:`text_sr` is on
    outputs: tuple[str, ...] = OUTPUTS.default
    tracking_identifier_prefix: str = SR_TRACKING_IDENTIFIER.default
    #: lesion groups as TID 1410 planar ROIs (default) or as TID 1501 groups whose box sits
    #: under the Certainty NUM, with "<finding> <NN> %" Comments OHIF shows as box labels
    #: (``D2R_SR_ROI_ENCODING``)
    sr_roi_encoding: str = SR_ROI_ENCODING.default
    #: lesions below this score are not reported (None: the checkpoint's own threshold)
    lesion_min_score: float | None = LESION_MIN_SCORE.default
    #: the checkpoint hash the worker must load (None: any checkpoint at ``model_path``)
    model_sha256: str | None = MODEL_SHA256.default
    #: decline images outside the checkpoint's validated inputs (``D2R_INPUT_GATE``)
    input_gate: bool = INPUT_GATE.default
    #: which of the beam's reports is written (``D2R_REPORT_CHOICE``): ``consistent``, the one
    #: that agrees best with the detected boxes, or ``probable``, the most probable
    report_choice: str = REPORT_CHOICE.default
    #: studies one worker runs through the model as one batch (``D2R_BATCH_MAX``; default
    #: :func:`default_batch_max` of the device)
    batch_max: int = BATCH_MAX.default
    #: how long a worker waits for more queued studies to fill a batch (``D2R_BATCH_WAIT_MS``)
    batch_wait_seconds: float = 0.02

    @property
    def queue_dir(self) -> Path:
        """Folder of the embedded ``filesystem://`` broker, beside the spool."""
        return self.node.spool_dir.parent / "queue"

    @property
    def backend_cache(self) -> Path:
        """The export cache of ``D2R_BACKEND=auto`` (:func:`default_backend_cache_dir`)."""
        return self.backend_cache_dir or default_backend_cache_dir(self.node.spool_dir)

    @property
    def results_dir(self) -> Path:
        """Where the SRs of each study are written before they are sent."""
        return self.node.spool_dir / "results"

    @property
    def max_send_attempts(self) -> int:
        return self.node.send_retries + 1

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], *, default_broker: str | None = None
    ) -> WorkerSettings:
        """Build settings from ``D2R_*`` variables.

        ``default_broker`` replaces the Redis default when ``D2R_BROKER_URL`` is unset
        (``d2r serve`` passes ``filesystem://``).
        """
        time_limit = TASK_TIME_LIMIT.read(env)
        visibility = VISIBILITY_TIMEOUT.read(env)
        if visibility <= time_limit:
            raise ConfigError(
                VISIBILITY_TIMEOUT.name,
                f"must exceed D2R_TASK_TIME_LIMIT ({time_limit:g} s) or a healthy task runs twice",
            )
        lease = CLAIM_LEASE_SECONDS.read(env)
        heartbeat = CLAIM_HEARTBEAT_SECONDS.read(env)
        if heartbeat >= lease:
            raise ConfigError(
                CLAIM_HEARTBEAT_SECONDS.name,
                f"must be shorter than D2R_CLAIM_LEASE_SECONDS ({lease:g} s) or a live claim "
                "expires between renewals",
            )
        model = MODEL.read(env)
        backend = BACKEND.read(env)
        device = DEVICE.read(env)
        engine_dir = ENGINE_DIR.read(env)
        torch_compile = TORCH_COMPILE.read(env)
        _check_backend_settings(backend, device, engine_dir, torch_compile)
        node = NodeSettings.from_env(env)
        return cls(
            node=node,
            delivery=DeliverySettings.from_env(env, node),
            broker_url=BROKER_URL.read(env, default=default_broker or BROKER_URL.default),
            broker_sentinel_master=BROKER_SENTINEL_MASTER.read(env),
            model_path=model,
            device=device,
            backend=backend,
            engine_dir=engine_dir,
            backend_cache_dir=BACKEND_CACHE_DIR.read(env),
            torch_compile=torch_compile,
            task_time_limit=time_limit,
            visibility_timeout=visibility,
            claim_lease_seconds=lease,
            claim_heartbeat_seconds=heartbeat,
            concurrency=WORKER_CONCURRENCY.read(env),
            text_sr=TEXT_SR.read(env),
            outputs=OUTPUTS.read(env),
            tracking_identifier_prefix=SR_TRACKING_IDENTIFIER.read(env),
            sr_roi_encoding=SR_ROI_ENCODING.read(env),
            lesion_min_score=LESION_MIN_SCORE.read(env),
            model_sha256=MODEL_SHA256.read(env),
            input_gate=INPUT_GATE.read(env),
            report_choice=REPORT_CHOICE.read(env),
            batch_max=BATCH_MAX.read(env),
            batch_wait_seconds=BATCH_WAIT_MS.read(env) / 1000.0,
        )

    def require_model(self) -> Path:
        """The checkpoint directory, or a :class:`ConfigError` naming ``D2R_MODEL``."""
        if self.model_path is None:
            raise ConfigError(
                "D2R_MODEL", "no model configured: set it to a D2R-Net checkpoint directory"
            )
        if not self.model_path.is_dir():
            raise ConfigError("D2R_MODEL", f"{self.model_path} is not a checkpoint directory")
        actual: str | None = None
        if self.model_sha256 is not None:  # refuse to start on an unexpected checkpoint
            actual = _checkpoint_sha256(self.model_path)
            self.verify_model_sha256(actual)
        self.require_gate(self.model_path)
        self.require_backend(self.model_path, actual)
        return self.model_path

    def require_gate(self, model_path: Path) -> None:
        """Refuse, naming ``D2R_INPUT_GATE``, a checkpoint without input-gate statistics
        while the gate is on."""
        from model.files import GATE_FILE

        if self.input_gate and not (model_path / GATE_FILE).is_file():
            raise ConfigError(
                "D2R_INPUT_GATE",
                f"checkpoint {model_path} has no input-gate statistics ({GATE_FILE}): run "
                f"d2r calibrate-gate --model {model_path} --data DIR, or set D2R_INPUT_GATE=off",
            )

    def require_backend(self, model_path: Path, sha256: str | None = None) -> None:
        """Refuse a backend that cannot start, before any worker process starts.

        Checks that the backend's package is installed and that ``D2R_ENGINE_DIR`` holds
        an export (``export.json``) or engine (``manifest.json``) of the checkpoint at
        ``model_path`` (whose hash is ``sha256`` when the caller has it already).
        GPU and TensorRT version checks happen when the engine loads.

        Raises
        ------
        ConfigError
            Naming ``D2R_BACKEND`` or ``D2R_ENGINE_DIR``.
        """
        if self.backend in ("torch", "auto"):  # auto never refuses: it falls back to torch
            return
        import importlib.util
        import json

        package = _BACKEND_PACKAGES[self.backend]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                "D2R_BACKEND", f"{self.backend}: the {package} package is not installed"
            )
        assert self.engine_dir is not None  # from_env guarantees it
        if not self.engine_dir.is_dir():
            raise ConfigError("D2R_ENGINE_DIR", f"{self.engine_dir} is not a directory")
        name = "export.json" if self.backend == "onnxruntime" else "manifest.json"
        try:
            recorded = json.loads((self.engine_dir / name).read_text())["checkpoint_sha256"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                "D2R_ENGINE_DIR", f"{self.engine_dir}: no readable {name} ({e})"
            ) from None
        actual = sha256 or _checkpoint_sha256(model_path)
        if recorded != actual:
            raise ConfigError(
                "D2R_ENGINE_DIR",
                f"{self.engine_dir} was made from checkpoint {str(recorded)[:12]}, "
                f"D2R_MODEL is {actual[:12]}; rebuild it for this checkpoint",
            )

    def verify_model_sha256(self, actual: str) -> None:
        """Refuse a loaded checkpoint whose hash differs from ``D2R_MODEL_SHA256``.

        ``actual`` is ``model.checkpoint.checkpoint_sha256`` of the loaded checkpoint (the
        predictor's ``checkpoint_sha256``). Nothing is checked when no hash is pinned.

        Raises
        ------
        ConfigError
            Naming ``D2R_MODEL_SHA256``, with both hashes' first 12 digits.
        """
        if self.model_sha256 is None or actual.lower() == self.model_sha256:
            return
        raise ConfigError(
            "D2R_MODEL_SHA256",
            f"checkpoint {self.model_path} has sha256 {actual[:12]}..., "
            f"expected {self.model_sha256[:12]}...; refusing to load it",
        )
