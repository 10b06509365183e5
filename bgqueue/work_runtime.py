"""Running a work in a worker's pool process (the worker side of bgqueue/works.py).

`on_work_start` runs in the pool process's main thread; a watchdog thread renews the
run's lease, watches for `stop_work`, and at the run limit calls `on_work_stop`, records
the run as timed out and, if the body does not return, ends the pool process.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from bgqueue import deadletter, efficiency, runtime
from bgqueue.conditions import matches_work
from bgqueue.works import MAX_WORK_ID, WORK_TASK, WorkInfo, WorkSchedulerExtension

if TYPE_CHECKING:
    from celery import Celery

    from bgqueue.app import BackgroundApp

log = logging.getLogger("bgqueue.works")

# With a WORK_SCHEDULER efficiency grant a run may last this long instead of
# `Limits.work_run_limit` (DESIGN.md §4): charging, and on battery.
GRANTED_RUN_LIMIT_CHARGING = 1200.0
GRANTED_RUN_LIMIT = 600.0
STOP_GRACE = 1.0  # seconds a body may take to return after on_work_stop before it is ended

# The arguments of a work's message, as beat sends them (keywords only).
ARGUMENTS: dict[str, deadletter.Check] = {
    "work_id": lambda w: type(w) is int and 0 <= w <= MAX_WORK_ID,
    "gen": deadletter.is_count,
}


def add_celery_task(app: BackgroundApp, celery: Celery) -> None:
    """Register the Celery task that runs works' extensions on this worker."""

    def run(task: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        wrong = deadletter.message_kwargs(args, kwargs, ARGUMENTS)
        if wrong is not None:  # not a message beat sent
            return deadletter.refuse_task_message(app, task, wrong)
        return execute(app, kwargs["work_id"], kwargs["gen"])

    run.__doc__ = "Runs a work's WorkSchedulerExtension (the work scheduler)"
    celery.task(name=WORK_TASK, bind=True, acks_late=True, ignore_result=True)(run)


def execute(app: BackgroundApp, work_id: int, gen: int) -> dict[str, Any]:
    """Run one dispatched work if its message is current; returns a summary for Celery."""
    settings = app.settings
    name = runtime.context.name
    lease_ms = int(settings.heartbeat_timeout * 1000)
    raw = app.call("work_begin", app.keys.work_all, [work_id, gen, name, lease_ms])
    if raw is None:
        return {"outcome": "stale", "work_id": work_id}
    info = WorkInfo.from_json(json.loads(raw)["info"], app.app_id)
    held = runtime.context.conditions(settings.heartbeat_interval)
    if not matches_work(held, info):
        end_run(app, work_id, gen, "release")
        return {"outcome": "released", "work_id": work_id}
    handler = app.work_handlers.get(info.ability_name)
    if handler is None:
        reason = (
            f"no WorkSchedulerExtension registered for {info.ability_name!r} on worker {name}; "
            f"register one with @app.work({info.ability_name!r})"
        )
        log.error("work %s of %s: %s", work_id, app.app_id, reason)
        end_run(app, work_id, gen, "done", reason=reason)
        return {"outcome": "failed", "work_id": work_id, "reason": reason}
    return WorkRun(app, info, gen, run_limit(app, held)).execute(handler)


def run_limit(app: BackgroundApp, held: dict[str, str]) -> float:
    """Seconds a run may last: `work_run_limit`, or more under a WORK_SCHEDULER grant."""
    try:
        granted = efficiency.granted(app, efficiency.ResourceType.WORK_SCHEDULER)
    except Exception as exc:  # a broker blip: run under the ordinary limit rather than fail
        log.warning("could not look up the WORK_SCHEDULER grant: %s", type(exc).__name__)
        granted = False
    if not granted:
        return app.limits.work_run_limit
    charging = held.get("external_power") == "true"
    return GRANTED_RUN_LIMIT_CHARGING if charging else GRANTED_RUN_LIMIT


def end_run(
    app: BackgroundApp,
    work_id: int,
    gen: int,
    mode: str,
    timed_out: bool = False,
    reason: str = "",
) -> bool:
    """work_end.lua: False if the run was no longer current (given up, or its work removed).

    Wakes beat: the work's next due time is new to it."""
    args = [work_id, gen, mode, int(timed_out), reason[:500]]
    return bool(app.call("work_end", app.keys.work_all, args, wake=True))


class WorkRun:
    """One run of a work's extension under its run limit: ended exactly once, by the body
    returning or by the watchdog (run limit, stop_work, or the run given up as lost)."""

    def __init__(self, app: BackgroundApp, info: WorkInfo, gen: int, limit: float) -> None:
        self.app = app
        self.info = info
        self.gen = gen
        self.limit = limit
        self.timed_out = False
        self.extension: WorkSchedulerExtension | None = None
        self._lock = threading.Lock()
        self._ended = False
        self._stopping = False  # the watchdog is stopping the run and will record its end
        self._returned = threading.Event()
        self._body_thread = threading.get_ident()

    def copy(self) -> WorkInfo:
        """A fresh WorkInfo for a handler call: what a handler changes stays its own."""
        return WorkInfo.from_json(self.info.to_json(), self.app.app_id)

    def execute(self, handler: type[WorkSchedulerExtension]) -> dict[str, Any]:
        """Call on_work_start with a watchdog running; returns a summary for Celery."""
        try:
            self.extension = handler()
        except Exception as exc:
            self._body_ended(_describe(exc))
            return self._summary()
        watchdog = threading.Thread(
            target=self._watch, name=f"bgqueue-work-{self.info.work_id}", daemon=True
        )
        watchdog.start()
        reason = ""
        try:
            self.extension.on_work_start(self.copy())
        except runtime.TaskTerminated:
            pass  # the watchdog ended the run
        except Exception as exc:  # the handler's failure ends the run, not the worker
            log.exception("on_work_start of work %s raised", self.info.work_id)
            reason = _describe(exc)
        finally:
            self._returned.set()
        self._body_ended(reason)
        return self._summary()

    def _summary(self) -> dict[str, Any]:
        outcome = "timed out" if self.timed_out else "ended"
        return {"outcome": outcome, "work_id": self.info.work_id, "gen": self.gen}

    def _body_ended(self, reason: str) -> None:
        with self._lock:
            if self._stopping or self._ended:
                return
            self._ended = True
        self._record(reason)

    def _record(self, reason: str) -> None:
        try:
            current = end_run(self.app, self.info.work_id, self.gen, "done", self.timed_out, reason)
        except Exception as exc:  # the lease then lapses and the sweep runs the work again
            log.warning("could not record the end of work %s: %s", self.info.work_id, exc)
            return
        if not current:
            log.info("work %s run %s had been removed or given up", self.info.work_id, self.gen)

    # -- watchdog -----------------------------------------------------------------

    def _watch(self) -> None:
        interval = self.app.settings.heartbeat_interval
        deadline = time.monotonic() + self.limit
        next_renew = time.monotonic() + interval
        while not self._returned.wait(max(0.0, min(next_renew, deadline) - time.monotonic())):
            now = time.monotonic()
            if now >= deadline:
                self._stop(f"run limit of {self.limit:g} s reached", timed_out=True)
                return
            if now >= next_renew:
                next_renew = now + interval
                alive, stop = self._renew()
                if stop:
                    self._stop("stopped by stop_work")
                    return
                if not alive:
                    log.warning("work %s run %s was given up as lost", self.info.work_id, self.gen)
                    self._stop(None)
                    return

    def _renew(self) -> tuple[bool, bool]:
        lease_ms = int(self.app.settings.heartbeat_timeout * 1000)
        args = [self.info.work_id, self.gen, lease_ms]
        try:
            alive, stop = self.app.call("work_renew", self.app.keys.work_all, args)
        except Exception as exc:  # a broker blip must not kill the watchdog
            log.warning("could not renew work %s: %s", self.info.work_id, type(exc).__name__)
            return True, False
        return bool(alive), bool(stop)

    def _stop(self, reason: str | None, timed_out: bool = False) -> None:
        """Call on_work_stop, record the end (reason None: the sweep already did), and end
        a body that does not return by itself."""
        with self._lock:
            if self._ended or self._returned.is_set():
                return
            self._stopping = True
        self.timed_out = timed_out
        assert self.extension is not None
        try:
            self.extension.on_work_stop(self.copy())
        except Exception:
            log.exception("on_work_stop of work %s raised", self.info.work_id)
        with self._lock:
            self._ended = True
        if reason is not None:
            self._record(reason)
        if not self._returned.wait(STOP_GRACE):
            self._terminate()

    def _terminate(self) -> None:
        log.warning("terminating work %s (run %s)", self.info.work_id, self.gen)
        if runtime.context.pool_process:
            os.kill(os.getpid(), signal.SIGKILL)  # Celery's prefork pool replaces the process
        # Solo or thread pools share the process: interrupt the body's thread instead.
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(self._body_thread), ctypes.py_object(runtime.TaskTerminated)
        )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
