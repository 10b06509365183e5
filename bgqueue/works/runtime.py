"""Running a work in a worker's pool process (the worker side of bgqueue/works/).

`on_work_start` runs in the pool process's main thread (the body); a watchdog renews the
run's lease and watches for `stop_work`. At the run limit or on `stop_work` it hands
`on_work_stop` to a callback thread (bgqueue/runtime/threads.py: user code never holds the lease
or the limit), gives the body STOP_GRACE to return, records the end (timed out, at the
limit) and kills a body that is still running (bgqueue/runtime/body.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from bgqueue import efficiency, runtime
from bgqueue.broker import deadletter
from bgqueue.runtime.body import Body, TaskTerminated
from bgqueue.runtime.threads import call_user, threads
from bgqueue.works import MAX_WORK_ID, WORK_TASK, WorkInfo, WorkSchedulerExtension, matches_work

if TYPE_CHECKING:
    from celery import Celery

    from bgqueue.model.context import AppContext

log = logging.getLogger("bgqueue.works")

# With a WORK_SCHEDULER efficiency grant a run may last this long instead of
# `Limits.work_run_limit` (DESIGN.md §4): charging, and on battery.
GRANTED_RUN_LIMIT_CHARGING = 1200.0
GRANTED_RUN_LIMIT = 600.0
STOP_GRACE = 1.0  # seconds a body may take to return once stopped, before it is killed

# The arguments of a work's message, as beat sends them (keywords only).
ARGUMENTS: dict[str, deadletter.Check] = {
    "work_id": lambda w: type(w) is int and 0 <= w <= MAX_WORK_ID,
    "gen": deadletter.is_count,
}


def add_celery_task(app: AppContext, celery: Celery) -> None:
    """Register the Celery task that runs works' extensions on this worker."""

    def run(task: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        wrong = deadletter.message_kwargs(args, kwargs, ARGUMENTS)
        if wrong is not None:  # not a message beat sent
            return deadletter.refuse_task_message(app, task, wrong)
        return execute(app, kwargs["work_id"], kwargs["gen"])

    run.__doc__ = "Runs a work's WorkSchedulerExtension (the work scheduler)"
    celery.task(name=WORK_TASK, bind=True, acks_late=True, ignore_result=True)(run)


def execute(app: AppContext, work_id: int, gen: int) -> dict[str, Any]:
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
    if handler is None:  # beat routed it by an older view of this worker: hand it back
        log.warning(
            "work %s of %s: no WorkSchedulerExtension for %r on worker %s; handed back",
            work_id,
            app.app_id,
            info.ability_name,
            name,
        )
        end_run(app, work_id, gen, "release")
        return {"outcome": "handed back", "work_id": work_id}
    return WorkRun(app, info, gen, run_limit(app, held)).execute(handler)


def run_limit(app: AppContext, held: dict[str, str]) -> float:
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
    app: AppContext,
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

    def __init__(self, app: AppContext, info: WorkInfo, gen: int, limit: float) -> None:
        self.app = app
        self.info = info
        self.gen = gen
        self.limit = limit
        self.timed_out = False
        self.extension: WorkSchedulerExtension | None = None
        self._lock = threading.Lock()
        self._ended = False
        self._stopping = False  # the watchdog is stopping the run and will record its end
        self.body: Body | None = None

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
        self.body = body = Body()
        threads.spawn(self._watch, f"bgqueue-work {self.info.work_id}")
        reason = ""
        try:
            try:
                self.extension.on_work_start(self.copy())
            finally:
                body.leave()
        except TaskTerminated:
            pass  # the watchdog ended the run
        except Exception as exc:  # the handler's failure ends the run, not the worker
            log.exception("on_work_start of work %s raised", self.info.work_id)
            reason = _describe(exc)
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
        assert self.body is not None
        interval = self.app.settings.heartbeat_interval
        deadline = time.monotonic() + self.limit
        next_renew = time.monotonic() + interval
        returned = self.body.returned
        while not returned.wait(max(0.0, min(next_renew, deadline) - time.monotonic())):
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
        """Hand on_work_stop to a callback thread, give the body STOP_GRACE to return, then
        record the end (reason None: the sweep already did) and kill a body still running.
        A slow on_work_stop moves none of this."""
        assert self.body is not None and self.extension is not None
        with self._lock:
            if self._ended or self.body.returned.is_set():
                return
            self._stopping = True
        self.timed_out = timed_out
        extension, work = self.extension, self.copy()
        call_user(f"on_work_stop of work {self.info.work_id}", lambda: extension.on_work_stop(work))
        self.body.returned.wait(STOP_GRACE)
        with self._lock:
            self._ended = True
        if reason is not None:
            self._record(reason)
        if not self.body.returned.is_set():
            log.warning("terminating work %s (run %s)", self.info.work_id, self.gen)
            self.body.kill()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]
