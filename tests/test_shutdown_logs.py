"""Graceful shutdown and structured logs, with real `bgqueue worker` and `bgqueue beat`
processes.

SIGTERM to a worker's main process is Celery's warm shutdown: it stops taking messages
and waits for the running tasks, whose watchdogs end them within their budgets (completed,
or expired at the deadline); requests not started are left for other workers. The worker
leaves at once, so beat stops counting on it while it drains.
"""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import bgqueue as bg
from tests.harness import APP_ID, Cluster, Proc, events, wait_for

P = "com.bgqueue.test."
BUDGET, LEAD = 2.0, 0.4
FAST_BUDGET = {"TEST_PROCESSING_BUDGET": str(BUDGET), "TEST_EXPIRATION_WARNING": str(LEAD)}
# What Celery prints outside logging: its banner (text format only) and, from its SIGTERM
# handler, this line straight to stdout.
CELERY_PRINTS = "worker: Warm shutdown (MainProcess)"


@pytest.fixture(autouse=True)
def _kill_processes_at_teardown(cluster: Cluster) -> Iterator[None]:
    yield
    cluster.kill_all()


def history(app: bg.BackgroundApp, identifier: str) -> list[bg.TaskRecord]:
    return [r for r in app.scheduler.history() if r.identifier == identifier]


def exited(proc: Proc, timeout: float) -> int:
    """Wait for the process to exit by itself; its exit code."""
    wait_for(lambda: not proc.alive(), timeout, f"{proc.args[0]} to exit")
    return proc.popen.returncode


# --- shutdown -------------------------------------------------------------------------


