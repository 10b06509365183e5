"""Every request script against corruption of every key it touches.

A Lua script that fails half-way keeps the writes it made before the error, so each script
checks what can fail before its first write (or orders its writes so that a failure leaves
a recoverable state). For each script, each key it touches and each way that key can be
corrupted (a key of another type, a counter that is not a number, a record that is not a
request's), this test brings one request to the state the script acts on, corrupts the key,
runs the script the way bgqueue runs it, and checks:

- a script that failed wrote nothing (every other key is as it was);
- once the corruption is removed (as an operator would), the request is still served: it
  completes through the same scripts; or it was dead-lettered with a reason that names it.

The scripts run in this process, through bgqueue's own callers (Scheduler, Beat, runtime),
on the real test Redis; a worker class is announced by its heartbeat, as a worker would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import redis

import bgqueue as bg
from bgqueue import runtime
from bgqueue.beat import Beat
from bgqueue.broker import deadletter
from bgqueue.errors import BackgroundTaskError
from bgqueue.model.keys import AppKeys
from bgqueue.model.requests import Kind, State
from bgqueue.worker.heartbeat import worker_class

APP_ID = "com.bgqueue.corrupt"
ID = f"{APP_ID}.job"
SCOPE = "dev"
Snapshot = dict[bytes, Any]


class Driver:
    """One request's life, one script at a time, through bgqueue's own callers."""

    def __init__(self, url: str) -> None:
        self.app = bg.BackgroundApp(APP_ID, permitted_identifiers=[f"{APP_ID}.*"], broker_url=url)
        self.app.register(ID)(lambda task: None)
        self.keys = self.app.keys
        self.client = redis.Redis.from_url(url)
        self.beat = Beat(url)
        self.scheduler = self.app.scheduler_for(SCOPE)

    def close(self) -> None:
        self.client.close()
        self.beat.client.close()
        self.app.client.close()  # else its socket stays open until collected

    def announce_worker(self) -> None:
        """A live worker whose class runs ID in every profile, as its heartbeat says."""
        class_id, class_json = worker_class(self.app, {}, continuous=False)
        beat = json.dumps({"class": class_id, "token": "t", "conditions": {}, "concurrency": 1})
        k = self.keys
        script_keys = [k.workers, k.alive, k.classes, k.classlive]
        self.app.call("heartbeat", script_keys, ["w", beat, 60_000, "t", class_id, class_json])

    def record(self) -> dict[str, Any]:
        raw = self.client.hget(self.keys.requests(SCOPE), ID)
        try:
            return dict(json.loads(raw)) if raw else {}
        except ValueError:
            return {}

    def gen(self) -> int:
        running = self.client.hkeys(self.keys.running)
        return int(running[0]) if running else int(self.record().get("g", 0))

    # -- the steps, each one script ------------------------------------------------------

    def submit(self, **fields: Any) -> None:
        self.scheduler.submit(bg.ProcessingTaskRequest(ID, payload={"n": 1}, **fields))

    def submit_now(self) -> None:
        """A continued-processing request that must start now: free slots are counted."""
        self.scheduler.submit(bg.ContinuedProcessingTaskRequest(ID, title="t", payload={"n": 1}))

    def route(self) -> None:
        """Beat's routes, as a beat that sees the announced worker writes them: a request
        due now is then dispatched by its submit itself."""
        view = self.beat.view(self.keys)
        self.beat._write_routes(self.keys, view)

    def cancel(self) -> None:
        self.scheduler.cancel(ID)

    def launch(self) -> None:
        self.scheduler.simulate_launch(ID)

    def profile(self) -> int:
        """The requirement profile of the request's record (0 if none)."""
        return int(self.record().get("r", 0))

    def claim(self) -> None:
        view = self.beat.view(self.keys)
        self.beat._claim(self.keys, self.profile(), [SCOPE], view, view.now + 1000)

    def claim_without_a_route(self) -> None:
        view = self.beat.view(self.keys)
        view.routes[self.profile()] = {}
        self.beat._claim(self.keys, self.profile(), [SCOPE], view, view.now + 1000)

    def unpark(self) -> None:
        view = self.beat.view(self.keys)
        self.beat._unpark_from[APP_ID] = 0
        self.beat._unpark(self.keys, view)

    def lapse(self) -> None:
        """The dispatch lease lapses (the message was lost)."""
        self.client.zadd(self.keys.leases, {f"{SCOPE}\x1f{ID}": 0}, xx=True)

    def sweep_dispatches(self) -> None:
        self.beat._sweep_dispatches(self.keys)

    def release(self) -> None:
        runtime.release(self.app, ID, SCOPE, self.gen(), 0)

    def start(self) -> None:
        runtime._start(self.app, SCOPE, ID, self.gen())

    def renew(self) -> None:
        k = self.keys
        script_keys = [k.runleases, k.expire, k.running, k.deadletter]
        self.app.call("renew", script_keys, [self.gen(), 60_000])

    def finish(self) -> None:
        ended = (State.COMPLETED, True, "")
        runtime.finish(self.app, SCOPE, ID, Kind.PROCESSING, self.gen(), ended)

    def lose_worker(self) -> None:
        """The run lease lapses (its worker died)."""
        self.client.zadd(self.keys.runleases, {str(self.gen()): 0}, xx=True)

    def sweep_runs(self) -> None:
        self.beat._sweep_runs(self.keys)

    def served(self) -> bool:
        """Drive the request to its end with the ordinary scripts; whether it completed."""
        for _ in range(8):
            if any(r.state == "completed" for r in self.scheduler.history()):
                return True
            state = self.record().get("s")
            if self.client.hlen(self.keys.running):
                self.finish()
            elif state == "pending":
                self.launch()  # due now, whatever its date
                self.claim()
            elif state == "dispatched":
                self.start()
            elif state == "parked":
                self.unpark()
            else:
                return False
        return False

    def dead_lettered(self, gen: int) -> bool:
        """Whether an entry of the dead letter names the request, its run, or the key that
        held its record (foreign data written over it)."""
        holders = {self.keys.requests(SCOPE), self.keys.running, f"{self.keys.running} {gen}"}
        return any(
            ID in entry.source or ID in entry.raw or entry.source in holders
            for entry in deadletter.read(self.client, self.keys, deadletter.CAP)
        )

    def exists(self) -> bool:
        """Whether the request was accepted: recorded, or running."""
        return bool(self.record() or self.client.hlen(self.keys.running))


