"""What a worker takes off its queues: Celery's consumer and kombu's Redis transport, each
guarded against what is not a run's message. Celery logs such a message with its body (which
may carry secrets) and drops it, and kombu raises out of the worker's event loop on an item
that is not even JSON, which stops the worker; here the log line names the queue and what
was wrong, and the item goes to the app's dead letter.

Also gathers the task events a worker publishes, so that a run costs its main process one
event message per EVENTS_FLUSH_AFTER rather than two round trips.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from typing import Any

import redis
from celery import signals
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.transport import redis as kombu_redis

from bgqueue.broker import deadletter
from bgqueue.model.keys import AppKeys

log = logging.getLogger("bgqueue.worker")

EVENTS_FLUSH_AFTER = 0.05  # seconds task events are gathered before they are published


# Sent by `Consumer` for a message on a bgqueue queue whose body cannot be decoded.
message_undecodable = signals.Signal(name="message_undecodable")


# What Celery's Request raises reading a task body of the wrong shape.
BODY_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError)


def _body_problem(body: Any) -> str | None:
    """Why a task message's body is not Celery's [args, kwargs, embed], or None."""
    if not isinstance(body, list | tuple) or len(body) != 3:
        return "the body is not [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        return "the body's args are not a list or its kwargs not an object"
    if embed is not None and not isinstance(embed, dict):
        return "the body's embed is not an object"
    return None


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, except for messages it refuses: one that is not a task message,
    an invalid one, one whose body cannot be decoded, one naming no registered task. Celery
    logs those with their body (which may carry secrets) and drops them; here the log line
    names the queue and what was wrong, and the message goes to the app's dead letter
    (through `task_rejected`, `task_unknown` and `message_undecodable`)."""

    _events_flush_due = False

    def on_send_event_buffered(self) -> None:
        # Celery flushes buffered task events on the event loop's next turn: a PUBLISH round
        # trip that holds up the loop, for about every event (two per run). Gathered for up
        # to EVENTS_FLUSH_AFTER they go in one message; Flower shows them that much later.
        if self.hub and not self._events_flush_due:
            self._events_flush_due = True
            self.hub.call_later(EVENTS_FLUSH_AFTER, self._flush_gathered_events)

    def _flush_gathered_events(self) -> None:
        self._events_flush_due = False
        self._flush_events()

    def shutdown(self) -> None:
        self._flush_events()  # the last events gathered, before the dispatcher closes
        super().shutdown()

    def update_strategies(self) -> None:
        """Celery's strategies, guarded: a task message whose body has the wrong shape (say,
        an object where Celery expects [args, kwargs, embed]) raises in Celery's Request
        constructor, which stops the whole worker and restores the message, so every
        restart would stop again. Here it is an invalid task message instead."""
        super().update_strategies()
        for name, strategy in list(self.strategies.items()):
            self.strategies[name] = self._guarded(strategy)

    def _guarded(self, strategy: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(message: Any, payload: Any, *args: Any, **kwargs: Any) -> Any:
            if payload is None:  # protocol 2: Celery would decode the body in the pool
                try:
                    problem = _body_problem(message.decode())  # cached for Celery
                except Exception as exc:
                    return self.on_decode_error(message, exc)
                if problem is not None:
                    return self.on_invalid_task(None, message, ValueError(problem))
            try:
                return strategy(message, payload, *args, **kwargs)
            except BODY_ERRORS as exc:
                return self.on_invalid_task(payload, message, exc)

        return guarded

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        log.error("undecodable message on %s: %s", deadletter.queue_of(message), type(exc).__name__)
        try:
            message_undecodable.send(sender=self, message=message, exc=exc)
        finally:
            message.ack()

    def on_unknown_message(self, body: Any, message: Any) -> None:
        log.error("not a task message on %s", deadletter.queue_of(message))
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        where = deadletter.queue_of(message)
        log.error("invalid task message on %s: %s", where, type(exc).__name__)
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        name, task_id = str(headers.get("task")), str(headers.get("id"))
        log.error("unregistered task %r on %s", name[:200], deadletter.queue_of(message))
        message.reject_log_error(log, self.connection_errors)
        if self.event_dispatcher:  # Flower shows it failed, as Celery's own handler does
            failure = f"NotRegistered({name[:200]!r})"
            self.event_dispatcher.send("task-failed", uuid=task_id, exception=failure)
        signals.task_unknown.send(sender=self, message=message, exc=exc, name=name, id=task_id)


# -- the transport: items on a queue's list that are not kombu messages -------------------

APP_OPTION = "bgqueue_app_id"  # broker transport option naming the worker's app


def _dead_letter_raw(pool: Any, app_id: str | None, where: str, why: str, raw: object) -> None:
    log.error("not a message on %s: %s", where, why)
    if app_id is None:
        return
    try:
        deadletter.push(redis.Redis(connection_pool=pool), AppKeys(app_id), where, why, raw)
    except Exception as exc:  # never let a foreign item fail the consumer
        log.warning("could not record a dead letter: %s", type(exc).__name__)


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, except that an item popped off a queue that is not even JSON
    goes to the dead letter: kombu would raise out of the worker's event loop, which
    stops the worker (Celery's "Unrecoverable error")."""

    def _restore(self, message: Any, leftmost: bool = False) -> Any:
        # A message requeued by its worker (its pool process was killed) goes back in one
        # piece; without ack emulation kombu marks the copy redelivered only where Celery
        # does not look, so mark its delivery_info as the unacked-hash restore would.
        message.delivery_info["redelivered"] = True
        return super()._restore(message, leftmost)  # type: ignore[no-untyped-call]

    _sync: tuple[Any, Any] = (None, None)  # (pool, client) of _create_client

    def _create_client(self, asynchronous: bool = False) -> Any:
        # kombu makes a redis-py client for every command it sends outside its event loop,
        # such as each task event the worker publishes (three per run), and a redis-py
        # client copies some hundred response callbacks when made: a third of the worker's
        # main-process CPU per run. One client per pool serves them all (it is thread-safe).
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool, client = self._sync
        if pool is not self.pool or client is None:
            client = super()._create_client()  # type: ignore[no-untyped-call]
            self._sync = (self.pool, client)
        return client

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))  # type: ignore[no-untyped-call]
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raw = exc.doc if isinstance(exc, json.JSONDecodeError) else exc.object
            app_id = self.connection.client.transport_options.get(APP_OPTION)
            _dead_letter_raw(self.pool, app_id, "a queue", "not a kombu message (not JSON)", raw)
            return True


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with `Channel`, and an envelope check before delivery: a JSON
    item without kombu's properties would raise out of the event loop too."""

    Channel = Channel

    def _deliver(self, message: Any, queue: str) -> None:
        problem = _envelope_problem(message)
        if problem is None:
            super()._deliver(message, queue)  # type: ignore[no-untyped-call]
            return
        client: Any = self.client  # the kombu Connection
        app_id = client.transport_options.get(APP_OPTION)
        pool = self.channels[0].pool if self.channels else None
        _dead_letter_raw(pool, app_id, f"queue {queue}", problem, message)


def _envelope_problem(message: Any) -> str | None:
    """Why a popped item is not a kombu message (what kombu's Message reads), or None."""
    properties = message.get("properties") if isinstance(message, dict) else None
    if not isinstance(properties, dict) or "delivery_tag" not in properties:
        return "not a kombu message (no properties.delivery_tag)"
    if not isinstance(properties.get("delivery_info", {}), dict):
        return "not a kombu message (delivery_info is not an object)"
    body = message.get("body")
    if properties.get("body_encoding") == "base64" and body:
        try:
            base64.b64decode(body, validate=True)
        except (ValueError, TypeError):
            return "not a kombu message (body is not base64)"
    return None
