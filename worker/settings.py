"""Worker configuration: :class:`WorkerSettings`, built once by an entry point.

Shares the node's settings (spool, database, destinations, AE title, send retries) and adds the
broker, the model and the task limits. Every invalid value raises
:class:`dicom_node.settings.ConfigError` naming the setting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from d2r_core.config import (
    env_setting,
    int_at_least,
    parse_bool,
    positive_float,
    refuse_placeholder,
)
from d2r_core.errors import ConfigError
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
BACKENDS = ("torch", "onnxruntime", "tensorrt")
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


@dataclass(frozen=True)
class WorkerSettings:
    """Settings of a worker process (and of the node's view of the queue)."""

    node: NodeSettings
    #: where the results go (``D2R_DESTINATIONS``) and how the senders connect
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    broker_url: str = "redis://127.0.0.1:6379/0"
    #: the Sentinel master group a ``sentinel://`` broker URL names (``D2R_BROKER_SENTINEL_MASTER``)
    broker_sentinel_master: str = "d2r"
    model_path: Path | None = None
    device: str = "cpu"
    backend: str = "torch"
    #: ONNX export (onnxruntime) or TensorRT engine (tensorrt) directory, ``D2R_ENGINE_DIR``
    engine_dir: Path | None = None
    #: wrap the torch backend's graphs in ``torch.compile`` (``D2R_TORCH_COMPILE``)
    torch_compile: bool = False
    task_time_limit: float = 600.0
    visibility_timeout: float = 720.0
    #: a claim holds this long unless renewed (``D2R_CLAIM_LEASE_SECONDS``)
    claim_lease_seconds: float = 30.0
    #: the worker renews its claim this often while it works (``D2R_CLAIM_HEARTBEAT_SECONDS``)
    claim_heartbeat_seconds: float = 10.0
    concurrency: int = 1
    text_sr: bool = True
    tracking_identifier_prefix: str = "lesion"
    #: lesion groups as TID 1410 planar ROIs (default) or as TID 1501 groups whose box sits
    #: under the Certainty NUM, with "<finding> <NN> %" Comments OHIF shows as box labels
    #: (``D2R_SR_ROI_ENCODING``)
    sr_roi_encoding: str = "tid1410"
    #: lesions below this score are not reported (None: the checkpoint's own threshold)
    lesion_min_score: float | None = None
    #: the checkpoint hash the worker must load (None: any checkpoint at ``model_path``)
    model_sha256: str | None = None
    #: decline images outside the checkpoint's validated inputs (``D2R_INPUT_GATE``)
    input_gate: bool = True
    #: which of the beam's reports is written (``D2R_REPORT_CHOICE``): ``consistent``, the one
    #: that agrees best with the detected boxes, or ``probable``, the most probable
    report_choice: str = "consistent"
    #: studies one worker runs through the model as one batch (``D2R_BATCH_MAX``; default
    #: :func:`default_batch_max` of the device)
    batch_max: int = 1
    #: how long a worker waits for more queued studies to fill a batch (``D2R_BATCH_WAIT_MS``)
    batch_wait_seconds: float = 0.02

    @property
    def queue_dir(self) -> Path:
        """Folder of the embedded ``filesystem://`` broker, beside the spool."""
        return self.node.spool_dir.parent / "queue"

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
        d = cls(node=NodeSettings())
        time_limit = env_setting(env, "D2R_TASK_TIME_LIMIT", d.task_time_limit, positive_float)
        visibility = env_setting(env, "D2R_VISIBILITY_TIMEOUT", time_limit + 120.0, positive_float)
        if visibility <= time_limit:
            raise ConfigError(
                "D2R_VISIBILITY_TIMEOUT",
                f"must exceed D2R_TASK_TIME_LIMIT ({time_limit:g} s) or a healthy task runs twice",
            )
        lease = env_setting(env, "D2R_CLAIM_LEASE_SECONDS", d.claim_lease_seconds, positive_float)
        heartbeat = env_setting(
            env, "D2R_CLAIM_HEARTBEAT_SECONDS", d.claim_heartbeat_seconds, positive_float
        )
        if heartbeat >= lease:
            raise ConfigError(
                "D2R_CLAIM_HEARTBEAT_SECONDS",
                f"must be shorter than D2R_CLAIM_LEASE_SECONDS ({lease:g} s) or a live claim "
                "expires between renewals",
            )
        model = env_setting(env, "D2R_MODEL", default_model_path(), Path)
        backend = env_setting(env, "D2R_BACKEND", d.backend, _backend)
        device = env_setting(env, "D2R_DEVICE", d.device, _device)
        engine_dir = env_setting(env, "D2R_ENGINE_DIR", None, Path)
        torch_compile = env_setting(env, "D2R_TORCH_COMPILE", d.torch_compile, parse_bool)
        _check_backend_settings(backend, device, engine_dir, torch_compile)
        node = NodeSettings.from_env(env)
        return cls(
            node=node,
            delivery=DeliverySettings.from_env(env, node),
            broker_url=env_setting(
                env, "D2R_BROKER_URL", default_broker or d.broker_url, _broker_url
            ),
            broker_sentinel_master=env_setting(
                env, "D2R_BROKER_SENTINEL_MASTER", d.broker_sentinel_master, _sentinel_master
            ),
            model_path=model,
            device=device,
            backend=backend,
            engine_dir=engine_dir,
            torch_compile=torch_compile,
            task_time_limit=time_limit,
            visibility_timeout=visibility,
            claim_lease_seconds=lease,
            claim_heartbeat_seconds=heartbeat,
            concurrency=env_setting(env, "D2R_WORKER_CONCURRENCY", d.concurrency, int_at_least(1)),
            text_sr=env_setting(env, "D2R_TEXT_SR", d.text_sr, parse_bool),
            tracking_identifier_prefix=env_setting(
                env, "D2R_SR_TRACKING_IDENTIFIER", d.tracking_identifier_prefix, str
            ),
            sr_roi_encoding=env_setting(
                env, "D2R_SR_ROI_ENCODING", d.sr_roi_encoding, _roi_encoding
            ),
            lesion_min_score=env_setting(env, "D2R_LESION_MIN_SCORE", None, _unit_interval),
            model_sha256=env_setting(env, "D2R_MODEL_SHA256", None, _sha256),
            input_gate=env_setting(env, "D2R_INPUT_GATE", d.input_gate, parse_bool),
            report_choice=env_setting(env, "D2R_REPORT_CHOICE", d.report_choice, _report_choice),
            batch_max=env_setting(env, "D2R_BATCH_MAX", default_batch_max(device), int_at_least(1)),
            batch_wait_seconds=env_setting(
                env, "D2R_BATCH_WAIT_MS", d.batch_wait_seconds * 1000.0, _batch_wait_ms
            )
            / 1000.0,
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
        if self.backend == "torch":
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
