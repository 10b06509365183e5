"""Foreign and malformed data placed directly on bgqueue's Redis keys and Celery queues,
with a real beat and a real worker running.

Each time: the data ends in the app's dead letter (`bgqueue.broker.deadletter`: where, why, the raw
data, the time), the worker and beat keep their PIDs and keep serving (a normal request
submitted afterwards completes), and nothing else changes (a bystander request in another
scope keeps its record and due time).

One cluster serves the whole module: starting a worker and beat per case would cost
seconds each, and a cluster that survives every case in a row is the stronger claim.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bgqueue as bg
from bgqueue.broker import deadletter
from bgqueue.broker.embedded import RedisServer
from bgqueue.model import keys
from bgqueue.ops.status import report
from bgqueue.worker.celery_config import celery_config
from tests.harness import APP_ID, Cluster, events, wait_for

PREFIX = "com.bgqueue.test."
APP_KEYS = keys.AppKeys(APP_ID)
BYSTANDER_SCOPE = "bystander"
BYSTANDER = PREFIX + "a"
LATER = datetime.now(UTC) + timedelta(days=30)
VALID_RECORD = {"k": "processing", "s": "pending", "e": 0, "r": 0, "pl": "null", "a": 0}
REQUIRED = ("k", "s", "e", "r")

EXAMPLES = settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)


class Live:
    """The module's worker and beat, a producer, and the raw client to inject with."""

    def __init__(self, cluster: Cluster, url: str) -> None:
        self.cluster = cluster
        self.client = redis.Redis.from_url(url)
        self.worker = cluster.worker("w1", concurrency=2)
        self.beat = cluster.beat()
        self.pids = (self.worker.pid, self.beat.pid)
        self.app = bg.BackgroundApp(APP_ID, permitted_identifiers=[PREFIX + "*"], broker_url=url)
        self.celery = Celery("foreign", set_as_current=False)
        self.celery.conf.update(celery_config(url))
        self.served = 0

    def dead_letters(self) -> list[deadletter.DeadLetter]:
        return deadletter.read(self.client, APP_KEYS, deadletter.CAP)

    def queue(self) -> str:
        """The queue of the module worker's class (its only one)."""
        [class_id] = self.client.zrange(APP_KEYS.classlive, 0, -1)
        return APP_KEYS.class_queue(class_id.decode())

    def wake_beat(self) -> None:
        self.client.publish(keys.BEAT_WAKE, APP_ID)

    def assert_serving(self) -> None:
        """Same PIDs alive, and a normal request submitted now completes."""
        assert self.worker.alive(), self.worker.log()[-3000:]
        assert self.beat.alive(), self.beat.log()[-3000:]
        assert (self.worker.pid, self.beat.pid) == self.pids
        self.served += 1
        scope = f"probe{self.served}"
        self.app.scheduler_for(scope).submit(
            bg.ProcessingTaskRequest(PREFIX + "process", payload={"complete": True})
        )
        wait_for(
            lambda: any(e["scope"] == scope for e in events(self.client, "end")),
            20,
            f"a normal request ({scope}) to complete after the foreign data",
        )


