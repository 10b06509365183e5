"""Traces across the deferral: OpenTelemetry spans for submits and runs (the optional
`bgqueue[otel]` extra).

A submit makes one producer span per request, `bgqueue.submit <identifier>`, a child of the
caller's current span, ended at once: it marks the request's creation (OpenTelemetry's
messaging "create" span). Its W3C traceparent goes into the request's pending record as
`tp` (only for a sampled span: 63 bytes a waiting request pays only when it is traced); the
scripts carry it to the worker unchanged, and across a requeue.

On the worker, the run span `bgqueue.run <identifier>` is a child of the current span there
(Celery's task span when opentelemetry-instrumentation-celery instruments the worker) and
*links* to the producer span instead of continuing its trace: the run may come hours later,
and no trace should stay open that long. It is current while the handler runs, and in the
threads the run starts (watchdog, expiration handler, delay callbacks), so the handler's own
spans nest under it. Its events mark the expiration, transient delays granted and cancelled
and the body being terminated; it ends with the recorded outcome as attributes.

Off costs nothing: bgqueue never imports OpenTelemetry itself. Tracing is on once the
process has imported `opentelemetry.trace` and set a tracer provider, or
`use_tracer_provider` named one; until then a submit batch and a run pay a look-up in
`sys.modules` (and, once OpenTelemetry is imported, one of its global provider). The call
sites are `Scheduler._submit_call`, `runtime._execute`, the `Run` transitions that add
events and `RunDelays.request`/`cancel`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from importlib import metadata
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bgqueue.requests import BGTaskRequest
    from bgqueue.runtime import Run

log = logging.getLogger("bgqueue.tracing")

TRACER_NAME = "bgqueue"
RECORD_FIELD = "tp"  # the producer span's traceparent in a request's record
# A run whose body was stopped has its pool process retired (os._exit) once it reports:
# spans a batching processor still holds would go with it, so they are exported first.
FLUSH_MS = 2000

# Attributes of both spans, then of the run span, then of its events.
APP, SCOPE, IDENTIFIER, KIND = "bgqueue.app", "bgqueue.scope", "bgqueue.identifier", "bgqueue.kind"
ATTEMPT, REQUEST_ID, WORKER = "bgqueue.attempt", "bgqueue.request_id", "bgqueue.worker"
OUTCOME, SUCCESS, REASON = "bgqueue.outcome", "bgqueue.success", "bgqueue.reason"
HANDLER, FORCED = "bgqueue.expiration.handler", "bgqueue.expiration.forced"
DELAY_ID, DELAY_MS, DELAY_REASON = "bgqueue.delay.id", "bgqueue.delay.ms", "bgqueue.delay.reason"

_OFF: AbstractContextManager[None] = contextlib.nullcontext()
_provider: Any = None  # the provider in use once one is known
_tracer: Any = None  # its tracer; a global provider, once set, is never replaced
_asked = False  # OpenTelemetry's get_tracer_provider() has been called once


def use_tracer_provider(provider: Any) -> None:
    """Trace with this tracer provider instead of OpenTelemetry's global one (as an
    instrumentation's `tracer_provider=`); None goes back to the global one."""
    global _provider, _tracer
    _provider = provider
    _tracer = None if provider is None else provider.get_tracer(TRACER_NAME, _version())


def _current() -> Any:
    """The tracer, or None while tracing is off (the one check a submit batch and a run
    pay)."""
    if _tracer is not None:
        return _tracer
    otel = sys.modules.get("opentelemetry.trace")
    return None if otel is None else _from_global(otel)


def _from_global(otel: Any) -> Any:
    """The global provider's tracer, once a real provider is set (not the API's stand-ins).

    While none is set, `get_tracer_provider()` looks in os.environ on every call (2 µs), so
    after the first call (which also loads a provider OTEL_PYTHON_TRACER_PROVIDER names)
    the module's global is read instead; were it renamed, the public call is made again."""
    global _provider, _tracer, _asked
    if _asked and getattr(otel, "_TRACER_PROVIDER", True) is None:
        return None
    _asked = True
    provider = otel.get_tracer_provider()
    if isinstance(provider, (otel.ProxyTracerProvider, otel.NoOpTracerProvider)):
        return None
    _provider, _tracer = provider, provider.get_tracer(TRACER_NAME, _version())
    return _tracer


def _version() -> str:
    try:
        return metadata.version("bgqueue")
    except metadata.PackageNotFoundError:
        return "0"


# -- the producer ---------------------------------------------------------------------------


