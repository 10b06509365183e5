"""The asyncio twins of the producer API (`asubmit`, `acancel`, ...), under real event loops
against the real test Redis: concurrency, equivalence with the sync calls, refusals that
write nothing, a lost broker, a flushed script cache, TLS, and the one-client-per-loop rule.
"""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis

import bgqueue as bg
from bgqueue.broker import ASYNC_MAX_CONNECTIONS
from bgqueue.broker.embedded import HOST, RedisServer, free_port
from bgqueue.model import keys
from bgqueue.model.requests import PROFILE_COUNT
from bgqueue.model.scripts import sha
from bgqueue.scheduler import Scheduler
from tests.test_broker import tls_proxy  # noqa: F401  (fixture: TLS in front of the test Redis)

APP = "com.example.aio"
JOB = f"{APP}.job."
REFRESH = f"{APP}.refresh."
LATER = datetime(2031, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
# Every producer call with an async twin, with arguments that are accepted.
TWINS: list[tuple[str, list[Any]]] = [
    ("submit", [bg.ProcessingTaskRequest(f"{JOB}x")]),
    ("submit_many", [[bg.ProcessingTaskRequest(f"{JOB}y")]]),
    ("cancel", [f"{JOB}x"]),
    ("cancel_all", []),
    ("pending_task_requests", []),
    ("history", [5]),
]


def job(name: object, **fields: Any) -> bg.ProcessingTaskRequest:
    return bg.ProcessingTaskRequest(f"{JOB}{name}", **fields)


def snapshot(client: redis.Redis) -> dict[bytes, Any]:
    """Every key with its type, contents and expiry, to prove a call wrote nothing."""
    read = {
        b"string": client.get,
        b"hash": client.hgetall,
        b"list": lambda k: client.lrange(k, 0, -1),
        b"set": client.smembers,
        b"zset": lambda k: client.zrange(k, 0, -1, withscores=True),
    }
    return {k: (t := client.type(k), read[t](k), client.pttl(k)) for k in client.keys("*")}


def run(app: bg.BackgroundApp, work: Callable[[], Awaitable[Any]]) -> Any:
    """Run `work` on a fresh event loop and close the app's client of that loop after it,
    as an asyncio service does at shutdown."""

    async def main() -> Any:
        try:
            return await work()
        finally:
            await app.aclose()

    return asyncio.run(main())


@pytest.fixture
def app(redis_url: str) -> Iterator[bg.BackgroundApp]:
    """A producer-only app on the test Redis, permitting the JOB and REFRESH prefixes."""
    made = bg.BackgroundApp(
        APP, permitted_identifiers=[f"{JOB}*", f"{REFRESH}*"], broker_url=redis_url
    )
    yield made
    made.client.close()


# --- 1,000 concurrent submits ------------------------------------------------------------

SCOPES = 40


def scope_plan(scope: int) -> list[tuple[object, type[bg.BackgroundTaskError] | None]]:
    """25 submits for one scope, with the error each must get (None: the limits decide).

    16 distinct processing identifiers (10 fit), 3 replacements of some of them (one moving
    to another requirement profile), 2 distinct refreshes (1 fits) and 4 bad inputs.
    """
    plan: list[tuple[object, type[bg.BackgroundTaskError] | None]] = [
        (job(i, requires_network_connectivity=i % 2 == 1, payload=[scope, i, 0]), None)
        for i in range(16)
    ]
    plan += [
        (job(i, requires_network_connectivity=True, payload=[scope, i, 1]), None) for i in (1, 3)
    ]
    plan.append((job(2, requires_external_power=True, payload=[scope, 2, 1]), None))
    plan += [(bg.AppRefreshTaskRequest(f"{REFRESH}{name}"), None) for name in "ab"]
    bad_payload, naive_date = job("bad-payload"), job("naive-date")
    bad_payload.payload = {"not": {"json"}}  # requests are mutable: checked again at submit
    naive_date.earliest_begin_date = datetime(2031, 1, 1)
    plan += [
        (bg.ProcessingTaskRequest("com.example.other.job"), bg.NotPermitted),
        (bad_payload, bg.ParameterError),
        (naive_date, bg.ParameterError),
        ("not a request", bg.ParameterError),
    ]
    return plan


def test_a_thousand_concurrent_submits_write_exactly_the_accepted_ones(
    app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """1,000 `asubmit`s at once over 40 scopes: each is accepted or refused with a typed
    error, and Redis then holds exactly the accepted ones, each once."""
    attempts = [
        (scope, request, error) for scope in range(SCOPES) for request, error in scope_plan(scope)
    ]
    random.Random(11).shuffle(attempts)
    assert len(attempts) == 1000
    connections: list[int] = []

    async def submit(scope: int, request: Any) -> bg.BackgroundTaskError | None:
        try:
            await app.scheduler_for(f"s{scope}").asubmit(request)
        except bg.BackgroundTaskError as exc:
            return exc
        return None

    async def all_at_once() -> list[bg.BackgroundTaskError | None]:
        outcomes = await asyncio.gather(*(submit(scope, request) for scope, request, _ in attempts))
        connections.append(len(redis_client.client_list()))
        return outcomes

    outcomes = run(app, all_at_once)
    accepted: dict[int, dict[str, list[bg.BGTaskRequest]]] = defaultdict(lambda: defaultdict(list))
    refused: Counter[tuple[int, str]] = Counter()
    for (scope, request, error), outcome in zip(attempts, outcomes, strict=True):
        if error is not None:
            assert type(outcome) is error, (request, outcome)
        elif outcome is None:
            accepted[scope][request.identifier].append(request)
        else:
            assert isinstance(outcome, bg.TooManyPendingTaskRequests), (request, outcome)
            refused[scope, request.kind] += 1
    # The pool bounds the sockets however many tasks wait (plus the test's own clients).
    assert connections[0] <= ASYNC_MAX_CONNECTIONS + 3
    for scope in range(SCOPES):
        kinds = Counter(requests[0].kind for requests in accepted[scope].values())
        assert kinds == {"processing": 10, "refresh": 1}, scope  # exactly the limits
        assert refused[scope, "refresh"] == 1
    assert_redis_holds(app, redis_client, accepted)


def assert_redis_holds(
    app: bg.BackgroundApp,
    client: redis.Redis,
    accepted: dict[int, dict[str, list[bg.BGTaskRequest]]],
) -> None:
    """Each scope's records, its counts, the due sets and the app's counts hold the accepted
    requests (one of the submits of each identifier), each once, and nothing refused."""
    due: dict[str, int] = {}
    for scope in accepted:
        for profile in range(PROFILE_COUNT):
            sched = app.keys.sched(profile, f"s{scope}")
            for member in client.zrange(sched, 0, -1):
                key = keys.member(f"s{scope}", member.decode())
                assert key not in due, "a request is due twice"
                due[key] = profile
            # The profile's index names the scope at its earliest scheduled date.
            first = client.zrange(sched, 0, 0, withscores=True)
            index = client.zscore(app.keys.due(profile), f"s{scope}")
            assert index == (first[0][1] if first else None)
    expected_due: dict[str, int] = {}
    counts: Counter[str] = Counter()
    for scope, ours in accepted.items():
        pending = {r.identifier: r for r in app.scheduler_for(f"s{scope}").pending_task_requests()}
        assert set(pending) == set(ours)  # no refused one written
        for identifier, copy in pending.items():
            assert copy in ours[identifier]  # the record of one accepted submit, whole
            expected_due[keys.member(f"s{scope}", identifier)] = copy.profile
            counts[f"{copy.kind}:{copy.profile}"] += 1
        stored = client.hgetall(app.keys.requests(f"s{scope}"))
        tally = Counter(
            "refresh" if r.kind == "refresh" else "processing" for r in pending.values()
        )
        assert stored[b"#processing"] == b"%d" % tally["processing"]
        assert stored[b"#refresh"] == b"%d" % tally["refresh"]
    assert due == expected_due  # each accepted request due once, in its own profile's set
    written = {k.decode(): int(v) for k, v in client.hgetall(app.keys.counts).items()}
    assert written == counts
    assert not client.exists(app.keys.deadletter)


# --- the twins agree -------------------------------------------------------------------


def test_the_twins_return_what_the_sync_calls_return(app: bg.BackgroundApp) -> None:
    """The same calls, sync in one scope and async in another, leave the same requests and
    history and return the same values; each side reads what the other wrote."""
    mine, theirs = app.scheduler_for("sync"), app.scheduler_for("async")
    batch = [
        job("a", payload={"n": 1}),
        job("b", earliest_begin_date=LATER, requires_network_connectivity=True),
        bg.AppRefreshTaskRequest(f"{REFRESH}r"),
    ]
    replacement = job("a", payload={"n": 2})

    def sync_side() -> list[Any]:
        mine.submit_many(batch)
        mine.submit(replacement)
        pending = mine.pending_task_requests()
        cancelled = [mine.cancel(f"{JOB}a"), mine.cancel(f"{JOB}missing")]
        return [pending, cancelled, mine.cancel_all(), mine.cancel_all(), mine.history(limit=10)]

    async def async_side() -> list[Any]:
        await theirs.asubmit_many(batch)
        await theirs.asubmit(replacement)
        pending = await theirs.apending_task_requests()
        cancelled = [await theirs.acancel(f"{JOB}a"), await theirs.acancel(f"{JOB}missing")]
        return [
            pending,
            cancelled,
            await theirs.acancel_all(),
            await theirs.acancel_all(),
            await theirs.ahistory(limit=10),
        ]

    expected = sync_side()
    got = run(app, async_side)
    assert [r.identifier for r in expected[0]] == [f"{JOB}a", f"{REFRESH}r", f"{JOB}b"]
    assert expected[0][0].payload == {"n": 2}
    assert got[:4] == expected[:4] == [expected[0], [True, False], 2, 0]

    def same(record: bg.TaskRecord) -> tuple[Any, ...]:
        return (record.identifier, record.kind, record.state, record.success, record.reason)

    assert [same(r) for r in got[4]] == [same(r) for r in expected[4]]
    assert [r.scope for r in got[4]] == ["async"] * 3 and len(expected[4]) == 3
    assert [same(r) for r in run(app, lambda: theirs.ahistory(limit=1))] == [same(expected[4][0])]
    # Each side reads the other's writes.
    assert run(app, mine.ahistory) == mine.history()
    theirs.submit(job("c"))
    assert run(app, theirs.apending_task_requests) == theirs.pending_task_requests() == [job("c")]


def test_async_submit_wakes_beat_and_announces_the_app(
    app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """As the sync submit does: one wake-up on beat's channel, the app in the known apps."""
    with redis_client.pubsub() as wake:
        wake.subscribe(keys.BEAT_WAKE)
        assert wake.get_message(timeout=1)["type"] == "subscribe"
        run(app, lambda: app.scheduler.asubmit(job("woken")))
        message = wake.get_message(timeout=2)
    assert message is not None and message["data"] == APP.encode()
    assert redis_client.sismember(keys.APPS, APP)


# --- refusals: the same typed error, nothing written ---------------------------------------


def bad_payload() -> bg.ProcessingTaskRequest:
    request = job("bad")
    request.payload = (1, 2)  # a tuple would come back as a list: not plain JSON
    return request


TOO_MANY = bg.TooManyPendingTaskRequests
OTHER = "com.example.other"
REFUSALS: list[tuple[str, str, Callable[[], list[Any]], type[bg.BackgroundTaskError]]] = [
    ("not a request", "submit", lambda: ["x"], bg.ParameterError),
    ("not permitted", "submit", lambda: [bg.ProcessingTaskRequest(OTHER)], bg.NotPermitted),
    ("bad payload", "submit", lambda: [bad_payload()], bg.ParameterError),
    ("second refresh", "submit", lambda: [bg.AppRefreshTaskRequest(f"{REFRESH}2")], TOO_MANY),
    (
        "batch, one not permitted",
        "submit_many",
        lambda: [[job("ok"), bg.ProcessingTaskRequest(OTHER)]],
        bg.NotPermitted,
    ),
    ("batch over the limit", "submit_many", lambda: [[job(i) for i in range(10)]], TOO_MANY),
    (
        "must start now, no worker",
        "submit",
        lambda: [bg.ContinuedProcessingTaskRequest(f"{JOB}now", title="Export")],
        bg.ImmediateRunIneligible,
    ),
    ("cancel, bad identifier", "cancel", lambda: ["a\x1fb"], bg.ParameterError),
    ("cancel, not a string", "cancel", lambda: [5], bg.ParameterError),
    ("history, zero", "history", lambda: [0], bg.ParameterError),
    ("history, a bool", "history", lambda: [True], bg.ParameterError),
]


@pytest.mark.parametrize(
    ("method", "arguments", "error"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
def test_refusals_are_the_sync_ones_and_write_nothing(
    app: bg.BackgroundApp,
    redis_client: redis.Redis,
    method: str,
    arguments: Callable[[], list[Any]],
    error: type[bg.BackgroundTaskError],
) -> None:
    app.scheduler.submit_many([bg.AppRefreshTaskRequest(f"{REFRESH}1"), job("existing")])
    before = snapshot(redis_client)
    with pytest.raises(error) as sync_error:
        getattr(app.scheduler, method)(*arguments())
    assert snapshot(redis_client) == before
    with pytest.raises(error) as async_error:
        run(app, lambda: getattr(app.scheduler, f"a{method}")(*arguments()))
    assert str(async_error.value) == str(sync_error.value)
    assert snapshot(redis_client) == before


def test_foreign_data_is_unavailable_on_both_paths(
    app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A key of the wrong type: the script's refusal and Redis's WRONGTYPE are Unavailable."""
    app.scheduler.submit(job("existing"))
    redis_client.set(app.keys.due(0), "not a sorted set")
    redis_client.set(app.keys.history("other"), "not a list")
    before = snapshot(redis_client)
    calls = [
        (app.scheduler, "submit", [job("existing")]),  # replacing it would write due:0
        (app.scheduler, "cancel_all", []),
        (app.scheduler_for("other"), "history", []),  # WRONGTYPE from Redis itself
    ]
    for scheduler, method, arguments in calls:
        with pytest.raises(bg.Unavailable) as sync_error:
            getattr(scheduler, method)(*arguments)
        with pytest.raises(bg.Unavailable) as async_error:
            run(app, partial(getattr(scheduler, f"a{method}"), *arguments))
        assert str(async_error.value) == str(sync_error.value)
        assert snapshot(redis_client) == before


# --- the broker: lost, restarted, script cache flushed, TLS, from the environment ----------


def assert_service_error(error: BaseException, url: str, password: str) -> None:
    assert isinstance(error, bg.ServiceError) and error.code == 9800004
    assert url.replace(f":{password}@", ":***@") in str(error)
    chain = [error, error.__cause__, error.__context__]
    assert not [e for e in chain if e is not None and password in str(e)]


def test_unreachable_broker_is_a_service_error_without_the_password() -> None:
    url = f"redis://:secret-pw-1@{HOST}:{free_port()}/0"
    app = bg.BackgroundApp(APP, permitted_identifiers=[f"{JOB}*"], broker_url=url)
    errors: list[BaseException] = []

    async def every_twin() -> None:
        for method, arguments in TWINS:
            try:
                await getattr(app.scheduler, f"a{method}")(*arguments)
            except bg.BackgroundTaskError as exc:
                errors.append(exc)

    started = time.monotonic()
    run(app, every_twin)
    assert time.monotonic() - started < 5  # connect timeout, no retries
    assert len(errors) == len(TWINS)
    for error in errors:
        assert_service_error(error, url, "secret-pw-1")


def test_a_malformed_url_is_a_parameter_error_without_the_password() -> None:
    app = bg.BackgroundApp(APP, broker_url="http://:hunter2@127.0.0.1:6379/0")
    with pytest.raises(bg.ParameterError) as caught:
        run(app, app.scheduler.apending_task_requests)
    assert "hunter2" not in str(caught.value)


def test_lost_and_restarted_broker(make_redis_server: Callable[..., RedisServer]) -> None:
    """Wrong password and a stopped server are ServiceError; once Redis is back, the same
    loop's client serves again."""
    server = make_redis_server(password="secret-pw-2")
    wrong = server.url.replace("secret-pw-2", "wrong-pw-3")
    app = bg.BackgroundApp(APP, permitted_identifiers=[f"{JOB}*"], broker_url=wrong)
    with pytest.raises(bg.ServiceError) as caught:
        run(app, lambda: app.scheduler.asubmit(job(1)))
    assert_service_error(caught.value, wrong, "wrong-pw-3")
    app = bg.BackgroundApp(APP, permitted_identifiers=[f"{JOB}*"], broker_url=server.url)

    async def across_a_restart() -> list[str]:
        await app.scheduler.asubmit(job(1))
        server.stop()
        with pytest.raises(bg.ServiceError) as caught:
            await app.scheduler.asubmit(job(2))
        assert_service_error(caught.value, server.url, "secret-pw-2")
        server.start()
        await app.scheduler.asubmit(job(3))
        return [r.identifier for r in await app.scheduler.apending_task_requests()]

    assert run(app, across_a_restart) == [f"{JOB}1", f"{JOB}3"]


def test_a_flushed_script_cache_is_reloaded(
    app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """NOSCRIPT (Redis restarted or SCRIPT FLUSH): the script is loaded again and the call
    goes through, once."""

    async def across_flushes() -> list[bg.BGTaskRequest]:
        await app.scheduler.asubmit(job("a"))
        redis_client.script_flush()
        await app.scheduler.asubmit(job("b"))
        assert redis_client.script_exists(sha("submit")) == [True]
        redis_client.script_flush()
        assert await app.scheduler.acancel(f"{JOB}a")
        assert redis_client.script_exists(sha("cancel")) == [True]
        return list(await app.scheduler.apending_task_requests())

    assert run(app, across_flushes) == [job("b")]
    assert [r.identifier for r in app.scheduler.history()] == [f"{JOB}a"]  # cancelled once


async def submit_over_tls(app: bg.BackgroundApp, request: bg.BGTaskRequest) -> list[Any]:
    client = await app.aclient()
    assert issubclass(client.connection_pool.connection_class, redis.asyncio.SSLConnection)
    await app.scheduler.asubmit(request)
    pending = await app.scheduler.apending_task_requests()
    assert await app.scheduler.acancel_all() == 1
    return list(pending)


def test_rediss_url(tls_proxy: tuple[int, Path], redis_url: str) -> None:  # noqa: F811
    """rediss:// works as for the sync client: verified against a CA, or with verification
    off; the default verification refuses the proxy's self-signed certificate."""
    port, cert = tls_proxy
    for query in ("ssl_cert_reqs=none", f"ssl_cert_reqs=required&ssl_ca_certs={cert}"):
        url = f"rediss://{HOST}:{port}/0?{query}"
        app = bg.BackgroundApp(APP, permitted_identifiers=[f"{JOB}*"], broker_url=url)
        assert run(app, partial(submit_over_tls, app, job(query))) == [job(query)]
    app = bg.BackgroundApp(
        APP, permitted_identifiers=[f"{JOB}*"], broker_url=f"rediss://{HOST}:{port}/0"
    )
    with pytest.raises(bg.ServiceError) as caught:
        run(app, lambda: app.scheduler.asubmit(job("unverified")))
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value.__cause__)


def test_broker_from_the_environment(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BGQUEUE_BROKER_URL", redis_url)
    app = bg.BackgroundApp(APP, permitted_identifiers=[f"{JOB}*"])
    run(app, lambda: app.scheduler.asubmit(job("env")))
    assert redis_client.hexists(app.keys.requests("default"), f"{JOB}env")


# --- one client per event loop -------------------------------------------------------------


def test_each_loop_gets_its_own_client_and_closes_it_cleanly(app: bg.BackgroundApp) -> None:
    """One client per running loop: reused within it, never by a later loop (its own has
    closed) or a loop in another thread; aclose leaves no unclosed connection behind."""
    clients: list[Any] = []
    barrier = threading.Barrier(2)

    async def use(name: str, together: bool = False) -> None:
        client = await app.aclient()
        assert await app.aclient() is client
        if together:  # both threads' loops hold a client at once
            await asyncio.to_thread(barrier.wait, 5)
        await app.scheduler_for(name).asubmit(job(name))
        clients.append(client)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(app, lambda: use("first"))
        run(app, lambda: use("second"))
        threads = [threading.Thread(target=run, args=(app, lambda n=n: use(n, True))) for n in "xy"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len({id(client) for client in clients}) == len(clients) == 4
        clients.clear()  # the clients go now: one left open would warn
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []
    for name in ("first", "second", "x", "y"):
        assert app.scheduler_for(name).pending_task_requests() == [job(name)]
    with pytest.raises(bg.ParameterError, match="before the app connects"):
        app.use_broker("redis://elsewhere")


def test_a_client_whose_loop_closed_is_not_reused(app: bg.BackgroundApp) -> None:
    """A loop that ended without aclose: the next loop gets a new client, and the old one
    is let go unclosed (the garbage collector closes its sockets, with a ResourceWarning)."""
    clients: list[Any] = []

    async def use() -> None:
        clients.append(await app.aclient())
        await app.scheduler.asubmit(job(len(clients)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the documented cost of no aclose
        asyncio.run(use())
        run(app, use)
        assert clients[0] is not clients[1]
        assert app._aclients == {}  # the ended loop's entry was dropped, the other closed
        clients.clear()
        gc.collect()
    pending = app.scheduler.pending_task_requests()
    assert [r.identifier for r in pending] == [job(1).identifier, job(2).identifier]


def test_the_twins_exist_for_every_producer_call() -> None:
    """Django's convention: `a` + the sync name, a documented coroutine function."""
    for method, _ in TWINS:
        twin = getattr(Scheduler, f"a{method}")
        assert asyncio.iscoroutinefunction(twin) and twin.__doc__
