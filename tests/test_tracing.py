"""Traces across the deferral (bgqueue/tracing.py), with the OpenTelemetry SDK's own
exporters and real processes: this test process is the producer, tracing into the SDK's
InMemorySpanExporter; `bgqueue worker` processes run tests/apps/traced_app.py, whose pool
processes trace into the SDK's ConsoleSpanExporter writing JSON lines to a file this test
reads. No mock tracer: the spans compared are the ones the SDK finished and exported.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import bgqueue as bg
from bgqueue import tracing
from tests.apps import traced_app
from tests.apps.traced_app import APP_ID
from tests.harness import REPO, Cluster, wait_for

APP = "tests.apps.traced_app:app"
A, B, C = (f"{APP_ID}.{name}" for name in "abc")


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def traced(redis_url: str) -> bg.BackgroundApp:
    """The traced test app as a producer sees it, on the test Redis."""
    traced_app.app._client = None  # a previous test's connection: drop it
    traced_app.app._announced = False
    traced_app.app.use_broker(redis_url)
    return traced_app.app


class Producer:
    """This process's tracing: a real SDK TracerProvider exporting to memory, named to
    bgqueue with `use_tracer_provider` (the global provider stays unset for other tests)."""

    def __init__(self, sampler: Any = None) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(sampler=sampler) if sampler else TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests.test_tracing")

    def spans(self, name: str | None = None) -> list[dict[str, Any]]:
        """Finished spans as the SDK writes them as JSON, optionally of one name."""
        found = [json.loads(span.to_json()) for span in self.exporter.get_finished_spans()]
        return [span for span in found if name in (None, span["name"])]


@pytest.fixture
def producer() -> Iterator[Producer]:
    made = Producer()
    tracing.use_tracer_provider(made.provider)
    yield made
    tracing.use_tracer_provider(None)
    made.provider.shutdown()


@pytest.fixture
def spans_path(tmp_path: Path) -> Path:
    return tmp_path / "worker-spans.jsonl"


@pytest.fixture(autouse=True)
def _kill_processes_at_teardown(cluster: Cluster) -> Iterator[None]:
    """SIGKILL the test's processes when it is done: graceful shutdowns are not tested here."""
    yield
    cluster.kill_all()


def start(cluster: Cluster, spans_path: Path, name: str = "w1", **env: str) -> None:
    """Beat (once) and a traced worker with one pool process."""
    if not any(proc.args == ["beat"] for proc in cluster.procs):
        cluster.beat()
    env = {"TEST_OTEL_SPANS": str(spans_path), **env}
    cluster.worker(name, concurrency=1, app=APP, app_id=APP_ID, env=env)


# --- helpers ----------------------------------------------------------------------------


def worker_spans(path: Path, name: str | None = None) -> list[dict[str, Any]]:
    """Spans the workers' exporters wrote so far (one JSON object per line)."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [span for span in map(json.loads, lines) if name in (None, span["name"])]


def wait_span(path: Path, name: str, count: int = 1) -> list[dict[str, Any]]:
    return wait_for(
        lambda: len(found := worker_spans(path, name)) >= count and found,
        30,
        f"{count} span(s) {name!r} in {path.name}",
    )


def pending_record(client: redis.Redis, app: bg.BackgroundApp, scope: str, ident: str) -> Any:
    raw = client.hget(app.keys.requests(scope), ident)
    return None if raw is None else json.loads(raw)


def traceparent(span: dict[str, Any]) -> str:
    """The W3C traceparent of an exported span (to_json writes ids as 0x-prefixed hex)."""
    context = span["context"]
    return f"00-{context['trace_id'][2:]}-{context['span_id'][2:]}-01"


def linked(span: dict[str, Any]) -> list[tuple[str, str]]:
    return [(link["context"]["trace_id"], link["context"]["span_id"]) for link in span["links"]]


def ids(span: dict[str, Any]) -> tuple[str, str]:
    return span["context"]["trace_id"], span["context"]["span_id"]


def seconds(span: dict[str, Any], at: str) -> float:
    """An exported ISO timestamp as seconds after the span's start."""
    from datetime import datetime

    def parse(text: str) -> float:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    return parse(at) - parse(span["start_time"])