def submitting(app_id: str, scope: str) -> Callable[[BGTaskRequest, str], str] | None:
    """For a submit batch: None while tracing is off; else a function that makes a checked
    request's producer span and returns its record with the span's traceparent in it."""
    tracer = _current()
    if tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    def stamp(request: BGTaskRequest, record: str) -> str:
        name = request.identifier
        attributes = {APP: app_id, SCOPE: scope, IDENTIFIER: name, KIND: str(request.kind)}
        span = tracer.start_span(
            f"bgqueue.submit {name}", kind=SpanKind.PRODUCER, attributes=attributes
        )
        span.end()
        context = span.get_span_context()
        if not context.trace_flags.sampled:  # nothing exported to link to: keep it small
            return record
        # Appended as submit.lua appends `t`: the record is requests.py's compact JSON object.
        traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
        return f'{record[:-1]},"{RECORD_FIELD}":"{traceparent}"}}'

    return stamp


# -- the worker -----------------------------------------------------------------------------


def running(run: Run, record: dict[str, Any]) -> AbstractContextManager[None]:
    """For `Run.execute`: the run's span from start to the body's return (nothing while
    tracing is off). `record` is the running record start.lua returned."""
    tracer = _current()
    return _OFF if tracer is None else _RunSpan(tracer, run, record)


def event(span: Any, name: str, attributes: dict[str, Any] | None = None) -> None:
    """Mark a moment of a run on its span (`Run.span`, None while tracing is off)."""
    if span is not None:
        span.add_event(name, attributes)


def expiration(handler: bool, forced: bool) -> dict[str, Any]:
    """The attributes of an `expiration` event: whether a handler was set to be called, and
    whether the expiration was forced (simulated, or the requirements stopped holding)."""
    return {HANDLER: handler, FORCED: forced}


def delay(request_id: int, ms: int, reason: str) -> dict[str, Any]:
    """The attributes of a `suspend_delay` event: which delay, how long, and why."""
    return {DELAY_ID: request_id, DELAY_MS: ms, DELAY_REASON: reason[:200]}


class _RunSpan:
    """A run's span: started and made current in the body's thread before the run starts
    its threads (they copy its context), ended in that thread once the body has returned,
    so that exporting never holds up the watchdog. A tracing failure never changes a run."""

    def __init__(self, tracer: Any, run: Run, record: dict[str, Any]) -> None:
        self.tracer = tracer
        self.run = run
        self.record = record
        self.span: Any = None
        self.token: Any = None

    def __enter__(self) -> None:
        from opentelemetry import context, trace

        run, task = self.run, self.run.task
        attributes = {
            APP: run.app.app_id,
            SCOPE: task.scope,
            IDENTIFIER: task.identifier,
            KIND: str(run.kind),
            ATTEMPT: task.attempt,
            REQUEST_ID: run.gen,
            WORKER: str(self.record.get("w", "")),
        }
        try:
            self.span = self.tracer.start_span(
                f"bgqueue.run {task.identifier}",
                kind=trace.SpanKind.CONSUMER,
                links=_links(self.record.get(RECORD_FIELD)),
                attributes=attributes,
            )
            self.token = context.attach(trace.set_span_in_context(self.span))
        except Exception as exc:
            log.warning("could not start the span of run %s: %r", run.gen, exc)
            return
        run.span = run.delays.span = self.span

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.span is None:
            return
        from opentelemetry import context

        try:
            context.detach(self.token)
            self._end(exc)
            if self.run.body.interrupt_sent and hasattr(_provider, "force_flush"):
                _provider.force_flush(FLUSH_MS)
        except Exception as error:
            log.warning("could not end the span of run %s: %r", self.run.gen, error)

    def _end(self, exc: BaseException | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        span, run = self.span, self.run
        if exc is not None:
            span.record_exception(exc)
        if run.outcome is not None:
            state, success = run.outcome
            span.set_attribute(OUTCOME, state)
            span.set_attribute(SUCCESS, success)
            if run.reason:
                span.set_attribute(REASON, run.reason)
            if not success:
                span.set_status(Status(StatusCode.ERROR, run.reason or f"{state}, unsuccessful"))
        elif exc is not None:
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()


def _links(traceparent: object) -> list[Any] | None:
    """A link to the producer span named by a record's traceparent; None for none, or for
    one that is not a W3C traceparent (the record was not bgqueue's)."""
    if not isinstance(traceparent, str):
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    found = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    producer = trace.get_current_span(found).get_span_context()
    return [trace.Link(producer)] if producer.is_valid else None
