"""The Celery application: late acknowledgement, prefetch 1, JSON only, no result backend.

:func:`create_app` builds it from :class:`~worker.settings.WorkerSettings`. The node uses the same
app only to *send* tasks by name, so importing this module never imports torch or the model;
``include_tasks=True`` (the worker) registers :mod:`worker.tasks`.

``celery -A worker.celery_app worker`` also works: the module attribute ``app`` is built on first
access from the environment (``D2R_CONFIG`` names an optional config file).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from celery import Celery

from d2r_core.config import merged_environment
from worker.messages import (
    BROKER_PRIORITY_STEPS,
    REPORT_QUEUE,
    REPORT_TASK,
    SEND_QUEUE,
    SEND_TASK,
)
from worker.settings import FILESYSTEM_BROKER, SENTINEL_BROKER, WorkerSettings

if TYPE_CHECKING:
    from observability.audit import AuditLog


#: seconds a connection to a sentinel or the master waits to connect, or for an answer
SENTINEL_SOCKET_TIMEOUT = 5.0
#: how long sending a task to a ``sentinel://`` broker retries before the caller sees the error
SENTINEL_PUBLISH_RETRY_SECONDS = 15.0


def sentinel_publish_retry_policy(settings: WorkerSettings) -> dict[str, Any]:
    """Celery's publish retry policy for a ``sentinel://`` broker.

    The sentinels take ``down-after-milliseconds`` plus an election (a few seconds) to promote
    a replica; until then a publish fails. It is tried again after 0, 0.5, then every 1 s for
    :data:`SENTINEL_PUBLISH_RETRY_SECONDS` (the node then keeps a job it could not send and
    sends it again on its next tick). kombu tries every sentinel entry once per interval, so
    the retry count is per entry.
    """
    entries = settings.broker_url.count(";") + 1
    return {
        "max_retries": (int(SENTINEL_PUBLISH_RETRY_SECONDS) + 1) * entries,
        "interval_start": 0.0,
        "interval_step": 0.5,
        "interval_max": 1.0,
    }


#: kombu's file-system transport, filing messages by priority (``D2R_BROKER_URL=filesystem://``)
EMBEDDED_TRANSPORT = "worker.embedded_queue:Transport"


# Longer than a screen: a table of Celery settings, one line each
def celery_config(settings: WorkerSettings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (pure)."""
    transport: dict[str, Any]
    if settings.broker_url.startswith(FILESYSTEM_BROKER):
        messages = settings.queue_dir / "messages"
        transport = {
            "data_folder_in": str(messages),
            "data_folder_out": str(messages),
            "processed_folder": str(settings.queue_dir / "processed"),
            "control_folder": str(settings.queue_dir / "control"),
            "store_processed": False,
            "polling_interval": 0.05,
        }
    else:
        transport = {
            # Must exceed the longest task, or a healthy task is delivered twice.
            "visibility_timeout": settings.visibility_timeout,
            # one list per study priority (worker.messages.broker_priority); 0 is served first
            "priority_steps": list(BROKER_PRIORITY_STEPS),
            # Restore messages of a killed worker promptly (kombu's default sweep is ~100 s).
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
        }
    sentinel = settings.broker_url.startswith(SENTINEL_BROKER)
    if sentinel:
        transport.update(
            {
                # the sentinels name the current master of this group on every (re)connection
                "master_name": settings.broker_sentinel_master,
                # a master or sentinel host that vanished fails in seconds, not after TCP's
                # retransmission timeout, so the client moves on to the new master
                "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT,
                "socket_timeout": SENTINEL_SOCKET_TIMEOUT,
                # a publish that finds no connection retries this long to establish one
                # (else Celery's broker_connection_timeout, 4 s: shorter than a failover)
                "connect_retries_timeout": SENTINEL_PUBLISH_RETRY_SECONDS,
            }
        )
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        # the embedded queue serves messages by priority, as Redis does (worker.embedded_queue)
        "broker_transport": EMBEDDED_TRANSPORT
        if settings.broker_url.startswith(FILESYSTEM_BROKER)
        else None,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        # the worker reconnects after losing the broker (to the new master after a failover)
        "broker_connection_retry": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": max(
            settings.task_time_limit - 30.0, settings.task_time_limit * 0.9
        ),
        "task_default_queue": REPORT_QUEUE,
        "task_routes": {REPORT_TASK: {"queue": REPORT_QUEUE}, SEND_TASK: {"queue": SEND_QUEUE}},
    }
    if sentinel:
        config["task_publish_retry_policy"] = sentinel_publish_retry_policy(settings)
    return config


def create_app(
    settings: WorkerSettings, *, include_tasks: bool = False, audit: AuditLog | None = None
) -> Celery:
    """A configured Celery app; ``include_tasks`` registers the tasks (worker side).

    ``audit`` receives one line per SR object sent.
    """
    if settings.broker_url.startswith(FILESYSTEM_BROKER):
        for sub in ("messages", "processed", "control"):
            (settings.queue_dir / sub).mkdir(parents=True, exist_ok=True)
    app = Celery("d2r", set_as_current=False)
    app.conf.update(celery_config(settings))
    if include_tasks:
        from worker.tasks import register_tasks

        register_tasks(app, settings, audit=audit)
    return app


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from observability.audit import AuditLog
        from observability.settings import ObservabilitySettings

        env = merged_environment(os.environ.get("D2R_CONFIG"), os.environ)
        obs = ObservabilitySettings.from_env(env)
        value = create_app(
            WorkerSettings.from_env(env),
            include_tasks=True,
            audit=AuditLog(obs.audit_log, fsync=obs.audit_fsync),
        )
        globals()["app"] = globals()["celery"] = value
        return value
    raise AttributeError(name)