# --- across the deferral ----------------------------------------------------------------


def test_run_span_links_to_the_producer_span_with_outcome_expiration_and_delay_events(
    cluster: Cluster,
    traced: bg.BackgroundApp,
    producer: Producer,
    spans_path: Path,
    redis_client: redis.Redis,
) -> None:
    """A request submitted inside a web request's span: its producer span is that span's
    child and its traceparent waits in the record. A worker process runs it later: the
    run span starts a trace of its own, links to the producer span, names the app, scope,
    identifier, kind, attempt and worker, marks the granted and cancelled suspend delay
    and the expiration as events, and ends with the recorded outcome (completed by the
    expiration handler, unsuccessful). The handler's own spans, from its thread and from
    the expiration handler's, are children of the run span."""
    payload = {"delay": True, "expiration": "complete", "wait_expiration": True}
    with producer.tracer.start_as_current_span("POST /refresh"):
        traced.scheduler_for("kiosk-1").submit(bg.ProcessingTaskRequest(A, payload=payload))
    (web,) = producer.spans("POST /refresh")
    (submitted,) = producer.spans(f"bgqueue.submit {A}")
    assert submitted["kind"] == "SpanKind.PRODUCER"
    assert submitted["parent_id"] == web["context"]["span_id"]
    assert submitted["attributes"] == {
        "bgqueue.app": APP_ID,
        "bgqueue.scope": "kiosk-1",
        "bgqueue.identifier": A,
        "bgqueue.kind": "processing",
    }
    waiting = pending_record(redis_client, traced, "kiosk-1", A)
    assert waiting["tp"] == traceparent(submitted)

    start(cluster, spans_path)
    (run,) = wait_span(spans_path, f"bgqueue.run {A}")
    (record,) = traced.scheduler_for("kiosk-1").history()
    assert (record.state, record.success) == ("completed", False)

    assert run["kind"] == "SpanKind.CONSUMER"
    assert run["parent_id"] is None  # no Celery instrumentation here: a trace of its own
    assert run["context"]["trace_id"] != submitted["context"]["trace_id"]
    assert linked(run) == [ids(submitted)]
    assert run["attributes"] == {
        "bgqueue.app": APP_ID,
        "bgqueue.scope": "kiosk-1",
        "bgqueue.identifier": A,
        "bgqueue.kind": "processing",
        "bgqueue.attempt": 1,
        "bgqueue.request_id": record.request_id,
        "bgqueue.worker": "w1",
        "bgqueue.outcome": "completed",
        "bgqueue.success": False,
    }
    assert run["status"]["status_code"] == "ERROR"

    names = [event["name"] for event in run["events"]]
    assert names == ["suspend_delay", "suspend_delay_cancelled", "expiration"], run["events"]
    granted, cancelled, expiration = run["events"]
    assert granted["attributes"]["bgqueue.delay.ms"] == 1000  # transient_max_delay
    assert granted["attributes"]["bgqueue.delay.reason"] == "flush the cache"
    assert cancelled["attributes"] == {
        "bgqueue.delay.id": granted["attributes"]["bgqueue.delay.id"]
    }
    assert expiration["attributes"] == {
        "bgqueue.expiration.handler": True,
        "bgqueue.expiration.forced": False,
    }
    # Budget 2 s, the handler called 0.4 s before the deadline.
    assert 1.5 <= seconds(run, expiration["timestamp"]) < 5, run

    for name in ("handler work", "expiration handler"):  # the latter may end after the run
        (own,) = wait_span(spans_path, name)
        assert own["parent_id"] == run["context"]["span_id"], name
        assert own["context"]["trace_id"] == run["context"]["trace_id"], name
    shown = ("name", "kind", "context", "links", "attributes", "events")
    for span in (submitted, run):  # the trace, for a reader of `pytest -s`
        print("\n" + json.dumps({key: span[key] for key in shown if key in span}, indent=1))


