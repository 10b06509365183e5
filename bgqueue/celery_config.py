"""The one mapping from bgqueue to Celery settings; each risky default set on purpose."""

from __future__ import annotations

from typing import Any

from bgqueue.broker import ssl_options


def celery_config(broker_url: str) -> dict[str, Any]:
    """Celery settings for workers, beat's publisher and Flower on this broker."""
    config: dict[str, Any] = {
        "broker_url": broker_url,
        # JSON only: accepting Python object serialization from a shared broker is remote
        # code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        # Outcomes live in bgqueue's history in Redis; a result backend would double the writes.
        "task_ignore_result": True,
        "result_backend": None,
        # Ack after the run and requeue if the pool process dies: the message is only a
        # notification, and the generation check in start.lua makes redelivery harmless.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One message per free process: nothing waits in a busy worker's memory.
        "worker_prefetch_multiplier": 1,
        # Events on, so Flower sees every task from its receipt by a worker. Beat sends no
        # task-sent events: one more round trip per dispatch, for a state bgqueue's own
        # records already show (dispatched).
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        # Keep running tasks when the broker connection drops; their state is in Redis.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
        # Unacked messages of a dead worker come back after this; by then bgqueue's own
        # lease sweep has requeued the request, so the late copy is recognised as stale.
        "broker_transport_options": {"visibility_timeout": 3600},
        "worker_disable_rate_limits": True,
        "task_create_missing_queues": True,
        "enable_utc": True,
    }
    tls = ssl_options(broker_url)
    if tls is not None:
        # Celery refuses rediss:// without an explicit certificate policy; verify by default.
        config["broker_use_ssl"] = tls
    return config
