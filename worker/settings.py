"""Worker configuration: :class:`WorkerSettings`, built once by an entry point.

Shares the node's settings (spool, database, destinations, AE title, send retries) and adds the
broker, the model and the task limits. Every invalid value raises
:class:`dicom_node.settings.ConfigError` naming the setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dicom_node.settings import ConfigError, NodeSettings, _get, _int, _positive_float

FILESYSTEM_BROKER = "filesystem://"
BACKENDS = ("torch",)


def _broker_url(text: str) -> str:
    scheme, sep, _ = text.partition("://")
    if not sep or scheme not in ("redis", "rediss", "filesystem", "amqp", "amqps", "memory"):
        raise ValueError("expected redis://host:port/db (production) or filesystem:// (embedded)")
    return text


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _device(text: str) -> str:
    if text == "cpu" or text == "cuda" or text.startswith("cuda:"):
        return text
    raise ValueError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _backend(text: str) -> str:
    if text not in BACKENDS:
        raise ValueError(f"expected one of {', '.join(BACKENDS)}, got {text!r}")
    return text


@dataclass(frozen=True)
class WorkerSettings:
    """Settings of a worker process (and of the node's view of the queue)."""

    node: NodeSettings
    broker_url: str = "redis://127.0.0.1:6379/0"
    model_path: Path | None = None
    device: str = "cpu"
    backend: str = "torch"
    task_time_limit: float = 600.0
    visibility_timeout: float = 720.0
    concurrency: int = 1
    text_sr: bool = True
    tracking_identifier_prefix: str = "lesion"

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
        time_limit = _get(env, "D2R_TASK_TIME_LIMIT", d.task_time_limit, _positive_float)
        visibility = _get(env, "D2R_VISIBILITY_TIMEOUT", time_limit + 120.0, _positive_float)
        if visibility <= time_limit:
            raise ConfigError(
                "D2R_VISIBILITY_TIMEOUT",
                f"must exceed D2R_TASK_TIME_LIMIT ({time_limit:g} s) or a healthy task runs twice",
            )
        model = _get(env, "D2R_MODEL", None, Path)
        return cls(
            node=NodeSettings.from_env(env),
            broker_url=_get(env, "D2R_BROKER_URL", default_broker or d.broker_url, _broker_url),
            model_path=model,
            device=_get(env, "D2R_DEVICE", d.device, _device),
            backend=_get(env, "D2R_BACKEND", d.backend, _backend),
            task_time_limit=time_limit,
            visibility_timeout=visibility,
            concurrency=_get(env, "D2R_WORKER_CONCURRENCY", d.concurrency, _int(1)),
            text_sr=_get(env, "D2R_TEXT_SR", d.text_sr, _bool),
            tracking_identifier_prefix=_get(
                env, "D2R_SR_TRACKING_IDENTIFIER", d.tracking_identifier_prefix, str
            ),
        )

    def require_model(self) -> Path:
        """The checkpoint directory, or a :class:`ConfigError` naming ``D2R_MODEL``."""
        if self.model_path is None:
            raise ConfigError(
                "D2R_MODEL", "no model configured: set it to a D2R-Net checkpoint directory"
            )
        if not self.model_path.is_dir():
            raise ConfigError("D2R_MODEL", f"{self.model_path} is not a checkpoint directory")
        return self.model_path