def test_with_celery_instrumentation_the_run_span_is_a_child_of_celerys_task_span(
    cluster: Cluster,
    traced: bg.BackgroundApp,
    producer: Producer,
    spans_path: Path,
    redis_client: redis.Redis,
) -> None:
    """opentelemetry-instrumentation-celery instruments the worker: Celery's task span
    `run/<identifier>` is there, the run span is its child (same trace) and still links to
    the producer span, which is not its parent. A record whose traceparent is not one
    (foreign data) runs all the same, with a span that links to nothing."""
    scheduler = traced.scheduler_for("default")
    scheduler.submit(bg.ProcessingTaskRequest(B, payload={"complete": True}))
    scheduler.submit(bg.ProcessingTaskRequest(C, payload={"complete": True}))
    (submitted,) = producer.spans(f"bgqueue.submit {B}")
    foreign = pending_record(redis_client, traced, "default", C)
    foreign["tp"] = "00-not-a-traceparent"
    redis_client.hset(traced.keys.requests("default"), C, json.dumps(foreign))

    start(cluster, spans_path, TEST_OTEL_CELERY="1")
    (celery_span,) = wait_span(spans_path, f"run/{B}")
    (run,) = worker_spans(spans_path, f"bgqueue.run {B}")
    assert celery_span["kind"] == "SpanKind.CONSUMER"
    assert run["parent_id"] == celery_span["context"]["span_id"]
    assert run["context"]["trace_id"] == celery_span["context"]["trace_id"]
    assert linked(run) == [ids(submitted)]
    assert run["context"]["trace_id"] != submitted["context"]["trace_id"]
    assert run["attributes"]["bgqueue.outcome"] == "completed"
    assert run["attributes"]["bgqueue.success"] is True
    assert run["status"]["status_code"] == "UNSET"

    (celery_c,) = wait_span(spans_path, f"run/{C}")
    (run_c,) = worker_spans(spans_path, f"bgqueue.run {C}")
    assert run_c["parent_id"] == celery_c["context"]["span_id"]
    assert run_c["links"] == []
    assert (run_c["attributes"]["bgqueue.outcome"], run_c["attributes"]["bgqueue.success"]) == (
        "completed",
        True,
    )


def test_a_requeued_run_keeps_the_producer_span(
    cluster: Cluster,
    traced: bg.BackgroundApp,
    producer: Producer,
    spans_path: Path,
    redis_client: redis.Redis,
) -> None:
    """The traceparent goes from the pending record into the running record; the worker
    is killed mid-run, beat puts the request back to pending (recover.lua) with the same
    traceparent, and the second attempt's run span links to the same producer span."""
    traced.scheduler.submit(bg.ProcessingTaskRequest(A, payload={"first_sleep": 60}))
    (submitted,) = producer.spans(f"bgqueue.submit {A}")
    start(cluster, spans_path, "w1", TEST_BUDGET="60")

    def running() -> Any:
        values = redis_client.hvals(traced.keys.running)
        return values and json.loads(values[0])

    assert wait_for(running, 30, "the first run")["tp"] == traceparent(submitted)
    cluster.procs[-1].kill()
    requeued = wait_for(
        lambda: (
            (rec := pending_record(redis_client, traced, "default", A)) and rec["a"] == 1 and rec
        ),
        30,
        "the run to be requeued",
    )
    assert requeued["tp"] == traceparent(submitted)

    start(cluster, spans_path, "w2")
    (run,) = wait_span(spans_path, f"bgqueue.run {A}")
    assert run["attributes"]["bgqueue.attempt"] == 2
    assert run["attributes"]["bgqueue.worker"] == "w2"
    assert linked(run) == [ids(submitted)]


