"""A worker's heartbeat: its name held by one process, its class (the requirement profiles
its conditions satisfy and the handlers its build registered) announced every heartbeat
interval, the offset between its clock and Redis's measured, its own queue followed when its
class changes, and what it is sent but cannot run handed back or dead-lettered.
"""

from __future__ import annotations

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
from typing import TYPE_CHECKING, Any

from celery import Celery, signals

from bgqueue import runtime
from bgqueue.broker import deadletter
from bgqueue.model import conditions
from bgqueue.model.requests import profile_of
from bgqueue.runtime import body
from bgqueue.worker.intake import message_undecodable

if TYPE_CHECKING:
    # The façade's part this module uses, by the name it stands for (model/context.py).
    from bgqueue.model.context import AppContext as BackgroundApp

log = logging.getLogger("bgqueue.worker")

NAME_ENV = "BGQUEUE_WORKER_NAME"
EXIT_NAME_TAKEN = 2  # the exit status of every bgqueue error (cli.run)
CONDITIONS_ENV = "BGQUEUE_CONDITIONS"  # "key=value,key=value", set by `bgqueue worker --condition`
CONTINUOUS_ENV = "BGQUEUE_CONTINUOUS"  # "1": serve continuous tasks, set by `--continuous`


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
