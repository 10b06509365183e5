"""The one mapping from bgqueue to Celery settings; each risky default set on purpose."""

from __future__ import annotations

from typing import Any

from bgqueue.broker import ssl_options
from bgqueue.model.keys import AppKeys


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
        # notification, and the generation check in start.lua makes redelivery harmless
        # (the requeue is the worker's own, in memory: see ack emulation below).
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
        # No ack emulation: kombu would write every delivered message to an "unacked" hash
        # and delete it on the ack (two MULTI/EXEC per run) only to restore a dead worker's
        # messages an hour later. bgqueue's own leases recover a request whose message was
        # lost with its worker, within seconds (lapsed dispatch, lapsed run). Two priority
        # steps, the lanes bgqueue uses (keys.AppKeys.KOMBU_PRIORITY_STEPS): each queue
        # is two lists in every BRPOP instead of four.
        "broker_transport_options": {
            "ack_emulation": False,
            "priority_steps": list(AppKeys.KOMBU_PRIORITY_STEPS),
        },
        "worker_disable_rate_limits": True,
        "task_create_missing_queues": True,
        "enable_utc": True,
    }
    tls = ssl_options(broker_url)
    if tls is not None:
        # Celery refuses rediss:// without an explicit certificate policy; verify by default.
        config["broker_use_ssl"] = tls
    return config