@pytest.fixture(scope="module")
def live(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A worker and a beat on the emptied session Redis, for the whole module."""
    client = redis_server.client()
    client.flushall()
    client.close()
    cluster = Cluster(redis_server.url, tmp_path_factory.mktemp("foreign"))
    try:
        made = Live(cluster, redis_server.url)
        made.app.scheduler_for(BYSTANDER_SCOPE).submit(
            bg.ProcessingTaskRequest(BYSTANDER, earliest_begin_date=LATER, payload={"x": 1})
        )
        made.assert_serving()
        yield made
    finally:
        cluster.kill_all()
        cluster.stop_all()


def bystander(client: redis.Redis) -> tuple[Any, Any]:
    """The bystander request's record and scheduled date: neither may change."""
    record = client.hget(APP_KEYS.requests(BYSTANDER_SCOPE), BYSTANDER)
    return record, client.zscore(APP_KEYS.sched(0, BYSTANDER_SCOPE), BYSTANDER)


def schedule(client: redis.Redis, scope: str, identifier: str, profile: int = 0) -> None:
    """Put an identifier on a scope's schedule, due now, as submit.lua would."""
    client.zadd(APP_KEYS.sched(profile, scope), {identifier: 0})
    client.zadd(APP_KEYS.due(profile), {scope: 0})


@pytest.fixture
def untouched(live: Live) -> Iterator[Live]:
    """Checks after the test that the bystander did not change and the cluster serves."""
    before = bystander(live.client)
    assert before[0] is not None
    yield live
    live.assert_serving()
    assert bystander(live.client) == before


def dead_lettered(live: Live, why: str, timeout: float = 10) -> deadletter.DeadLetter:
    """Wait for a dead-letter entry whose reason contains `why`; return it."""

    def found() -> deadletter.DeadLetter | None:
        return next((entry for entry in live.dead_letters() if why in entry.reason), None)

    return wait_for(found, timeout, f"a dead letter saying {why!r}")


# --- records and members placed on bgqueue's keys ------------------------------------------


def _mutated_record(draw: st.DrawFn) -> bytes:
    """A record that is not a request record: not JSON, not an object, or one field missing
    or of the wrong type."""
    choice = draw(st.integers(0, 2))
    if choice == 0:
        text = draw(st.binary(min_size=1, max_size=50))
        try:
            json.loads(text)
        except ValueError:
            return text
        return b"{" + text
    if choice == 1:
        value = draw(
            st.one_of(st.none(), st.integers(), st.text(max_size=10), st.lists(st.integers()))
        )
        return json.dumps(value).encode()
    record = dict(VALID_RECORD)
    field = draw(st.sampled_from(sorted(record)))
    # `a` and `pl` may be left out (they default to 0 and null), the others may not.
    if field in REQUIRED and draw(st.booleans()):
        del record[field]
    else:
        wrong = [st.none(), st.lists(st.integers(), max_size=2)]
        wrong += [st.integers()] if field in ("s", "pl") else [st.just("xxx")]
        record[field] = draw(st.one_of(*wrong))
    return json.dumps(record).encode()


mutated_record = st.composite(_mutated_record)


@EXAMPLES
@given(raw=mutated_record())
def test_malformed_request_record_is_dead_lettered(untouched: Live, raw: bytes) -> None:
    """A due request whose record is not a request record is moved to the dead letter by
    beat's claim, not claimed, not retried forever."""
    live = untouched
    identifier = f"{PREFIX}foreign.{uuid.uuid4().hex[:8]}"
    live.client.delete(APP_KEYS.deadletter)
    live.client.hset(APP_KEYS.requests("default"), identifier, raw)
    schedule(live.client, "default", identifier)
    live.wake_beat()
    entry = dead_lettered(live, "request record")
    assert entry.source == f"{APP_KEYS.sched(0, 'default')} {identifier}"
    assert entry.raw == raw.decode(errors="replace")
    assert entry.at is not None
    assert live.client.hget(APP_KEYS.requests("default"), identifier) is None
    assert live.client.zscore(APP_KEYS.sched(0, "default"), identifier) is None


@pytest.mark.parametrize(
    ("scope", "identifier"),
    [("default", PREFIX + "nothing.here"), ("default", "#refresh"), (BYSTANDER_SCOPE, "\x00\xff")],
)
def test_bogus_schedule_entry_is_dead_lettered(
    untouched: Live, scope: str, identifier: str
) -> None:
    """A schedule entry that names no pending request is dropped into the dead letter; the
    scope's bookkeeping fields ('#refresh') are not touched."""
    live = untouched
    counts = live.client.hmget(APP_KEYS.requests(scope), "#refresh", "#processing")
    live.client.delete(APP_KEYS.deadletter)
    schedule(live.client, scope, identifier, 3)  # profile 3: the worker serves it
    live.wake_beat()
    entry = dead_lettered(live, "names no request record")
    assert entry.raw == identifier.encode().decode(errors="replace")
    assert live.client.zcard(APP_KEYS.sched(3, scope)) == 0
    assert live.client.zcard(APP_KEYS.due(3)) == 0
    assert live.client.hmget(APP_KEYS.requests(scope), "#refresh", "#processing") == counts


def test_index_entry_of_a_scope_with_nothing_scheduled_is_dropped(untouched: Live) -> None:
    """An index entry naming a scope with nothing on its schedule is dropped by the claim
    that looks there (it would otherwise be read again on every pass)."""
    live = untouched
    live.client.zadd(APP_KEYS.due(3), {"nobody-here": 0})
    live.wake_beat()
    wait_for(lambda: live.client.zcard(APP_KEYS.due(3)) == 0, 10, "the stray index entry to go")


def test_schedule_entry_of_a_dispatched_request_is_dead_lettered(untouched: Live) -> None:
    """A schedule entry whose request is not pending (here: a record that says it was
    dispatched) is dead-lettered and the record left alone."""
    live = untouched
    identifier = PREFIX + "dispatched.already"
    record = json.dumps({**VALID_RECORD, "s": "dispatched", "g": 10**9})
    live.client.hset(APP_KEYS.requests("other"), identifier, record)
    live.client.delete(APP_KEYS.deadletter)
    schedule(live.client, "other", identifier)
    live.wake_beat()
    dead_lettered(live, "not pending")
    assert live.client.hget(APP_KEYS.requests("other"), identifier) == record.encode()
    live.client.delete(APP_KEYS.requests("other"))


def test_wrong_type_due_set_is_moved_aside(untouched: Live) -> None:
    """A due set that is a string stops no dispatch: beat moves it into the dead letter
    (with its content) and every other profile keeps being served."""
    live = untouched
    live.client.delete(APP_KEYS.deadletter)
    live.client.set(APP_KEYS.due(5), "not a sorted set")
    live.wake_beat()
    entry = dead_lettered(live, "wrong type")
    assert entry.source == APP_KEYS.due(5)
    assert entry.raw == "not a sorted set"
    assert live.client.type(APP_KEYS.due(5)) == b"none"


def test_an_index_moved_aside_is_rebuilt_from_the_schedules(untouched: Live) -> None:
    """The profile-0 index is foreign data: beat moves it aside and rebuilds it from the
    scopes' schedules, so the requests it indexed are neither lost nor stranded."""
    live = untouched
    live.client.delete(APP_KEYS.deadletter)
    live.client.delete(APP_KEYS.due(0))
    live.client.set(APP_KEYS.due(0), "not a sorted set")
    live.wake_beat()
    dead_lettered(live, "wrong type")
    wait_for(
        lambda: live.client.zscore(APP_KEYS.due(0), BYSTANDER_SCOPE) is not None,
        10,
        "the index to name the bystander's scope again",
    )


def test_wrong_type_request_hash_is_moved_aside(untouched: Live) -> None:
    """A scope's request hash that is a list: the key itself and the schedule entry naming
    it go to the dead letter."""
    live = untouched
    scope = "listy"
    live.client.rpush(APP_KEYS.requests(scope), "one", "two")
    live.client.delete(APP_KEYS.deadletter)
    schedule(live.client, scope, PREFIX + "a")
    live.wake_beat()
    entry = dead_lettered(live, "names no request record")
    assert entry.raw == PREFIX + "a"
    moved = dead_lettered(live, "a list where a hash belongs")
    assert json.loads(moved.raw) == ["one", "two"]
    assert live.client.type(APP_KEYS.requests(scope)) == b"none"


def test_garbage_in_the_workers_hash_is_dead_lettered(untouched: Live) -> None:
    """A heartbeat entry that is not bgqueue's JSON is moved to the dead letter by beat's
    sweep (and forgotten), instead of failing every sweep of the app."""
    live = untouched
    live.client.delete(APP_KEYS.deadletter)
    live.client.hset(APP_KEYS.workers, "ghost", b"\x00not json")
    live.client.zadd(APP_KEYS.alive, {"ghost": 2**50})
    entry = dead_lettered(live, "heartbeat is not bgqueue JSON")
    assert entry.source == f"{APP_KEYS.workers} ghost"
    assert live.client.hget(APP_KEYS.workers, "ghost") is None


# --- messages placed on the Celery queues the worker consumes ------------------------------


QUEUE = "@queue@"  # in a message built ahead, where the worker's class queue goes


def envelope(body: bytes, headers: dict[str, Any], content_type: str = "application/json") -> str:
    """A kombu Redis-transport message as a worker pops it off a queue's list."""
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": headers,
            "properties": {
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
                "delivery_info": {"exchange": "", "routing_key": QUEUE},
                "priority": 0,
                "delivery_mode": 2,
            },
        }
    )