def test_sigterm_lets_a_running_task_complete_and_the_worker_exit(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A task that completes 1.5 s after SIGTERM is recorded completed, the worker left
    beat's view before it did, and the worker then exits cleanly."""
    cluster.beat()
    worker = cluster.worker("w1", concurrency=1)
    sample_app.scheduler.submit(
        bg.ProcessingTaskRequest(P + "a", payload={"sleep": 1.5, "complete": True})
    )
    wait_for(lambda: events(redis_client, "start", P + "a"), 15, "the run to start")
    worker.signal(signal.SIGTERM)
    wait_for(lambda: not cluster.worker_alive("w1"), 5, "the worker to leave")
    assert not events(redis_client, "end", P + "a"), "left only after the task ended"
    assert exited(worker, 15) == 0
    [record] = history(sample_app, P + "a")
    assert (record.state, record.success) == ("completed", True)
    assert events(redis_client, "end", P + "a")


def test_sigterm_expires_an_overrunning_task_at_its_deadline(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A task that would run for 30 s gets its expiration handler and is recorded expired
    at its 2 s deadline, not later; the worker exits soon after, and the message Celery
    hands back when the pool process is killed does not run the request again."""
    cluster.beat()
    worker = cluster.worker("w1", concurrency=1, env=FAST_BUDGET)
    sample_app.scheduler.submit(
        bg.ProcessingTaskRequest(P + "slow", payload={"sleep": 30, "expiration": "record"})
    )
    [start] = wait_for(lambda: events(redis_client, "start", P + "slow"), 15, "the run")
    worker.signal(signal.SIGTERM)
    assert exited(worker, BUDGET + 8) == 0
    [record] = history(sample_app, P + "slow")
    assert record.state == "expired"
    assert record.finished_at is not None
    assert record.finished_at.timestamp() - start["t"] < BUDGET + 0.5
    assert [e["event"] for e in events(redis_client, identifier=P + "slow")] == [
        "start",
        "expiration",
    ]
    # Another worker picks up whatever was handed back: nothing runs twice.
    cluster.worker("w2", concurrency=1, env=FAST_BUDGET)
    sample_app.scheduler.submit(bg.ProcessingTaskRequest(P + "a", payload={"complete": True}))
    wait_for(lambda: history(sample_app, P + "a"), 15, "a run on w2")
    assert len(events(redis_client, "start", P + "slow")) == 1


def test_sigterm_leaves_requests_not_started_to_other_workers(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A request dispatched while the worker is busy (published, not started) is not
    taken by a worker shutting down: it runs once, on the next worker, and the running
    one completes once, on the first."""
    cluster.beat()
    worker = cluster.worker("w1", concurrency=1)
    scheduler = sample_app.scheduler
    scheduler.submit(bg.ProcessingTaskRequest(P + "a", payload={"sleep": 1.5, "complete": True}))
    wait_for(lambda: events(redis_client, "start", P + "a"), 15, "the first run")
    scheduler.submit(bg.ProcessingTaskRequest(P + "b", payload={"complete": True}))
    wait_for(lambda: _state(redis_client, P + "b") == "dispatched", 10, "b dispatched")
    worker.signal(signal.SIGTERM)
    assert exited(worker, 15) == 0
    assert [r.state for r in history(sample_app, P + "a")] == ["completed"]
    assert not events(redis_client, "start", P + "b")
    # Still waiting for its message to be taken, or (w1's class has no live worker left)
    # handed back to pending for the next worker to come.
    assert _state(redis_client, P + "b") in ("dispatched", "pending")

    cluster.worker("w2", concurrency=1)
    wait_for(lambda: history(sample_app, P + "b"), 15, "b to run on w2")
    assert [e["worker"] for e in events(redis_client, "start", P + "b")] == ["w2"]
    assert [e["worker"] for e in events(redis_client, "start", P + "a")] == ["w1"]
    assert [r.state for r in history(sample_app, P + "b")] == ["completed"]


def _state(client: redis.Redis, identifier: str) -> str | None:
    raw = client.hget(f"bgqueue:{{{APP_ID}}}:req:default", identifier)
    return None if raw is None else str(json.loads(raw)["s"])


# --- logs -----------------------------------------------------------------------------


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a log as JSON; a line that is not JSON fails the test (Celery's one
    direct print from its SIGTERM handler aside)."""
    found = []
    for line in path.read_text().splitlines():
        if line.strip() == CELERY_PRINTS:
            continue
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line in {path.name}: {line!r}")
    return found


def about(lines: list[dict[str, Any]], identifier: str) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("identifier") == identifier]


def test_json_logs_name_the_request_and_never_the_broker_password(
    make_redis_server: Any, tmp_path: Path
) -> None:
    """With --log-format json (or BGQUEUE_LOG_FORMAT=json) worker and beat write one JSON
    object per line: time, level, logger, message, and for lines about a request its app,
    scope, identifier and request id, from the pool process's watchdog and from beat.
    Celery's own lines are JSON too. The broker's password appears in no log, JSON or
    text (Celery's banner included)."""
    password = "s3cret-Pa55word"
    server = make_redis_server(password=password)
    cluster = Cluster(server.url, tmp_path, env=FAST_BUDGET)
    try:
        _logs_scenario(cluster, password, tmp_path)
    finally:
        cluster.kill_all()
        cluster.client.close()


def _logs_scenario(cluster: Cluster, password: str, tmp_path: Path) -> None:
    from tests.apps import sample

    app = sample.app
    app._client, app._announced = None, False
    app.use_broker(cluster.redis_url)
    try:
        cluster.start(["beat"], "beat", env={"BGQUEUE_LOG_FORMAT": "json"})
        args = ["--log-format", "json"]
        worker = cluster.start(
            ["worker", "--app", "tests.apps.sample:app", "--name", "wj", "--concurrency", "1"]
            + args,
            "wj",
        )
        wait_for(lambda: cluster.worker_alive("wj"), 30, "the JSON worker")
        app.scheduler_for("dev-1").submit(
            bg.ProcessingTaskRequest(P + "a", payload={"complete": True})
        )
        wait_for(lambda: app.scheduler_for("dev-1").history(), 15, "a to run")
        app.scheduler_for("dev-1").submit(
            bg.ProcessingTaskRequest(P + "slow", payload={"sleep": 30, "expiration": "record"})
        )
        expired = wait_for(
            lambda: [r for r in app.scheduler_for("dev-1").history() if r.state == "expired"],
            15,
            "the overrun to expire",
        )[0]
        # A run lost with its worker: beat logs about it.
        app.scheduler_for("dev-2").submit(
            bg.ProcessingTaskRequest(P + "b", payload={"sleep": 30, "expiration": "record"})
        )
        wait_for(
            lambda: (
                app.scheduler_for("dev-2").pending_task_requests() == []
                and app.client.hlen(app.keys.running)
            ),
            15,
            "b to start",
        )
        worker.kill()
        wait_for(lambda: app.scheduler_for("dev-2").history(), 15, "beat to recover b")
        text = cluster.worker("wt")  # text format: Celery's banner names the broker
        app_history = app.scheduler_for("dev-1").history()
        beat_log = json_lines(tmp_path / "beat.log")
        worker_log = json_lines(tmp_path / "wj.log")
    finally:
        app._client, app._announced = None, False

    for line in beat_log + worker_log:
        assert {"time", "level", "logger", "message"} <= set(line), line
    watchdog = [
        line for line in about(worker_log, P + "slow") if line["message"].startswith("terminating")
    ]
    assert watchdog, worker_log
    assert watchdog[0]["app"] == APP_ID
    assert watchdog[0]["scope"] == "dev-1"
    assert watchdog[0]["request_id"] == expired.request_id
    assert watchdog[0]["level"] == "WARNING"
    assert watchdog[0]["logger"] == "bgqueue.runtime"
    # Celery's line about the run, from the pool process, names it too.
    [run_a] = [r for r in app_history if r.identifier == P + "a"]
    traced = [line for line in about(worker_log, P + "a") if line["logger"] == "celery.app.trace"]
    assert traced and traced[0]["request_id"] == run_a.request_id, worker_log
    assert traced[0]["scope"] == "dev-1" and traced[0]["task_id"]
    lost = [line for line in about(beat_log, P + "b") if "lost its worker" in line["message"]]
    assert lost and lost[0]["scope"] == "dev-2" and lost[0]["app"] == APP_ID, beat_log
    assert any(line["message"] == "wj@" + socket.gethostname() + " ready." for line in worker_log)
    assert "transport:" in text.log(), "the text worker's banner"
    for log in ("beat.log", "wj.log", "wt.log"):
        assert password not in (tmp_path / log).read_text(), log
