"""What the fault scenarios read back from Redis: runs recorded by the sample app's
handlers, bgqueue's history, leases and queues. Counting only, no waiting on state
that is not there yet except through harness.wait_for."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections import Counter
from datetime import datetime
from typing import Any

import redis

import bgqueue as bg
from bgqueue.model import keys
from tests.harness import APP_ID, FAST, events, wait_for

PREFIX = "com.bgqueue.test."
SLOW = PREFIX + "slow"
# Identifiers with a launch handler in tests/apps/sample.py (the worker's app).
HANDLED = [PREFIX + n for n in ("a", "b", "c", "process", "refresh", "health", "continued", "slow")]
HEARTBEAT_INTERVAL = float(FAST["BGQUEUE_HEARTBEAT_INTERVAL"])
HEARTBEAT_TIMEOUT = float(FAST["BGQUEUE_HEARTBEAT_TIMEOUT"])
BEAT_LEASE = float(FAST["BGQUEUE_BEAT_LEASE"])
DISPATCH_LEASE = float(FAST["BGQUEUE_DISPATCH_LEASE"])
APP_KEYS = keys.AppKeys(APP_ID)

Key = tuple[str, str]  # (scope, identifier): one accepted request
PerGen = Counter[tuple[str, str, int]]
PerRequest = Counter[Key]


def producer(url: str) -> bg.BackgroundApp:
    """A producer-side app with the sample app's id, on `url` (its own connection)."""
    return bg.BackgroundApp(APP_ID, permitted_identifiers=[PREFIX + "*"], broker_url=url)


def processing(identifier: str, payload: Any, begin: datetime | None = None) -> bg.BGTaskRequest:
    return bg.ProcessingTaskRequest(identifier, earliest_begin_date=begin, payload=payload)


def submit_grid(
    app: bg.BackgroundApp, scopes: list[str], identifiers: list[str], payload: Any
) -> set[Key]:
    """Submit one processing request per scope and identifier; the accepted (scope, id)s."""
    for scope in scopes:
        app.scheduler_for(scope).submit_many(processing(i, payload) for i in identifiers)
    return {(s, i) for s in scopes for i in identifiers}


def started_counts(client: redis.Redis) -> tuple[PerGen, PerRequest]:
    """Start events per (scope, identifier, generation) and per (scope, identifier)."""
    starts = events(client, "start")
    per_gen = Counter((e["scope"], e["id"], e["gen"]) for e in starts)
    per_request = Counter((e["scope"], e["id"]) for e in starts)
    return per_gen, per_request


def ran_twice(client: redis.Redis) -> list[Key]:
    """Requests that started more than once, sorted."""
    return sorted(k for k, n in started_counts(client)[1].items() if n > 1)


def ended(client: redis.Redis) -> set[Key]:
    """(scope, identifier) of every run whose handler reached its end."""
    return {(e["scope"], e["id"]) for e in events(client, "end")}


def completed_runs(app: bg.BackgroundApp, scopes: list[str]) -> set[Key]:
    """(scope, identifier) of every request whose history has a successful completion."""
    return {
        (r.scope, r.identifier)
        for scope in scopes
        for r in app.scheduler_for(scope).history(limit=1000)
        if r.state == "completed" and r.success
    }


def scopes_of(accepted: set[Key]) -> list[str]:
    return sorted({scope for scope, _ in accepted})


def await_completion(
    app: bg.BackgroundApp, accepted: set[Key], timeout: float
) -> tuple[set[Key], float]:
    """Wait until every accepted request has completed, or the deadline; returns the ones
    that did not (the lost ones, if the deadline passed) and the seconds waited."""
    scopes = scopes_of(accepted)
    began = time.monotonic()
    with contextlib.suppress(AssertionError):  # the caller records and reports what is lost
        wait_for(lambda: accepted <= completed_runs(app, scopes), timeout, "every request to run")
    return accepted - completed_runs(app, scopes), time.monotonic() - began


def nothing_in_flight(client: redis.Redis, scopes: list[str]) -> bool:
    """No request left pending, dispatched or running: nothing more can run."""
    with client.pipeline(transaction=False) as pipe:
        pipe.zcard(APP_KEYS.leases)
        pipe.hlen(APP_KEYS.running)
        for due in APP_KEYS.due_all:
            pipe.zcard(due)
        for scope in scopes:
            pipe.hkeys(APP_KEYS.requests(scope))
        counts = pipe.execute()
    sets = 2 + len(APP_KEYS.due_all)
    waiting = [f for fields in counts[sets:] for f in fields if not f.startswith(b"#")]
    return sum(counts[:sets]) == 0 and not waiting


def beat_holder(client: redis.Redis) -> str:
    raw = client.get(keys.BEAT_LEASE)
    return raw.decode() if raw else ""


def holds_lease(client: redis.Redis, pid: int) -> bool:
    """Whether the beat process with this pid holds the lease (token host:pid:nonce)."""
    return beat_holder(client).split(":")[1:2] == [str(pid)]


def server_ms(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds * 1000 + micros / 1000


def class_queue_lists(client: redis.Redis) -> list[str]:
    """Every list of every worker-class queue of the app (kombu keeps one per priority
    step). A SCAN: test code, not a hot path."""
    pattern = APP_KEYS.class_queue("*")
    return [name.decode() for name in client.scan_iter(match=pattern + "*", count=1000)]


def queued(client: redis.Redis) -> int:
    """Messages waiting on any worker-class queue."""
    return sum(client.llen(name) for name in class_queue_lists(client))


def stuck(client: redis.Redis) -> str:
    """Why dispatched requests have not run: each one's state, how soon its dispatch lease
    lapses, and whether its message is still queued."""
    now_ms = server_ms(client)
    waiting = published(client)
    lines = []
    for raw_member, score in client.zrange(APP_KEYS.leases, 0, -1, withscores=True):
        scope, identifier = keys.split_member(raw_member.decode())
        raw = client.hget(APP_KEYS.requests(scope), identifier)
        state = json.loads(raw)["s"] if raw else "gone"
        where = "queued" if (scope, identifier) in waiting else "not queued (held or lost)"
        lines.append(
            f"{scope}/{identifier} {state}, lease lapses in {(score - now_ms) / 1000:.1f}s, "
            f"message {where}"
        )
    running = client.hlen(APP_KEYS.running)
    return (
        f"{'; '.join(lines) or 'no dispatched request'}; {running} running; "
        f"{queued(client)} message(s) queued"
    )


def _message_key(message: dict[str, Any]) -> Key:
    kwargs = json.loads(base64.b64decode(message["body"]))[1]
    return kwargs["scope"], message["headers"]["task"]


def published(client: redis.Redis) -> set[Key]:
    """Requests with a message waiting on a queue."""
    found: set[Key] = set()
    for name in class_queue_lists(client):
        found |= {_message_key(json.loads(raw)) for raw in client.lrange(name, 0, -1)}
    return found


def dispatched(client: redis.Redis) -> set[Key]:
    """Requests claimed for dispatch and not started (their dispatch lease is held)."""
    members = [m.decode() for m in client.zrange(APP_KEYS.leases, 0, -1)]
    return {keys.split_member(m) for m in members}
