"""The app that tracing tests run on workers (tests/test_tracing.py).

Each pool process sets up the OpenTelemetry SDK when it starts (`worker_process_init`, as
OpenTelemetry's Celery guide says) if TEST_OTEL_SPANS names a file: the SDK's
ConsoleSpanExporter writes every finished span there as one JSON object per line
(`ReadableSpan.to_json`), through a SimpleSpanProcessor, or with TEST_OTEL_PROCESSOR=batch
a BatchSpanProcessor that exports only when flushed. With TEST_OTEL_CELERY=1,
opentelemetry-instrumentation-celery instruments the worker too.

The handler does what its payload says; budgets are short: 2 s (TEST_BUDGET), the
expiration handler 0.4 s before the deadline, suspend delays of at most 1 s.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from celery import signals

import bgqueue as bg

APP_ID = "com.bgqueue.traced"
IDENTIFIERS = ("a", "b", "c")

BUDGET = float(os.environ.get("TEST_BUDGET", 2))  # a worker may be given longer

app = bg.BackgroundApp(
    APP_ID,
    permitted_identifiers=[f"{APP_ID}.*"],
    limits=bg.Limits(
        refresh_time_budget=BUDGET,
        processing_time_budget=BUDGET,
        health_research_time_budget=BUDGET,
        expiration_warning=1,
        transient_max_delay=1,
    ),
)


def handle(task: bg.BGTask) -> None:
    """Payload: delay (request a suspend delay, then cancel it); expiration ('complete'
    completes unsuccessfully, 'record' only notes it); wait_expiration (return once the
    handler has run); first_sleep (s, on the first attempt only); hang (s); complete (bool).
    The handler's work and its expiration handler each make a span of their own."""
    from opentelemetry import trace

    tracer = trace.get_tracer("tests.apps.traced_app")
    spec: dict[str, Any] = task.payload or {}
    expired = threading.Event()

    def expire() -> None:
        with tracer.start_as_current_span("expiration handler"):
            expired.set()
            if spec.get("expiration") == "complete":
                task.set_task_completed(success=False)

    if spec.get("expiration"):
        task.expiration_handler = expire
    with tracer.start_as_current_span("handler work"):
        if spec.get("delay"):
            info = task.request_suspend_delay("flush the cache", lambda: None)
            task.cancel_suspend_delay(info.request_id)
        if task.attempt == 1:
            time.sleep(spec.get("first_sleep", 0))
        if spec.get("wait_expiration"):
            expired.wait(15)
        time.sleep(spec.get("hang", 0))
        if "complete" in spec:
            task.set_task_completed(success=bool(spec["complete"]))


for _name in IDENTIFIERS:
    app.register(f"{APP_ID}.{_name}")(handle)


def trace_pool_process(**_: Any) -> None:
    """Set up the SDK in a pool process: a TracerProvider whose exporter appends each span
    to TEST_OTEL_SPANS as a JSON line."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    out = open(os.environ["TEST_OTEL_SPANS"], "a", buffering=1)  # noqa: SIM115 (the process's)
    exporter = ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
    provider = TracerProvider(resource=Resource.create({"service.name": "traced-worker"}))
    if os.environ.get("TEST_OTEL_PROCESSOR") == "batch":
        # Exports only when flushed (or a full batch): a span bgqueue did not flush is lost
        # with the pool process.
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=600_000))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    if os.environ.get("TEST_OTEL_CELERY") == "1":
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument(tracer_provider=provider)


if os.environ.get("TEST_OTEL_SPANS"):
    signals.worker_process_init.connect(trace_pool_process, weak=False)