def celery_headers(task: str) -> dict[str, Any]:
    task_id = str(uuid.uuid4())
    return {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0}


def task_body(args: Any = (), kwargs: Any = None) -> bytes:
    return json.dumps([list(args), kwargs or {}, {}]).encode()


RUN = PREFIX + "process"
GOOD = {"scope": "default", "gen": 1, "requires": []}

MESSAGES: list[tuple[str, str, str]] = [
    # (case, raw item LPUSHed onto the queue's list, expected words of the reason)
    ("body not JSON", envelope(b"\xff\xfe not json", celery_headers(RUN)), "invalid task message"),
    ("no task header", envelope(task_body(kwargs=GOOD), {"id": "x"}), "not a Celery task"),
    (
        "unknown task",
        envelope(task_body(kwargs=GOOD), celery_headers("foreign.task")),
        "unknown task",
    ),
    (
        "foreign app's identifier",
        envelope(task_body(kwargs=GOOD), celery_headers("com.other.app.refresh")),
        "no request it names",
    ),
    ("positional args", envelope(task_body(args=[1, 2]), celery_headers(RUN)), "positional"),
    (
        "missing kwargs",
        envelope(task_body(kwargs={"scope": "default"}), celery_headers(RUN)),
        "missing",
    ),
    (
        "extra kwargs",
        envelope(task_body(kwargs={**GOOD, "app": "com.other"}), celery_headers(RUN)),
        "unexpected",
    ),
    (
        "wrong-type kwargs",
        envelope(task_body(kwargs={**GOOD, "gen": "7"}), celery_headers(RUN)),
        "wrong type",
    ),
    (
        "unknown requirement",
        envelope(task_body(kwargs={**GOOD, "requires": ["warp_drive"]}), celery_headers(RUN)),
        "wrong type",
    ),
    ("body not a task body", envelope(b'{"a": 1}', celery_headers(RUN)), "invalid task message"),
    (
        "body of wrong-typed parts",
        envelope(b'[1, "two", 3]', celery_headers(RUN)),
        "invalid task message",
    ),
    (
        "continuous task, wrong shape",
        envelope(task_body(kwargs={"ability": 5}), celery_headers("bgqueue.continuous")),
        "bgqueue.continuous",
    ),
    (
        "work task, wrong shape",
        envelope(task_body(kwargs={"work_id": -1, "gen": 1}), celery_headers("bgqueue.work")),
        "bgqueue.work",
    ),
]


