"""`BackgroundApp`: one tenant's namespace, its permitted identifiers and handlers.

Creating an app connects to nothing; the broker is resolved and reached on first
use, so importing a module that defines an app is always safe.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import redis

from bgqueue import continuous as continuous_tasks
from bgqueue import efficiency, transient, works
from bgqueue.broker import (
    SERVICE_ERRORS,
    connect,
    connect_async,
    resolve_broker_url,
    service_error,
    service_errors,
)
from bgqueue.errors import NotPermitted, NotSystemApp, ParameterError
from bgqueue.model import keys
from bgqueue.model.limits import Limits
from bgqueue.model.modes import BackgroundMode
from bgqueue.model.requests import check_name
from bgqueue.model.scripts import Scripts, sha, source
from bgqueue.model.settings import Settings
from bgqueue.scheduler import Scheduler

Handler = TypeVar("Handler", bound=Callable[..., Any])


def _allow_dotted_lookup(module_globals: dict[str, Any]) -> None:
    """Make `celery -A module:app.celery worker` work for the module defining the app.

    Celery resolves `module:app.celery` as `getattr(module, "app.celery")`, one name with a
    dot in it. A module-level `__getattr__` (PEP 562), added only where the module has none,
    resolves such names as attribute paths; ordinary lookups never reach it.
    """
    if "__getattr__" in module_globals or "__name__" not in module_globals:
        return

    def __getattr__(name: str) -> Any:
        head, dot, rest = name.partition(".")
        if not dot or head not in module_globals:
            raise AttributeError(f"module {module_globals['__name__']!r} has no attribute {name!r}")
        value = module_globals[head]
        for part in rest.split("."):
            value = getattr(value, part)
        return value

    module_globals["__getattr__"] = __getattr__


def _sequence(value: object, what: str) -> list[Any]:
    """A list from a list-like argument, or ParameterError (a string is not a list here)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ParameterError(f"{what} must be a list, got {type(value).__name__}")
    return list(value)


