"""The worker side: a Celery app per BackgroundApp, its tasks, and the heartbeat.

Each registered identifier is a Celery task of the same name, so Flower shows
every kind of work under its own name. A worker belongs to a *class*: the requirement
profiles its conditions satisfy and the handlers its build registered. It consumes its
class's queue and its own, and announces its class in a heartbeat; beat sends a request
only to a class that satisfies its requirements and has its handler, so during a rolling
deploy an old build is never offered what it cannot run. One that gets such a request
anyway (its class changed meanwhile) hands it back unharmed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis
from celery import Celery, signals
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.request import Request
from kombu.transport import redis as kombu_redis

from bgqueue import body, conditions, continuous_runtime, deadletter, runtime, work_runtime
from bgqueue.celery_config import celery_config
from bgqueue.errors import TaskExpired, TaskFailed, TaskOutcomeError, TaskUnsuccessful
from bgqueue.keys import AppKeys
from bgqueue.requests import profile_of

if TYPE_CHECKING:
    from bgqueue.app import BackgroundApp

log = logging.getLogger("bgqueue.worker")

NAME_ENV = "BGQUEUE_WORKER_NAME"
EVENTS_FLUSH_AFTER = 0.05  # seconds task events are gathered before they are published
EXIT_NAME_TAKEN = 2  # the exit status of every bgqueue error (cli.run)
CONDITIONS_ENV = "BGQUEUE_CONDITIONS"  # "key=value,key=value", set by `bgqueue worker --condition`
CONTINUOUS_ENV = "BGQUEUE_CONTINUOUS"  # "1": serve continuous tasks, set by `--continuous`


def make_celery(app: BackgroundApp) -> Celery:
    """The Celery app of a BackgroundApp, with a task per registered identifier."""
    celery = Celery(app.app_id, set_as_current=False)
    celery.conf.update(celery_config(app.broker_url))
    # What Celery and kombu cannot read goes to the app's dead letter (bgqueue.deadletter).
    celery.conf.worker_consumer = f"{__name__}:Consumer"
    if urlsplit(app.broker_url).scheme in ("redis", "rediss"):
        celery.conf.broker_transport = f"{__name__}:Transport"
        options = dict(celery.conf.broker_transport_options or {})
        celery.conf.broker_transport_options = {**options, APP_OPTION: app.app_id}
    for identifier in app.handlers:
        add_celery_task(app, identifier, celery)
    continuous_runtime.add_celery_task(app, celery)  # one task runs every continuous handler
    work_runtime.add_celery_task(app, celery)  # one task runs every work's extension
    Heartbeat.attach(app, celery)
    return celery


# A run that did not succeed ends its Celery task with one of these, raised after its outcome
# is recorded in bgqueue's history, so Celery's events (and Flower) show it as FAILURE.
OUTCOME_ERRORS: dict[str, type[TaskOutcomeError]] = {
    "completed": TaskUnsuccessful,
    "failed": TaskFailed,
    "expired": TaskExpired,
}


def _is_requirements(names: object) -> bool:
    try:
        profile_of(names)
    except ValueError:
        return False
    return True


# The arguments of a run's message, as beat sends them (keywords only). `requires` names
# the request's requirements (requests.requirement_names), readable in Flower.
RUN_ARGUMENTS: dict[str, deadletter.Check] = {
    "scope": deadletter.is_name,
    "gen": deadletter.is_count,
    "requires": _is_requirements,
}


def add_celery_task(app: BackgroundApp, identifier: str, celery: Celery | None = None) -> None:
    """Register the Celery task that runs `identifier`'s launch handler."""
    target = celery if celery is not None else app.celery

    def run(task: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        wrong = deadletter.message_kwargs(args, kwargs, RUN_ARGUMENTS)
        if wrong is not None:  # not a message beat sent
            return deadletter.refuse_task_message(app, task, wrong)
        scope, gen, profile = kwargs["scope"], kwargs["gen"], profile_of(kwargs["requires"])
        began = time.monotonic()
        summary = runtime.execute(app, identifier, scope, gen, profile)
        seconds = time.monotonic() - began
        if summary.get("outcome") == "stale" and task.request.delivery_info.get("redelivered"):
            # Delivered again because its pool process was killed (a body that ignored its
            # interruption): report how that run ended, not a skipped duplicate.
            summary, seconds = recorded_outcome(app, identifier, scope, gen) or (summary, seconds)
        error = outcome_error(gen, summary, seconds)
        if error is not None:
            raise error
        return summary  # completed successfully, or not run (stale or released)

    run.__doc__ = f"Launch handler of {identifier}"
    target.task(
        name=identifier,
        bind=True,
        acks_late=True,
        # A raised outcome is acknowledged like a success: never delivered again.
        acks_on_failure_or_timeout=True,
        ignore_result=True,
        # Expected: logged in one line, without a traceback.
        throws=tuple(OUTCOME_ERRORS.values()),
        Request=RunRequest,
    )(run)


def outcome_error(gen: int, summary: dict[str, Any], seconds: float) -> TaskOutcomeError | None:
    """The exception that reports a run's outcome to Celery, or None for a success. Its
    message says what happened, in which scope and how long it took (Celery's task-failed
    event has no runtime)."""
    outcome = summary.get("outcome", "")
    if outcome not in OUTCOME_ERRORS or (outcome == "completed" and summary.get("success")):
        return None
    reason = summary.get("reason") or "set_task_completed(success=False)"
    where = f"scope {summary.get('scope')}, run {gen}, {seconds:.2f} s"
    error = OUTCOME_ERRORS[outcome](f"{reason} ({where})")
    error.body_stopped = bool(summary.get("stopped"))
    return error


def recorded_outcome(
    app: BackgroundApp, identifier: str, scope: str, gen: int
) -> tuple[dict[str, Any], float] | None:
    """Run `gen`'s outcome and duration from the scope's recent history, if it is there."""
    for record in app.scheduler_for(scope).history(limit=100):
        if (record.request_id, record.identifier) == (gen, identifier):
            took = 0.0
            if record.started_at and record.finished_at:
                took = (record.finished_at - record.started_at).total_seconds()
            outcome = {"outcome": record.state, "success": record.success, "scope": scope}
            return {**outcome, "reason": record.reason}, took
    return None


class RunRequest(Request):  # type: ignore[misc]
    """A run's message in the worker's main process. A run whose body had to be stopped
    reports its outcome first; then its pool process is retired and replaced
    (bgqueue/body.py), from here, before the pool can hand that process another
    message. (A body stopped after it completed successfully keeps its process.)

    A message beat sent ahead of its request's date carries that date as Celery's ETA, on
    Redis's clock; the worker's timer runs on its own, so the ETA is moved by the offset
    between the two that the heartbeat measures."""

    @property
    def eta(self) -> datetime | None:
        eta: datetime | None = super().eta
        return eta and eta - timedelta(seconds=runtime.context.offset)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        try:
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        finally:
            exc = getattr(exc_info, "exception", None)
            exc = getattr(exc, "exc", exc)  # billiard's ExceptionWithTraceback wraps it
            if isinstance(exc, TaskOutcomeError) and exc.body_stopped:
                body.retire_pool_process(self.worker_pid)


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


def _for(celery: Celery, hook: Callable[..., None]) -> Callable[..., None]:
    """A signal receiver that calls `hook` only for signals sent by this Celery app."""

    def receiver(sender: Any = None, **kwargs: Any) -> None:
        if getattr(sender, "app", None) is celery:
            hook(**kwargs)

    return receiver


def worker_class(app: BackgroundApp, found: dict[str, str], continuous: bool) -> tuple[str, str]:
    """The id and JSON of a worker's class: the profiles its conditions satisfy and the
    handlers its build registered (continuous ones only on a --continuous worker). Workers
    with the same class share a queue; the id changes when either changes."""
    mask = sum(1 << profile for profile in conditions.profiles(found))
    definition = {
        "m": mask,
        "h": sorted(app.handlers),
        "c": sorted(app.continuous_handlers) if continuous else [],
        "w": sorted(app.work_handlers),
    }
    text = json.dumps(definition, separators=(",", ":"), sort_keys=True)
    return f"{mask:04x}-{hashlib.sha1(text.encode()).hexdigest()[:12]}", text


def _taken(holder: dict[str, Any]) -> str:
    return (
        f"a live worker already has the name {runtime.context.name!r} (host "
        f"{holder.get('host')}, pid {holder.get('pid')}); give each worker its own --name, "
        "or leave it out for a unique one"
    )


class Heartbeat:
    """The worker's main-process side: claims its name, picks its queues, announces its
    conditions and class, and leaves cleanly."""

    def __init__(self, app: BackgroundApp, celery: Celery) -> None:
        self.app = app
        self.celery = celery
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.concurrency = 1
        self.last: dict[str, str] | None = None
        self.class_id = ""
        self.class_json = ""
        self.nodename = ""
        self.token = uuid.uuid4().hex  # this process, so a name is held by one worker

    @classmethod
    def attach(cls, app: BackgroundApp, celery: Celery) -> None:
        """Connect the worker signals for this Celery app (signals are process-global)."""
        heartbeat = cls(app, celery)

        def after_setup(sender: str, instance: Any, **_: Any) -> None:
            if instance.app is celery:
                heartbeat.setup(sender, instance)

        def pool_process_init(**_: Any) -> None:
            body.pool.is_pool_process = True

        def shutting_down(sender: Any = None, **_: Any) -> None:
            # A warm shutdown (SIGTERM) stops consuming at once and lets running tasks end
            # within their budgets: leave now, so beat no longer counts on this worker.
            # Sent from a signal handler: Redis is reached from a thread, never in here.
            if sender == heartbeat.nodename:
                threading.Thread(target=heartbeat.stop, name="bgqueue-leave").start()

        # weak=False: the closures would otherwise be collected at once.
        signals.celeryd_after_setup.connect(after_setup, weak=False)
        signals.worker_process_init.connect(pool_process_init, weak=False)
        signals.worker_shutting_down.connect(shutting_down, weak=False)
        hooks: list[tuple[Any, Callable[..., None]]] = [
            (signals.worker_ready, lambda **_: heartbeat.start()),
            (signals.worker_shutdown, lambda **_: heartbeat.stop()),
            (signals.task_unknown, heartbeat.refuse_unknown),
            (signals.task_rejected, heartbeat.dead_letter),
            (message_undecodable, heartbeat.dead_letter),
        ]
        for sent, hook in hooks:
            sent.connect(_for(celery, hook), weak=False)

    @property
    def serves_continuous(self) -> bool:
        """Whether this worker runs continuous tasks (`bgqueue worker --continuous`)."""
        return os.environ.get(CONTINUOUS_ENV) == "1"

    def setup(self, nodename: str, worker: Any) -> None:
        """Before consuming: learn the name and conditions, claim the name, and consume the
        class's queue and the worker's own, nothing else."""
        overrides = conditions.parse_overrides(
            pair for pair in os.environ.get(CONDITIONS_ENV, "").split(",") if pair.strip()
        )
        runtime.context.name = os.environ.get(NAME_ENV) or nodename
        runtime.context.overrides = overrides
        self.concurrency = int(worker.concurrency or 1)
        self.nodename = nodename
        found = runtime.context.conditions(0)
        self.class_id, self.class_json = worker_class(self.app, found, self.serves_continuous)
        self.claim_name()
        queues = self.celery.amqp.queues
        names = [self.app.keys.class_queue(self.class_id), self.own_queue]
        for name in names:
            queues.add(name, exchange=name, routing_key=name)
        queues.select(names)
        log.info("worker %s class %s conditions %s", runtime.context.name, self.class_id, found)

    @property
    def own_queue(self) -> str:
        """This worker's own queue: beat routes works and continuous tasks there."""
        return self.app.keys.worker_queue(runtime.context.name)

    def claim_name(self) -> None:
        """Before consuming: wait out a lapsing heartbeat of the same name (a restart), but
        refuse to start beside a live worker that holds it. The first heartbeat, once the
        pool is up, claims the name atomically (heartbeat.lua)."""
        settings = self.app.settings
        deadline = time.monotonic() + settings.heartbeat_timeout + settings.heartbeat_interval
        while (holder := self.holder()) is not None:
            if time.monotonic() > deadline:
                # Celery turns any exception raised here into a log line, or a SystemExit
                # into a clean exit: this worker must not start, and must say why.
                log.critical("%s", _taken(holder))
                print(f"error: {_taken(holder)}", file=sys.stderr, flush=True)
                os._exit(EXIT_NAME_TAKEN)
            time.sleep(settings.heartbeat_interval)

    def holder(self) -> dict[str, Any] | None:
        """The heartbeat of another live worker with this worker's name, if there is one."""
        k, name = self.app.keys, runtime.context.name
        with self.app.service(), self.app.client.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.zscore(k.alive, name)
            pipe.hget(k.workers, name)
            (seconds, micros), lapses, raw = pipe.execute()
        if lapses is None or raw is None or lapses <= seconds * 1000 + micros / 1000:
            return None
        try:
            beat: dict[str, Any] = json.loads(raw)
        except ValueError:
            return None
        return None if beat.get("token") == self.token else beat

    def follow(self, old_class: str) -> None:
        """Consume the new class's queue instead of the old one (e.g. power unplugged).

        Through Celery's remote control, so the consumer thread makes the change itself."""
        control, to = self.celery.control, [self.nodename]
        old, new = self.app.keys.class_queue(old_class), self.app.keys.class_queue(self.class_id)
        control.add_consumer(new, exchange=new, routing_key=new, destination=to)
        control.cancel_consumer(old, destination=to)

    def refuse_unknown(self, name: str, message: Any, **_: Any) -> None:
        """A request for an identifier with no handler on this worker (its class changed
        since beat routed it) goes back to pending unharmed, for a worker that has one."""
        try:
            kwargs = message.payload[1]
            scope, gen = kwargs["scope"], int(kwargs["gen"])
            profile = profile_of(kwargs["requires"])
            if not isinstance(scope, str):
                raise TypeError(scope)
        except (TypeError, KeyError, IndexError, ValueError, AttributeError):
            # Not a bgqueue message: Celery has logged and rejected it.
            self.dead_letter(message, reason=f"unknown task {name!r}, not a bgqueue request")
            return
        if runtime.release(self.app, name, scope, gen, profile):
            log.warning(
                "no handler for %r on worker %s: handed it back", name, runtime.context.name
            )
        else:  # No such dispatched request of this app (a stale copy, or another app's).
            self.dead_letter(message, reason=f"unknown task {name!r} and no request it names")

    def dead_letter(
        self, message: Any, exc: Exception | None = None, reason: str = "", **_: Any
    ) -> None:
        """Record a message Celery refused (not a task message, an invalid one, a body that
        cannot be decoded) in the app's dead letter; Celery acknowledges it."""
        if not reason and exc is None:
            reason = "not a Celery task message"
        elif not reason:
            reason = f"invalid task message: {type(exc).__name__}: {exc}"[:300]
        try:
            where, raw = deadletter.queue_of(message), deadletter.raw_message(message)
            deadletter.push(self.app.client, self.app.keys, where, reason, raw)
        except Exception as error:  # never let a foreign message fail the consumer
            log.warning("could not record a dead letter: %s", type(error).__name__)

    def start(self) -> None:
        """Start heartbeating (the pool is up, tasks may arrive). Another worker that took
        the name meanwhile (both started at once) keeps it: this one shuts down."""
        holder = self.send()
        if holder is not None:
            log.error("%s; shutting down", _taken(holder))
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.thread = threading.Thread(target=self._loop, name="bgqueue-heartbeat", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop heartbeating and leave, so beat stops counting on this worker at once."""
        self.stopped.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            # A heartbeat being sent now would announce the worker again after it left.
            self.thread.join(self.app.settings.heartbeat_timeout)
        try:
            self._heartbeat("{}", 0, wake=True)
        except Exception as exc:
            log.warning("could not announce leaving: %s", type(exc).__name__)

    def _loop(self) -> None:
        while not self.stopped.wait(self.app.settings.heartbeat_interval):
            try:
                holder = self.send()
            except Exception as exc:  # keep beating through broker blips
                log.warning("heartbeat failed: %s", type(exc).__name__)
                continue
            if holder is not None:  # its heartbeat lapsed (a partition?) and another took it
                log.error(
                    "worker %s: another live worker (pid %s on %s) has taken its name",
                    runtime.context.name,
                    holder.get("pid"),
                    holder.get("host"),
                )

    def send(self) -> dict[str, Any] | None:
        """Publish conditions, class and slots; wake beat when they change what may run
        here. Returns the heartbeat of another live worker holding the name, if one does."""
        from celery.worker import state

        found = runtime.context.conditions(0)
        old_class = self.class_id
        self.class_id, self.class_json = worker_class(self.app, found, self.serves_continuous)
        beat = {
            "class": self.class_id,
            "token": self.token,
            "conditions": found,
            "concurrency": self.concurrency,
            "busy": len(state.active_requests),
            "continuous": self.serves_continuous,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "node": self.nodename,  # Celery's, for beat to clean up after the worker
            # For `bgqueue status`, which has no app module to read the app's Limits from.
            "transient_daily_quota": self.app.limits.transient_daily_quota,
        }
        timeout_ms = int(self.app.settings.heartbeat_timeout * 1000)
        changed = found != self.last
        sent = time.time()
        reply = self._heartbeat(json.dumps(beat), timeout_ms, wake=changed)
        if reply[0] == b"taken":
            holder: dict[str, Any] = json.loads(reply[1])
            return holder
        runtime.context.clock_read(int(reply[1]), sent, time.time())
        if changed and self.last is not None:
            log.info("worker %s conditions now %s", runtime.context.name, found)
            if self.class_id != old_class:
                self.follow(old_class)
        self.last = found
        self.app.announce()
        return None

    def _heartbeat(self, beat: str, timeout_ms: int, wake: bool) -> Any:
        k = self.app.keys
        args = [runtime.context.name, beat, timeout_ms, self.token, self.class_id, self.class_json]
        return self.app.call(
            "heartbeat", [k.workers, k.alive, k.classes, k.classlive], args, wake=wake
        )