@pytest.mark.parametrize(("case", "raw", "why"), MESSAGES, ids=[m[0] for m in MESSAGES])
def test_foreign_message_on_a_queue_is_dead_lettered(
    untouched: Live, case: str, raw: str, why: str
) -> None:
    """A message on a profile queue that beat did not send is dead-lettered with the raw
    message and the reason; no request changes."""
    live = untouched
    live.client.delete(APP_KEYS.deadletter)
    live.client.lpush(live.queue(), raw.replace(QUEUE, live.queue()))
    entry = dead_lettered(live, why)
    assert entry.source == f"queue {live.queue()}"
    assert entry.raw


def test_raw_garbage_on_a_queue_list(untouched: Live) -> None:
    """Something that is not even a kombu message (not JSON) on a queue's list: the worker
    stays up and keeps serving."""
    live = untouched
    live.client.lpush(live.queue(), b"\x00garbage, not a message")
    wait_for(lambda: live.client.llen(live.queue()) == 0, 10, "the worker to take it off the queue")


def test_stale_generation_changes_nothing(untouched: Live) -> None:
    """A well-formed message whose generation is not the record's (a duplicate or a stale
    copy) is skipped: the bystander's record is untouched (checked by `untouched`)."""
    live = untouched
    kwargs = {"scope": BYSTANDER_SCOPE, "gen": 10**6, "requires": []}
    live.celery.send_task(BYSTANDER, kwargs=kwargs, queue=live.queue())
    wait_for(lambda: live.client.llen(live.queue()) == 0, 10, "the worker to take the message")
    record, _ = bystander(live.client)
    assert json.loads(record)["s"] == "pending"


def test_dead_letter_is_capped_and_shown_in_status(untouched: Live) -> None:
    """Writes cap the list at CAP entries in the same step; `bgqueue status` shows the count
    and the newest entry's reason, never the raw data."""
    live = untouched
    secret = "s3cr3t-" + uuid.uuid4().hex
    for i in range(deadletter.CAP + 5):
        deadletter.push(live.client, APP_KEYS, "test", f"filler {i}", secret)
    assert deadletter.count(live.client, APP_KEYS) == deadletter.CAP
    assert live.dead_letters()[0].reason == f"filler {deadletter.CAP + 4}"
    text = report(live.client)
    assert f"dead letters: {deadletter.CAP}" in text
    assert secret not in text
    assert secret not in Path(live.worker.log_path).read_text(errors="replace")
    live.client.delete(APP_KEYS.deadletter)