# Each script: how to bring the request to where the script acts, then run the script.
Stage = tuple[Callable[[Driver], None], Callable[[Driver], None]]
STAGES: dict[str, Stage] = {
    "submit": (lambda d: None, lambda d: d.submit()),
    "submit (replace)": (lambda d: d.submit(), lambda d: d.submit()),
    "submit (replace in another profile)": (
        lambda d: d.submit(requires_network_connectivity=True),
        lambda d: d.submit(),
    ),
    "submit (replace parked)": (
        lambda d: (d.submit(), d.claim_without_a_route()),
        lambda d: d.submit(),
    ),
    "submit (replace dispatched)": (lambda d: (d.submit(), d.claim()), lambda d: d.submit()),
    "submit (must start now)": (lambda d: None, lambda d: d.submit_now()),
    "submit (dispatch here)": (lambda d: d.route(), lambda d: d.submit()),
    "cancel": (lambda d: d.submit(), lambda d: (d.cancel(), d.submit())),
    "launch": (
        lambda d: d.submit(earliest_begin_date=bg_later()),
        lambda d: d.launch(),
    ),
    "claim": (lambda d: d.submit(), lambda d: d.claim()),
    "claim (park)": (lambda d: d.submit(), lambda d: d.claim_without_a_route()),
    "unpark": (lambda d: (d.submit(), d.claim_without_a_route()), lambda d: d.unpark()),
    "lapsed": (lambda d: (d.submit(), d.claim(), d.lapse()), lambda d: d.sweep_dispatches()),
    "release": (lambda d: (d.submit(), d.claim()), lambda d: d.release()),
    "start": (lambda d: (d.submit(), d.claim()), lambda d: d.start()),
    "renew": (lambda d: (d.submit(), d.claim(), d.start()), lambda d: d.renew()),
    "finish": (lambda d: (d.submit(), d.claim(), d.start()), lambda d: d.finish()),
    "recover": (
        lambda d: (d.submit(), d.claim(), d.start(), d.lose_worker()),
        lambda d: d.sweep_runs(),
    ),
}


def bg_later() -> Any:
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) + timedelta(hours=1)


# The keys each script touches (its KEYS, as bgqueue passes them), and how each is corrupted.
def keys_of(d: Driver, script: str) -> list[str]:
    k = d.keys
    request = [k.requests(SCOPE), k.sched(0, SCOPE), k.due(0), k.counts]
    touched = {
        "submit": request,
        "submit (replace)": request,
        "submit (replace in another profile)": [*request, k.sched(1, SCOPE), k.due(1)],
        "submit (replace parked)": [*request, k.parked],
        "submit (replace dispatched)": [*request, k.leases],
        "submit (must start now)": [*request, k.workers, k.alive, k.running, k.classes, k.leases],
        "submit (dispatch here)": [*request, k.routes, k.classlive, k.seq, k.leases],
        "cancel": [*request, k.leases, k.parked, k.history(SCOPE)],
        "launch": request[:3],
        "claim": [*request, k.leases, k.seq, k.parked],
        "claim (park)": [*request, k.seq, k.parked],
        "unpark": [*request, k.parked],
        "lapsed": [k.leases, k.requests(SCOPE), k.classlive, k.classes],
        "release": [*request, k.leases],
        "start": [k.requests(SCOPE), k.leases, k.running, k.runleases, k.counts],
        "renew": [k.runleases, k.expire, k.running],
        "finish": [k.running, k.runleases, k.history(SCOPE), k.expire],
        "recover": [k.running, k.runleases, k.expire, *request, k.history(SCOPE)],
    }
    return touched[script]


