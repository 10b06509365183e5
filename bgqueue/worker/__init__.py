"""The worker side: a Celery app per BackgroundApp and its tasks; what it takes off its
queues (intake.py) and its heartbeat (heartbeat.py).

Each registered identifier is a Celery task of the same name, so Flower shows
every kind of work under its own name. A worker belongs to a *class*: the requirement
profiles its conditions satisfy and the handlers its build registered. It consumes its
class's queue and its own, and announces its class in a heartbeat; beat sends a request
only to a class that satisfies its requirements and has its handler, so during a rolling
deploy an old build is never offered what it cannot run. One that gets such a request
anyway (its class changed meanwhile) hands it back unharmed.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from celery import Celery
from celery.worker.request import Request

from bgqueue import runtime
from bgqueue.broker import deadletter
from bgqueue.continuous import runtime as continuous_runtime
from bgqueue.errors import TaskExpired, TaskFailed, TaskOutcomeError, TaskUnsuccessful
from bgqueue.model.requests import profile_of
from bgqueue.runtime import body
from bgqueue.worker import intake
from bgqueue.worker.celery_config import celery_config
from bgqueue.worker.heartbeat import Heartbeat
from bgqueue.worker.intake import APP_OPTION
from bgqueue.works import runtime as work_runtime

if TYPE_CHECKING:
    # The façade's part this module uses, by the name it stands for (model/context.py).
    from bgqueue.model.context import AppContext as BackgroundApp

log = logging.getLogger("bgqueue.worker")


def make_celery(app: BackgroundApp) -> Celery:
    """The Celery app of a BackgroundApp, with a task per registered identifier."""
    celery = Celery(app.app_id, set_as_current=False)
    celery.conf.update(celery_config(app.broker_url))
    # What Celery and kombu cannot read goes to the app's dead letter (bgqueue.broker.deadletter).
    celery.conf.worker_consumer = f"{intake.__name__}:Consumer"
    if urlsplit(app.broker_url).scheme in ("redis", "rediss"):
        celery.conf.broker_transport = f"{intake.__name__}:Transport"
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
    (bgqueue/runtime/body.py), from here, before the pool can hand that process another
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