def test_an_expired_run_exports_its_span_before_its_pool_process_is_retired(
    cluster: Cluster,
    traced: bg.BackgroundApp,
    producer: Producer,
    spans_path: Path,
) -> None:
    """The worker batches spans (BatchSpanProcessor exporting only when flushed). A run
    overruns its deadline: the expiration handler is called, the body is terminated and
    its pool process retired (os._exit) once it reports. bgqueue flushed first, so its
    span is exported, with the expiration and the termination as events and outcome
    expired."""
    payload = {"expiration": "record", "hang": 60}
    traced.scheduler.submit(bg.ProcessingTaskRequest(A, payload=payload))
    (submitted,) = producer.spans(f"bgqueue.submit {A}")
    start(cluster, spans_path, TEST_OTEL_PROCESSOR="batch")

    (run,) = wait_span(spans_path, f"bgqueue.run {A}")
    assert run["attributes"]["bgqueue.outcome"] == "expired"
    assert run["attributes"]["bgqueue.success"] is False
    assert run["attributes"]["bgqueue.reason"] == "did not complete by its deadline"
    assert run["status"] == {
        "status_code": "ERROR",
        "description": "did not complete by its deadline",
    }
    assert [event["name"] for event in run["events"]] == ["expiration", "terminated"]
    assert run["events"][1]["attributes"] == {
        "bgqueue.reason": "it did not complete by its deadline"
    }
    assert linked(run) == [ids(submitted)]
    # The handler's own span, ended by the interruption, was flushed with it.
    (work,) = worker_spans(spans_path, "handler work")
    assert work["parent_id"] == run["context"]["span_id"]


# --- the producer alone -----------------------------------------------------------------


def test_each_request_of_a_batch_and_an_async_submit_get_their_own_producer_span(
    traced: bg.BackgroundApp, producer: Producer, redis_client: redis.Redis
) -> None:
    """submit_many makes a span per request, each traceparent in its own record; asubmit
    (the same _submit_call) makes its span a child of the coroutine's current span."""
    traced.scheduler.submit_many(bg.ProcessingTaskRequest(i) for i in (A, B))
    spans = {span["attributes"]["bgqueue.identifier"]: span for span in producer.spans()}
    assert set(spans) == {A, B}
    for identifier in (A, B):
        record = pending_record(redis_client, traced, "default", identifier)
        assert record["tp"] == traceparent(spans[identifier])

    async def submit() -> None:
        with producer.tracer.start_as_current_span("async handler"):
            await traced.scheduler_for("async").asubmit(bg.AppRefreshTaskRequest(C))
        await traced.aclose()

    asyncio.run(submit())
    (outer,) = producer.spans("async handler")
    (span,) = producer.spans(f"bgqueue.submit {C}")
    assert span["parent_id"] == outer["context"]["span_id"]
    assert span["attributes"]["bgqueue.kind"] == "refresh"
    assert span["attributes"]["bgqueue.scope"] == "async"
    assert pending_record(redis_client, traced, "async", C)["tp"] == traceparent(span)


def test_without_a_tracer_provider_a_record_carries_no_trace_field(
    traced: bg.BackgroundApp, redis_client: redis.Redis, redis_url: str
) -> None:
    """OpenTelemetry is imported in this process (this module imports the SDK) but no
    tracer provider is set: a submit stores the very record requests.py builds. A span
    that is not sampled adds nothing either. A process that never imported OpenTelemetry
    submits without bgqueue importing it."""
    assert "opentelemetry.trace" in sys.modules
    request = bg.ProcessingTaskRequest(A, payload={"days": 30})
    traced.scheduler.submit(request)
    stored = pending_record(redis_client, traced, "default", A)
    stored.pop("t")  # added by submit.lua: the request was due at once
    assert stored == json.loads(request.record()[0])
    assert "tp" not in stored

    unsampled = Producer(sampler=ALWAYS_OFF)
    tracing.use_tracer_provider(unsampled.provider)
    try:
        traced.scheduler.submit(bg.ProcessingTaskRequest(B))
    finally:
        tracing.use_tracer_provider(None)
    assert "tp" not in pending_record(redis_client, traced, "default", B)
    assert unsampled.spans() == []

    # Another process: no OpenTelemetry until it sets a global provider, then traced.
    script = (
        "import sys, bgqueue as bg\n"
        "from tests.apps.traced_app import app\n"
        f"app.use_broker({redis_url!r})\n"
        f"app.scheduler_for('fresh').submit(bg.ProcessingTaskRequest({C!r}))\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "trace.set_tracer_provider(TracerProvider())\n"
        f"app.scheduler_for('fresh').submit(bg.ProcessingTaskRequest({B!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert "tp" not in pending_record(redis_client, traced, "fresh", C)
    assert len(pending_record(redis_client, traced, "fresh", B)["tp"]) == 55