class BackgroundApp:
    """A background app: producers submit through `scheduler`, workers run `register`ed handlers."""

    def __init__(
        self,
        app_id: str,
        *,
        permitted_identifiers: Iterable[str] = (),
        background_modes: Iterable[BackgroundMode] = (),
        system: bool = False,
        broker_url: str | None = None,
        limits: Limits | None = None,
    ) -> None:
        check_name(app_id, "app_id")
        if "{" in app_id or "}" in app_id:
            raise ParameterError(f"app_id {app_id!r} must not contain braces (they tag Redis keys)")
        self.app_id = app_id
        self.permitted_identifiers = tuple(
            check_name(p, "permitted identifier")
            for p in _sequence(permitted_identifiers, "permitted_identifiers")
        )
        try:
            self.background_modes = frozenset(
                BackgroundMode(m) for m in _sequence(background_modes, "background_modes")
            )
        except ValueError as exc:
            raise ParameterError(f"unknown background mode: {exc}") from None
        if not isinstance(system, bool):
            raise ParameterError(f"system must be True or False, got {system!r}")
        self.system = system
        if broker_url is not None and not isinstance(broker_url, str):
            raise ParameterError("broker_url must be a URL string or None")
        self._broker_url = broker_url
        if limits is not None and not isinstance(limits, Limits):
            raise ParameterError("limits must be a bgqueue.Limits")
        self.limits = limits or Limits()
        self.settings = Settings.from_env()
        self.keys = keys.AppKeys(app_id)
        self.handlers: dict[str, Callable[..., Any]] = {}
        self.continuous_handlers: dict[str, Callable[..., Any]] = {}
        self.work_handlers: dict[str, type[works.WorkSchedulerExtension]] = {}
        self._cancel_listener: continuous_tasks.CancelListener | None = None
        self._client: redis.Redis | None = None
        self._client_pid = 0
        self._scripts: Scripts | None = None
        # The asyncio clients, one per event loop: (pid, client) by loop (see `aclient`).
        self._aclients: dict[asyncio.AbstractEventLoop, tuple[int, Any]] = {}
        self._aclients_lock = threading.Lock()  # loops in other threads may make theirs
        self._celery: Any = None
        self._announced = False
        self.scheduler = Scheduler(self, "default")
        _allow_dotted_lookup(sys._getframe(1).f_globals)

    def __repr__(self) -> str:
        return f"BackgroundApp({self.app_id!r})"

    # -- connection ---------------------------------------------------------

    def use_broker(self, url: str) -> None:
        """Point the app at another broker before it connects (the CLI's --broker)."""
        if self._client is not None or self._aclients:
            raise ParameterError("use_broker must be called before the app connects")
        self._broker_url = url

    @property
    def broker_url(self) -> str:
        """The broker in use: the argument, else BGQUEUE_BROKER_URL, else the embedded Redis."""
        if self._broker_url is None:
            self._broker_url = resolve_broker_url(None)
        return self._broker_url

    @property
    def client(self) -> Any:
        """This process's Redis client (made again after a fork).

        Typed Any: redis-py annotates sync results as `Awaitable | Any`, which mypy cannot use.
        """
        if self._client is None or self._client_pid != os.getpid():
            self._client = connect(self.broker_url)
            self._client_pid = os.getpid()
            self._scripts = None
        return self._client

    @property
    def scripts(self) -> Scripts:
        """The Lua scripts bound to `client`."""
        client = self.client
        if self._scripts is None:
            self._scripts = Scripts(client)
        return self._scripts

    def call(
        self,
        script: str,
        script_keys: Sequence[str],
        args: Sequence[Any],
        wake: bool = False,
        announce: bool = False,
    ) -> Any:
        """Run one Lua script; with `wake`, also wake beat, and with `announce`, also name
        the app in `bgqueue:apps` unless this process did already (so that submitting alone
        makes an app known to beat), in the same round trip.

        Neither extra touches the app's keys: a refused call still changes nothing of them.
        """
        client = self.client
        announce = announce and not self._announced
        digest = sha(script)
        try:  # as service_errors, without a context manager per call
            try:
                reply = self._evalsha_and(client, digest, script_keys, args, wake, announce)
            except redis.exceptions.NoScriptError:  # Redis restarted: its script cache is empty
                client.script_load(source(script))
                reply = self._evalsha_and(client, digest, script_keys, args, wake, announce)
        except SERVICE_ERRORS as exc:
            raise service_error(self.broker_url, exc) from exc
        self._announced = self._announced or announce
        return reply

    def _evalsha_and(
        self,
        client: Any,
        digest: str,
        script_keys: Sequence[str],
        args: Sequence[Any],
        wake: bool,
        announce: bool,
    ) -> Any:
        if not (wake or announce):
            return client.evalsha(digest, len(script_keys), *script_keys, *args)
        # EVALSHA by hand: redis-py's pipelined scripts cost a SCRIPT EXISTS round trip each.
        with client.pipeline(transaction=False) as pipe:
            pipe.evalsha(digest, len(script_keys), *script_keys, *args)
            if wake:
                pipe.publish(keys.BEAT_WAKE, self.app_id)
            if announce:
                pipe.sadd(keys.APPS, self.app_id)
            return pipe.execute()[0]

    def service(self) -> AbstractContextManager[None]:
        """A context in which a lost broker connection raises ServiceError."""
        return service_errors(self.broker_url)

    def announce(self) -> None:
        """Make the app known to beat, once per process (workers; a producer's first submit
        names the app in the same round trip)."""
        if not self._announced:
            with service_errors(self.broker_url):
                self.client.sadd(keys.APPS, self.app_id)
            self._announced = True

    # -- the asyncio client: one per event loop ------------------------------------------

    async def aclient(self) -> Any:
        """The running event loop's redis.asyncio client, made on first use.

        A client's connections belong to the loop that opened them, so each loop gets its
        own and no client serves another loop, a closed one, or a forked child. Call
        `aclose()` before the loop ends; the client of a loop closed without it is dropped
        unclosed. Typed Any for the reason given at `client`.
        """
        loop = asyncio.get_running_loop()
        held = self._aclients.get(loop)
        if held is not None and held[0] == os.getpid():
            return held[1]
        if self._broker_url is None:  # the embedded Redis may have to start: off the loop
            await asyncio.to_thread(lambda: self.broker_url)
        with self._aclients_lock:
            held = self._aclients.get(loop)  # another task may have made it while we waited
            if held is None or held[0] != os.getpid():
                for ended in [other for other in self._aclients if other.is_closed()]:
                    del self._aclients[ended]
                held = self._aclients[loop] = (os.getpid(), connect_async(self.broker_url))
        return held[1]

    async def aclose(self) -> None:
        """Close the running loop's asyncio client (in a FastAPI lifespan's shutdown, at the
        end of `asyncio.run`'s main); a later async call makes a new one."""
        with self._aclients_lock:
            held = self._aclients.pop(asyncio.get_running_loop(), None)
        if held is not None and held[0] == os.getpid():  # a parent's sockets are not ours
            await held[1].aclose()

    async def acall(
        self,
        script: str,
        script_keys: Sequence[str],
        args: Sequence[Any],
        wake: bool = False,
        announce: bool = False,
    ) -> Any:
        """`call` from an event loop: EVALSHA on the loop's client, the same extras in the
        same round trip, the same errors."""
        client = await self.aclient()
        announce = announce and not self._announced
        digest = sha(script)
        with service_errors(self.broker_url):
            try:
                reply = await self._aevalsha_and(client, digest, script_keys, args, wake, announce)
            except redis.exceptions.NoScriptError:  # Redis restarted: its script cache is empty
                await client.script_load(source(script))
                reply = await self._aevalsha_and(client, digest, script_keys, args, wake, announce)
        self._announced = self._announced or announce
        return reply

    async def _aevalsha_and(
        self,
        client: Any,
        digest: str,
        script_keys: Sequence[str],
        args: Sequence[Any],
        wake: bool,
        announce: bool,
    ) -> Any:
        if not (wake or announce):
            return await client.evalsha(digest, len(script_keys), *script_keys, *args)
        async with client.pipeline(transaction=False) as pipe:
            pipe.evalsha(digest, len(script_keys), *script_keys, *args)
            if wake:
                pipe.publish(keys.BEAT_WAKE, self.app_id)
            if announce:
                pipe.sadd(keys.APPS, self.app_id)
            return (await pipe.execute())[0]

    # -- scopes and identifiers ---------------------------------------------

    def scheduler_for(self, scope: str) -> Scheduler:
        """The scheduler of another scope (a 'device'): its own pending set and budgets."""
        return Scheduler(self, scope)

    def is_permitted(self, identifier: str) -> bool:
        """Whether an identifier is permitted; a trailing '*' permits a prefix."""
        for pattern in self.permitted_identifiers:
            if pattern.endswith("*") and identifier.startswith(pattern[:-1]):
                return True
            if identifier == pattern:
                return True
        return False

    def register(self, identifier: str) -> Callable[[Handler], Handler]:
        """Decorator: the launch handler of an identifier, run by workers with a task object."""
        check_name(identifier, "identifier")
        if "*" in identifier:
            raise ParameterError(f"register exact identifiers, not patterns: {identifier!r}")
        if not self.is_permitted(identifier):
            raise NotPermitted(f"cannot register {identifier!r}: not a permitted identifier")
        if identifier in self.handlers:
            raise ParameterError(f"a launch handler for {identifier!r} is already registered")

        def decorator(handler: Handler) -> Handler:
            if not callable(handler):
                raise ParameterError("a launch handler must be callable")
            self.handlers[identifier] = handler
            if self._celery is not None:
                from bgqueue.worker import add_celery_task

                add_celery_task(self, identifier)
            return handler

        return decorator

    @property
    def celery(self) -> Any:
        """The Celery app that runs this app's handlers (`celery -A module:app.celery worker`)."""
        if self._celery is None:
            from bgqueue.worker import make_celery

            self._celery = make_celery(self)
        return self._celery

    # -- workers --------------------------------------------------------------

    def live_workers(self) -> dict[str, dict[str, Any]]:
        """Heartbeats of the workers alive now, by name."""
        return {name: beat for name, (alive, beat) in self.workers().items() if alive}

    def workers(self) -> dict[str, tuple[bool, dict[str, Any]]]:
        """Every recently seen worker: (alive, heartbeat) by name."""
        return self._workers()[1]

    def _workers(self) -> tuple[int, dict[str, tuple[bool, dict[str, Any]]]]:
        """The server's clock (ms) and every recently seen worker."""
        k = self.keys
        script_keys = [k.workers, k.alive, k.classes, k.classlive, k.deadletter]
        raw = self.call("workers", script_keys, [0])
        now = int(raw[0])
        result: dict[str, tuple[bool, dict[str, Any]]] = {}
        for i in range(3, len(raw), 3):
            result[raw[i].decode()] = (float(raw[i + 1]) > now, json.loads(raw[i + 2]))
        return now, result

    # -- transient delays (bgqueue/transient/) ----------------------------------------

    def transient_task_info(self, scope: str = "default") -> transient.TransientTaskInfo:
        """A scope's suspend-delay quota left today and its live delays, in ms (HarmonyOS
        `getTransientTaskInfo`). Delays are requested inside a running task with
        `task.request_suspend_delay`."""
        return transient.info(self, check_name(scope, "scope"))

    # -- continuous tasks (bgqueue/continuous/) ---------------------------------------

    def continuous(self, ability: str) -> Callable[[Handler], Handler]:
        """Decorator: the handler of a continuous task, run on `--continuous` workers with a
        `ContinuousTask` until it returns; it should return soon after `task.stopped` is set."""
        check_name(ability, "ability")
        if ability in self.continuous_handlers:
            raise ParameterError(f"a continuous handler for {ability!r} is already registered")

        def decorator(handler: Handler) -> Handler:
            if not callable(handler):
                raise ParameterError("a continuous handler must be callable")
            self.continuous_handlers[ability] = handler
            return handler

        return decorator

    def start_background_running(
        self, ability: str, modes: Any, payload: Any = None
    ) -> continuous_tasks.ContinuousTaskInfo:
        """Start the continuous task of `ability` with these declared modes (one per ability);
        it runs on a continuous worker until stopped, and is restarted if its worker dies."""
        return continuous_tasks.start(self, ability, modes, payload)

    def update_background_running(
        self, ability: str, modes: Any
    ) -> continuous_tasks.ContinuousTaskInfo:
        """Replace the modes of `ability`'s continuous task; its handler sees them in
        `task.modes` within a heartbeat interval."""
        return continuous_tasks.update(self, ability, modes)

    def stop_background_running(self, ability: str) -> None:
        """Stop `ability`'s continuous task: its handler sees `task.stopped` within a heartbeat
        interval, and the task is gone when the handler returns."""
        continuous_tasks.stop(self, ability)

    def all_continuous_tasks(self) -> list[continuous_tasks.ContinuousTaskInfo]:
        """The app's continuous tasks (HarmonyOS obtainAllContinuousTasks, for this app)."""
        return continuous_tasks.all_tasks(self)

    def on(self, event: str, callback: continuous_tasks.CancelCallback) -> None:
        """Call `callback(ContinuousTaskCancelInfo)` from a background thread whenever the
        system cancels one of the app's continuous tasks; the event is "continuousTaskCancel"."""
        continuous_tasks.check_subscription(event, callback)
        if callback is None:
            raise ParameterError("callback must be callable")
        if self._cancel_listener is None:
            self._cancel_listener = continuous_tasks.CancelListener(self)
        self._cancel_listener.add(callback)

    def off(self, event: str, callback: continuous_tasks.CancelCallback | None = None) -> None:
        """Stop calling `callback` for the event, or every callback when it is None."""
        continuous_tasks.check_subscription(event, callback)
        if self._cancel_listener is not None:
            self._cancel_listener.remove(callback)

    # -- efficiency resources (bgqueue/efficiency/) -----------------------------------

    def _check_system(self, call: str) -> None:
        if not self.system:
            raise NotSystemApp(
                f"{call} is a system API: create the app with BackgroundApp(..., system=True)"
            )

    def apply_efficiency_resources(self, request: efficiency.EfficiencyResourcesRequest) -> None:
        """Apply for efficiency resources (system apps only), or release some with
        `is_apply=False`. A timed grant is released automatically at its `time_out` (ms);
        applying again for a held type keeps the later end and replaces the reason."""
        self._check_system("apply_efficiency_resources")
        efficiency.apply(self, request)

    def reset_all_efficiency_resources(self) -> None:
        """Release every efficiency resource of the app, app- and process-level."""
        self._check_system("reset_all_efficiency_resources")
        efficiency.reset_all(self)

    def all_efficiency_resources(self) -> list[efficiency.EfficiencyResourcesInfo]:
        """The efficiency resources the app holds now, one entry per type and level."""
        self._check_system("all_efficiency_resources")
        return efficiency.all_grants(self)

    # -- work scheduler (bgqueue/works/) ----------------------------------------------

    def work(self, ability_name: str) -> Callable[[works.Extension], works.Extension]:
        """Class decorator: the WorkSchedulerExtension that workers run for works naming
        `ability_name` (a producer may start works without importing it)."""
        check_name(ability_name, "ability_name")
        if ability_name in self.work_handlers:
            raise ParameterError(f"a work handler for {ability_name!r} is already registered")

        def decorator(handler: works.Extension) -> works.Extension:
            base = works.WorkSchedulerExtension
            if not (isinstance(handler, type) and issubclass(handler, base)):
                raise ParameterError("@app.work decorates a WorkSchedulerExtension subclass")
            self.work_handlers[ability_name] = handler
            return handler

        return decorator

    def start_work(self, work: works.WorkInfo) -> None:
        """Start a work: it runs when a live worker matches its conditions (startWork).
        StartWorkFailed if its id exists, the app has `max_works`, or its repeat cycle is
        under `min_repeat_interval` (unless a TIMER efficiency resource is held)."""
        works.start_work(self, work)

    def stop_work(self, work: works.WorkInfo | int, need_cancel: bool = False) -> None:
        """Stop the work's running run (on_work_stop is called); with `need_cancel`, remove
        the work too. WorkInfoCheckFailed if the work does not exist."""
        works.stop_work(self, work, need_cancel)

    def get_work_status(self, work_id: int) -> works.WorkInfo:
        """A copy of the work's WorkInfo; WorkInfoCheckFailed if it does not exist."""
        return works.get_work_status(self, work_id)

    def obtain_all_works(self) -> list[works.WorkInfo]:
        """Copies of every work of the app, by work id."""
        return works.obtain_all_works(self)

    def stop_and_clear_works(self) -> None:
        """Stop every running work and remove every work of the app."""
        works.stop_and_clear_works(self)

    def is_last_work_time_out(self, work_id: int) -> bool:
        """Whether the work's last run reached its run limit; WorkInfoCheckFailed for a work
        that neither exists nor has run."""
        return works.is_last_work_time_out(self, work_id)