def corruptions(d: Driver, key: str) -> list[tuple[str, Callable[[redis.Redis], None]]]:
    """The ways one key can hold what bgqueue did not write."""
    k = d.keys
    ways: list[tuple[str, Callable[[redis.Redis], None]]] = []
    if key == k.seq:
        ways.append(("seq not a number", lambda c: c.set(key, "not a number")))
        ways.append(("seq a hash", lambda c: (c.delete(key), c.hset(key, "x", "y"))))
        return ways
    ways.append(("wrong type", lambda c: (c.delete(key), c.set(key, "foreign"))))
    if key == k.counts:
        fields = [f"processing:{p}" for p in (0, "parked", "dispatched")]
        ways.append(
            ("counter not a number", lambda c: c.hset(key, mapping=dict.fromkeys(fields, "x")))
        )
    if key == k.requests(SCOPE):
        ways.append(("limit counter not a number", lambda c: c.hset(key, "#processing", "x")))
        ways.append(("record not JSON", lambda c: c.hset(key, ID, "{not json")))
        ways.append(("payload not JSON", lambda c: _spoil_payload(c, key)))
    if key == k.running:
        ways.append(("running record not JSON", lambda c: _spoil_running(c, key)))
    return ways


def _spoil_payload(client: redis.Redis, key: str) -> None:
    raw = client.hget(key, ID)
    if raw:
        record = json.loads(raw)
        client.hset(key, ID, json.dumps({**record, "pl": "{not json"}))


def _spoil_running(client: redis.Redis, key: str) -> None:
    for gen in client.hkeys(key):
        client.hset(key, gen, "garbage")


def snapshot(client: redis.Redis, skip: set[str]) -> Snapshot:
    """Every key's logical content, but those in `skip` and those outside the app's data:
    kombu's, the class queues', and the index of apps (a submit names its app there in the
    same round trip, refused or not: that says nothing about any request)."""
    found: Snapshot = {}
    for name in client.scan_iter(count=1000):
        outside = name.startswith(b"_kombu") or b".class." in name or name == b"bgqueue:apps"
        if name.decode() in skip or outside:
            continue
        kind = client.type(name).decode()
        read = {
            "string": lambda n: client.get(n),
            "hash": lambda n: client.hgetall(n),
            "zset": lambda n: client.zrange(n, 0, -1, withscores=True),
            "list": lambda n: client.lrange(n, 0, -1),
            "set": lambda n: client.smembers(n),
        }[kind]
        found[name] = (kind, read(name))
    return found


def cases() -> list[tuple[str, str, str]]:
    """(script, key, corruption) for every script, key and corruption, by name."""
    d = Driver.__new__(Driver)
    d.keys = AppKeys(APP_ID)
    return [
        (script, key, name)
        for script in STAGES
        for key in keys_of(d, script)
        for name, _ in corruptions(d, key)
    ]


@pytest.mark.parametrize(("script", "key", "corruption"), cases())
def test_a_script_meeting_corruption_writes_nothing_or_leaves_the_request_served(
    redis_url: str, script: str, key: str, corruption: str
) -> None:
    d = Driver(redis_url)
    try:
        d.announce_worker()
        before_stage, run = STAGES[script]
        before_stage(d)
        gen = d.gen()
        original = d.client.dump(key)
        dict(corruptions(d, key))[corruption](d.client)
        corrupted = _content(d.client, key)
        before = snapshot(d.client, {key, d.keys.deadletter})
        try:
            run(d)
            failed = False
        except (BackgroundTaskError, redis.ResponseError):
            failed = True
        if failed:
            assert snapshot(d.client, {key, d.keys.deadletter}) == before, "a failed script wrote"
        # The operator removes the corruption, if the script did not move it aside already.
        if _content(d.client, key) == corrupted:
            d.client.delete(key)
            if original is not None:
                d.client.restore(key, 0, original)
        if failed and not d.exists():
            return  # a submit refused with a typed error: nothing was accepted
        assert d.served() or d.dead_lettered(gen), (
            f"{script} over {corruption} in {key}: the request was neither served nor "
            f"dead-lettered; record {d.record()}, dead letter "
            f"{[e.reason for e in deadletter.read(d.client, d.keys)]}"
        )
    finally:
        d.close()


def _content(client: redis.Redis, key: str) -> Any:
    kind = client.type(key).decode()
    if kind == "none":
        return None
    return (kind, snapshot(client, set()).get(key.encode()))


def test_a_submit_dispatches_a_request_due_now_itself_over_sound_keys(redis_url: str) -> None:
    """The stage "submit (dispatch here)" above does take the direct path when nothing is
    corrupted: the request is dispatched, its message is on its class's queue."""
    d = Driver(redis_url)
    try:
        d.announce_worker()
        d.route()
        d.submit()
        record = d.record()
        assert record["s"] == "dispatched", record
        # kombu's list of the normal lane (efficiency.NORMAL_LANE) of the class's queue
        queue = f"{d.keys.class_queue(record['q'])}{AppKeys.KOMBU_SEP}3"
        message = json.loads(d.client.lindex(queue, 0))
        assert message["headers"]["task"] == ID
        assert d.served()
    finally:
        d.close()
