"""The producer API of one scope: submit, replace, copies, limits, permissions, bad
arguments, cancel before and after dispatch, scopes, history and simulated launches.

Everything runs against the real test Redis. Most tests need no worker; the few that
must see a request run start one worker (and beat) through the `cluster` fixture.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
import redis

import bgqueue as bg
from bgqueue.errors import APPLE_DOMAIN, HARMONY_DOMAIN
from bgqueue.model import keys
from bgqueue.model.requests import to_ms
from tests.harness import APP_ID, Cluster, events, wait_for

APP = "com.example.sched"
REFRESH = f"{APP}.refresh"
JOB = f"{APP}.job."  # permitted as a prefix: JOB + anything
LATER = datetime(2031, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)  # millisecond precision
EARLIER = datetime(2021, 5, 6, 7, 8, 9, 456000, tzinfo=UTC)  # continued processing: never future

SAMPLE = "com.bgqueue.test."  # identifiers the sample app's workers can run


def job(n: int | str) -> str:
    return f"{JOB}{n}"


def snapshot(client: redis.Redis) -> dict[bytes, Any]:
    """Every key in Redis with its type, contents and expiry, to prove a call wrote nothing.

    Contents, not DUMP: a hashtable-encoded hash dumps its fields in an order that a mere
    read can change (incremental rehashing), so equal hashes may dump differently.
    """
    read = {
        b"string": client.get,
        b"hash": client.hgetall,
        b"list": lambda k: client.lrange(k, 0, -1),
        b"set": client.smembers,
        b"zset": lambda k: client.zrange(k, 0, -1, withscores=True),
    }
    return {k: (t := client.type(k), read[t](k), client.pttl(k)) for k in client.keys("*")}


@pytest.fixture
def app(redis_url: str) -> Iterator[bg.BackgroundApp]:
    """A producer-only app on the test Redis: one exact and one prefix permission."""
    made = bg.BackgroundApp(APP, permitted_identifiers=[REFRESH, f"{JOB}*"], broker_url=redis_url)
    yield made
    made.client.close()


@pytest.fixture
def written(app: bg.BackgroundApp, redis_client: redis.Redis) -> dict[bytes, Any]:
    """A scope holding one pending request, and the snapshot of Redis taken after it."""
    app.scheduler.submit(bg.ProcessingTaskRequest(job("existing"), earliest_begin_date=LATER))
    return snapshot(redis_client)


def due_score(
    client: redis.Redis,
    app: bg.BackgroundApp,
    profile: int,
    identifier: str,
    scope: str = "default",
) -> float | None:
    return client.zscore(app.keys.sched(profile, scope), identifier)


def sample_record(client: redis.Redis, identifier: str) -> dict[str, Any] | None:
    raw = client.hget(f"bgqueue:{{{APP_ID}}}:req:default", identifier)
    return None if raw is None else json.loads(raw)


def finished(app: bg.BackgroundApp, identifier: str) -> list[bg.TaskRecord]:
    return [r for r in app.scheduler.history(limit=1000) if r.identifier == identifier]


# --- submit, copies, replace --------------------------------------------------------


def every_kind() -> list[bg.BGTaskRequest]:
    """One request of each kind with every field set away from its default."""
    return [
        bg.AppRefreshTaskRequest(
            REFRESH,
            earliest_begin_date=LATER,
            requires_network_connectivity=True,
            payload={"feed": "top", "n": [1, 2.5, None, True]},
        ),
        bg.ProcessingTaskRequest(
            job("cleanup"),
            earliest_begin_date=LATER + timedelta(milliseconds=1),
            requires_external_power=True,
            payload="just a string",
        ),
        bg.HealthResearchTaskRequest(
            job("study"),
            earliest_begin_date=LATER + timedelta(milliseconds=2),
            requires_network_connectivity=True,
            requires_external_power=True,
            payload={"cohort": 7},
            protection_type_of_required_data=bg.FileProtectionType.COMPLETE_UNLESS_OPEN,
        ),
        bg.ContinuedProcessingTaskRequest(
            job("export"),
            earliest_begin_date=EARLIER,
            payload=[1, "two"],
            title="Exporting",
            subtitle="3 of 9 albums",
            strategy=bg.ContinuedProcessingStrategy.QUEUE,
        ),
        bg.ProcessingTaskRequest(job("asap")),  # no date, no payload
    ]


def test_pending_returns_equal_copies_of_every_kind(app: bg.BackgroundApp) -> None:
    """Every field of every request kind survives the round trip through Redis."""
    sent = every_kind()
    app.scheduler.submit_many(sent)
    got = app.scheduler.pending_task_requests()
    # Earliest first: no date (due now), then the past-dated continued request, then the rest.
    expected = [sent[-1], sent[3], *sent[:3]]
    assert got == expected
    assert [type(r) for r in got] == [type(r) for r in expected]
    study = got[4]
    assert isinstance(study, bg.HealthResearchTaskRequest)
    assert study.protection_type_of_required_data is bg.FileProtectionType.COMPLETE_UNLESS_OPEN
    export = got[1]
    assert isinstance(export, bg.ContinuedProcessingTaskRequest)
    assert (export.title, export.subtitle) == ("Exporting", "3 of 9 albums")
    assert export.strategy is bg.ContinuedProcessingStrategy.QUEUE
    assert got[0].earliest_begin_date is None and got[0].payload is None
    assert got[2].earliest_begin_date == LATER and got[2].earliest_begin_date.tzinfo is not None


def test_returned_requests_are_copies(app: bg.BackgroundApp) -> None:
    """Mutating a returned request, or the submitted one, changes nothing stored."""
    original = bg.ProcessingTaskRequest(job(1), earliest_begin_date=LATER, payload={"k": [1]})
    app.scheduler.submit(original)
    original.payload["k"].append(2)
    original.requires_network_connectivity = True

    first = app.scheduler.pending_task_requests()[0]
    first.payload["k"].append(3)
    first.earliest_begin_date = None
    first.identifier = job(2)

    again = app.scheduler.pending_task_requests()
    stored = bg.ProcessingTaskRequest(job(1), earliest_begin_date=LATER, payload={"k": [1]})
    assert again == [stored]
    assert again[0] is not first


def test_earliest_begin_date_keeps_the_instant_and_never_moves_earlier(
    app: bg.BackgroundApp,
) -> None:
    """Another time zone keeps the instant; sub-millisecond dates round up, never down."""
    tokyo = LATER.astimezone(timezone(timedelta(hours=9)))
    fine = LATER + timedelta(microseconds=400)
    app.scheduler.submit(bg.ProcessingTaskRequest(job("tokyo"), earliest_begin_date=tokyo))
    app.scheduler.submit(bg.ProcessingTaskRequest(job("fine"), earliest_begin_date=fine))
    got = {r.identifier: r.earliest_begin_date for r in app.scheduler.pending_task_requests()}
    assert got[job("tokyo")] == LATER
    assert got[job("fine")] == LATER + timedelta(milliseconds=1)


def test_submit_same_identifier_replaces(app: bg.BackgroundApp, redis_client: redis.Redis) -> None:
    """A second submit of an identifier leaves one request, with the new values and due entry."""
    app.scheduler.submit(
        bg.ProcessingTaskRequest(job(1), earliest_begin_date=LATER, payload={"v": 1})
    )
    assert due_score(redis_client, app, 0, job(1)) is not None
    newer = bg.ProcessingTaskRequest(
        job(1),
        earliest_begin_date=LATER + timedelta(days=1),
        requires_network_connectivity=True,  # another requirement profile: another due set
        payload={"v": 2},
    )
    app.scheduler.submit(newer)

    assert app.scheduler.pending_task_requests() == [newer]
    assert due_score(redis_client, app, 0, job(1)) is None
    assert due_score(redis_client, app, 1, job(1)) == to_ms(LATER + timedelta(days=1))


def test_replace_with_another_kind_moves_the_count(app: bg.BackgroundApp) -> None:
    """Replacing a processing request by a refresh counts it as a refresh from then on."""
    app.scheduler.submit(bg.ProcessingTaskRequest(job("x")))
    app.scheduler.submit(bg.AppRefreshTaskRequest(job("x")))
    assert [type(r) for r in app.scheduler.pending_task_requests()] == [bg.AppRefreshTaskRequest]
    with pytest.raises(bg.TooManyPendingTaskRequests):
        app.scheduler.submit(bg.AppRefreshTaskRequest(REFRESH))
    app.scheduler.submit_many(bg.ProcessingTaskRequest(job(i)) for i in range(10))
    assert len(app.scheduler.pending_task_requests()) == 11


def test_batch_repeating_an_identifier_keeps_the_last(app: bg.BackgroundApp) -> None:
    """Within one submit_many a repeated identifier replaces the earlier entry of the batch."""
    last = bg.AppRefreshTaskRequest(REFRESH, payload={"v": 2})
    app.scheduler.submit_many([bg.AppRefreshTaskRequest(REFRESH, payload={"v": 1}), last])
    assert app.scheduler.pending_task_requests() == [last]


def test_replacing_into_another_profile_updates_both_profiles_and_the_counts(
    app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A submit is sent the keys of its own profiles only; replacing a request pending in
    another profile, it asks for that profile's keys and is sent them, then leaves that
    profile's schedule, due set and count as if the request had never been there."""
    k = app.keys
    app.scheduler.submit(bg.ProcessingTaskRequest(job(1), requires_network_connectivity=True))
    app.scheduler.submit(bg.ProcessingTaskRequest(job(2), earliest_begin_date=LATER))
    assert redis_client.zscore(k.due(1), "default") is not None
    app.scheduler.submit(bg.ProcessingTaskRequest(job(1), earliest_begin_date=EARLIER))
    assert redis_client.zcard(k.sched(1, "default")) == 0
    assert redis_client.zscore(k.due(1), "default") is None
    assert redis_client.zscore(k.due(0), "default") == to_ms(EARLIER)  # the earlier date now
    assert redis_client.hgetall(k.counts) == {b"processing:0": b"2"}
    assert redis_client.hget(k.requests("default"), "#processing") == b"2"


def test_a_submit_is_refused_only_over_keys_it_writes(
    app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """Foreign data in a key refuses the submits that would write it, and no other: a
    submit is sent, and checks, the keys of the places it touches. (Before, every submit
    was sent all 16 profiles' keys and the dispatch leases, and was refused over any.)"""
    app.scheduler.submit(bg.ProcessingTaskRequest(job(1)))
    redis_client.set(app.keys.leases, "foreign")
    redis_client.set(app.keys.due(3), "foreign")
    app.scheduler.submit(bg.ProcessingTaskRequest(job(1), payload={"v": 2}))  # a pending one
    app.scheduler.submit(bg.ProcessingTaskRequest(job(2), requires_network_connectivity=True))
    before = snapshot(redis_client)
    both = bg.ProcessingTaskRequest(
        job(3), requires_network_connectivity=True, requires_external_power=True
    )
    with pytest.raises(bg.Unavailable, match=r"due:3 holds a string"):
        app.scheduler.submit(both)
    assert snapshot(redis_client) == before
    assert len(app.scheduler.pending_task_requests()) == 2


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_a_producer_names_its_app_once_per_process(
    app: bg.BackgroundApp, redis_client: redis.Redis, twin: str
) -> None:
    """The first submit names the app in bgqueue:apps, in the script's round trip; every
    later one is the script alone, one EVALSHA (beat learns the app from the wake-up the
    script publishes, and a new leader finds apps with waiting requests). Before, every
    submit added a pipelined SADD."""
    redis_client.config_resetstat()
    for n in range(3):
        request = bg.ProcessingTaskRequest(job(n))
        if twin == "sync":
            app.scheduler.submit(request)
        else:
            asyncio.run(_asubmit(app, request))
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 3
    assert stats["cmdstat_sadd"]["calls"] == 1
    assert redis_client.smembers(keys.APPS) == {APP.encode()}


async def _asubmit(app: bg.BackgroundApp, request: bg.BGTaskRequest) -> None:
    try:
        await app.scheduler.asubmit(request)
    finally:
        await app.aclose()


# --- limits -------------------------------------------------------------------------


def test_second_refresh_is_refused_and_writes_nothing(
    app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A scope holds one pending refresh; the second raises code 2 and changes nothing."""
    app.scheduler.submit(bg.AppRefreshTaskRequest(REFRESH, payload={"v": 1}))
    before = snapshot(redis_client)
    with pytest.raises(bg.TooManyPendingTaskRequests) as caught:
        app.scheduler.submit(bg.AppRefreshTaskRequest(job("other-refresh")))
    assert (caught.value.code, caught.value.domain) == (2, APPLE_DOMAIN)
    assert isinstance(caught.value, bg.BackgroundTaskError)
    assert snapshot(redis_client) == before


def test_eleventh_processing_is_refused(app: bg.BackgroundApp, redis_client: redis.Redis) -> None:
    """Ten pending processing requests per scope (health research counts as processing)."""
    app.scheduler.submit_many(bg.ProcessingTaskRequest(job(i)) for i in range(9))
    app.scheduler.submit(bg.HealthResearchTaskRequest(job("study")))
    before = snapshot(redis_client)
    for extra in (bg.ProcessingTaskRequest(job(10)), bg.HealthResearchTaskRequest(job("s2"))):
        with pytest.raises(bg.TooManyPendingTaskRequests) as caught:
            app.scheduler.submit(extra)
        assert (caught.value.code, caught.value.domain) == (2, APPLE_DOMAIN)
    assert snapshot(redis_client) == before
    # Processing and refresh are counted apart.
    app.scheduler.submit(bg.AppRefreshTaskRequest(REFRESH))
    assert len(app.scheduler.pending_task_requests()) == 11


def test_replacing_at_the_limit_is_allowed(app: bg.BackgroundApp) -> None:
    """At the limit, resubmitting an identifier already pending replaces it."""
    app.scheduler.submit(bg.AppRefreshTaskRequest(REFRESH, payload={"v": 1}))
    app.scheduler.submit_many(bg.ProcessingTaskRequest(job(i)) for i in range(10))
    app.scheduler.submit(bg.AppRefreshTaskRequest(REFRESH, payload={"v": 2}))
    app.scheduler.submit(bg.ProcessingTaskRequest(job(3), payload={"v": 2}))
    app.scheduler.submit_many(bg.ProcessingTaskRequest(job(i), payload="new") for i in range(10))
    pending = {r.identifier: r.payload for r in app.scheduler.pending_task_requests()}
    assert len(pending) == 11
    assert pending[REFRESH] == {"v": 2}
    assert {pending[job(i)] for i in range(10)} == {"new"}


def test_limit_is_per_scope(app: bg.BackgroundApp) -> None:
    """A scope at its limit does not stop another scope from accepting requests."""
    app.scheduler.submit(bg.AppRefreshTaskRequest(REFRESH))
    app.scheduler.submit_many(bg.ProcessingTaskRequest(job(i)) for i in range(10))
    device = app.scheduler_for("device-1")
    device.submit(bg.AppRefreshTaskRequest(REFRESH))
    device.submit_many(bg.ProcessingTaskRequest(job(i)) for i in range(10))
    assert len(device.pending_task_requests()) == 11
    with pytest.raises(bg.TooManyPendingTaskRequests):
        device.submit(bg.ProcessingTaskRequest(job(10)))


def test_submit_many_over_the_limit_is_refused_whole(
    app: bg.BackgroundApp, redis_client: redis.Redis, written: dict[bytes, Any]
) -> None:
    """A batch that would exceed a limit anywhere in it is refused and writes nothing."""
    batch = [bg.ProcessingTaskRequest(job(i), payload={"i": i}) for i in range(10)]
    with pytest.raises(bg.TooManyPendingTaskRequests) as caught:
        app.scheduler.submit_many(batch)
    assert job(9) in str(caught.value)  # the 11th pending request is the one named
    with pytest.raises(bg.TooManyPendingTaskRequests):
        app.scheduler.submit_many(
            [bg.AppRefreshTaskRequest(REFRESH), bg.AppRefreshTaskRequest(job("r2"))]
        )
    assert snapshot(redis_client) == written
    assert [r.identifier for r in app.scheduler.pending_task_requests()] == [job("existing")]


def test_limits_come_from_the_apps_limits(redis_url: str) -> None:
    """Limits(max_pending_processing=2) lets exactly two processing requests wait."""
    small = bg.BackgroundApp(
        "com.example.small",
        permitted_identifiers=["com.example.small.*"],
        broker_url=redis_url,
        limits=bg.Limits(max_pending_processing=2, max_pending_refresh=3),
    )
    try:
        small.scheduler.submit_many(
            bg.ProcessingTaskRequest(f"com.example.small.{i}") for i in range(2)
        )
        with pytest.raises(bg.TooManyPendingTaskRequests):
            small.scheduler.submit(bg.ProcessingTaskRequest("com.example.small.2"))
        small.scheduler.submit_many(
            bg.AppRefreshTaskRequest(f"com.example.small.r{i}") for i in range(3)
        )
        with pytest.raises(bg.TooManyPendingTaskRequests):
            small.scheduler.submit(bg.AppRefreshTaskRequest("com.example.small.r3"))
    finally:
        small.client.close()


# --- permissions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "identifier",
    [f"{APP}.refresh2", f"{APP}.refres", f"{APP}.job", f"{APP}.jobx", "com.other.refresh"],
)
def test_identifier_not_permitted(
    app: bg.BackgroundApp, redis_client: redis.Redis, written: dict[bytes, Any], identifier: str
) -> None:
    """An identifier matching no exact or prefix permission raises NotPermitted (code 3)."""
    with pytest.raises(bg.NotPermitted) as caught:
        app.scheduler.submit(bg.ProcessingTaskRequest(identifier))
    assert (caught.value.code, caught.value.domain) == (3, APPLE_DOMAIN)
    with pytest.raises(bg.NotPermitted):
        app.scheduler.submit_many(
            [bg.ProcessingTaskRequest(job("fine")), bg.ProcessingTaskRequest(identifier)]
        )
    assert snapshot(redis_client) == written


def test_prefix_and_exact_permissions(app: bg.BackgroundApp) -> None:
    """A trailing '*' permits every identifier with that prefix; others must match exactly."""
    assert app.is_permitted(REFRESH)
    assert app.is_permitted(job("a.b.c")) and app.is_permitted(JOB)
    assert not app.is_permitted(REFRESH + ".x")
    app.scheduler.submit(bg.ProcessingTaskRequest(job("a.b.c")))
    app.scheduler.submit(bg.AppRefreshTaskRequest(REFRESH))
    assert len(app.scheduler.pending_task_requests()) == 2


def test_register_checks_permission_and_duplicates(app: bg.BackgroundApp) -> None:
    """register: a non-permitted identifier is NotPermitted; the same one twice, ParameterError."""
    with pytest.raises(bg.NotPermitted):
        app.register("com.other.thing")

    @app.register(job("x"))
    def handler(task: bg.BGTask) -> None:
        task.set_task_completed(success=True)

    assert app.handlers[job("x")] is handler
    with pytest.raises(bg.ParameterError):
        app.register(job("x"))
    assert app.handlers[job("x")] is handler
    with pytest.raises(bg.ParameterError):
        app.register("bad identifier")


# --- bad arguments --------------------------------------------------------------------

NAIVE = datetime(2031, 1, 1, 12, 0)

BAD_REQUESTS: list[tuple[str, type[bg.BGTaskRequest], dict[str, Any]]] = [
    ("naive datetime", bg.ProcessingTaskRequest, {"earliest_begin_date": NAIVE}),
    ("date as text", bg.ProcessingTaskRequest, {"earliest_begin_date": "2031-01-01T00:00Z"}),
    ("date as epoch", bg.ProcessingTaskRequest, {"earliest_begin_date": 1_900_000_000}),
    ("date not datetime", bg.ProcessingTaskRequest, {"earliest_begin_date": date(2031, 1, 1)}),
    ("payload set", bg.ProcessingTaskRequest, {"payload": {1, 2}}),
    ("payload nan", bg.ProcessingTaskRequest, {"payload": {"x": float("nan")}}),
    ("payload inf", bg.ProcessingTaskRequest, {"payload": [float("inf")]}),
    ("payload object", bg.ProcessingTaskRequest, {"payload": {"o": object()}}),
    ("payload bytes", bg.ProcessingTaskRequest, {"payload": b"raw"}),
    ("payload too big", bg.ProcessingTaskRequest, {"payload": "x" * (64 * 1024)}),
    ("identifier empty", bg.ProcessingTaskRequest, {"identifier": ""}),
    ("identifier space", bg.ProcessingTaskRequest, {"identifier": f"{JOB}a b"}),
    ("identifier tab", bg.ProcessingTaskRequest, {"identifier": f"{JOB}a\tb"}),
    ("identifier control", bg.ProcessingTaskRequest, {"identifier": f"{JOB}a\x1fb"}),
    ("identifier int", bg.ProcessingTaskRequest, {"identifier": 42}),
    ("identifier none", bg.ProcessingTaskRequest, {"identifier": None}),
    ("identifier hash", bg.ProcessingTaskRequest, {"identifier": "#refresh"}),
    ("identifier too long", bg.ProcessingTaskRequest, {"identifier": JOB + "x" * 200}),
    ("network int", bg.ProcessingTaskRequest, {"requires_network_connectivity": 1}),
    ("network none", bg.ProcessingTaskRequest, {"requires_network_connectivity": None}),
    ("power text", bg.AppRefreshTaskRequest, {"requires_external_power": "yes"}),
    ("protection", bg.HealthResearchTaskRequest, {"protection_type_of_required_data": "bogus"}),
    ("protection none", bg.HealthResearchTaskRequest, {"protection_type_of_required_data": None}),
    ("strategy", bg.ContinuedProcessingTaskRequest, {"strategy": "later"}),
    ("strategy int", bg.ContinuedProcessingTaskRequest, {"strategy": 1}),
    ("title", bg.ContinuedProcessingTaskRequest, {"title": 5}),
    ("subtitle", bg.ContinuedProcessingTaskRequest, {"subtitle": None}),
]


@pytest.mark.parametrize(
    ("cls", "bad"), [(c, b) for _, c, b in BAD_REQUESTS], ids=[n for n, _, _ in BAD_REQUESTS]
)
def test_bad_request_raises_parameter_error_and_writes_nothing(
    app: bg.BackgroundApp,
    redis_client: redis.Redis,
    written: dict[bytes, Any],
    cls: type[bg.BGTaskRequest],
    bad: dict[str, Any],
) -> None:
    """A bad field is refused when the request is made, and again at submit if set later."""
    with pytest.raises(bg.ParameterError) as caught:
        cls(**{"identifier": job("bad"), **bad})
    assert (caught.value.code, caught.value.domain) == (401, HARMONY_DOMAIN)
    assert isinstance(caught.value, ValueError)

    # Requests are mutable: a field broken after construction is caught by submit.
    request = (
        cls(job("bad"), strategy=bg.ContinuedProcessingStrategy.QUEUE)
        if (cls is bg.ContinuedProcessingTaskRequest)
        else cls(job("bad"))
    )
    for name, value in bad.items():
        setattr(request, name, value)
    with pytest.raises(bg.ParameterError):
        app.scheduler.submit(request)
    with pytest.raises(bg.ParameterError):  # a bad request anywhere in a batch
        app.scheduler.submit_many([bg.ProcessingTaskRequest(job("good")), request])
    assert snapshot(redis_client) == written


def test_payload_limit_is_64_kib_of_json(app: bg.BackgroundApp) -> None:
    """A payload whose JSON is exactly 65,536 bytes is accepted; one byte more is not."""
    exact = "x" * (64 * 1024 - 2)  # plus two quotes
    app.scheduler.submit(bg.ProcessingTaskRequest(job("big"), payload=exact))
    assert app.scheduler.pending_task_requests()[0].payload == exact
    with pytest.raises(bg.ParameterError):
        bg.ProcessingTaskRequest(job("big"), payload=exact + "x")
    with pytest.raises(bg.ParameterError):  # bytes, not characters: é is two bytes
        bg.ProcessingTaskRequest(job("big"), payload="é" * (32 * 1024))


def test_base_request_cannot_be_instantiated() -> None:
    """BGTaskRequest is abstract: making one directly raises ParameterError."""
    with pytest.raises(bg.ParameterError):
        bg.BGTaskRequest(job("x"))


def test_submit_of_a_non_request_is_refused(
    app: bg.BackgroundApp, redis_client: redis.Redis, written: dict[bytes, Any]
) -> None:
    """submit/submit_many of something that is not a task request raises ParameterError."""
    for bad in (job("x"), {"identifier": job("x")}, None):
        with pytest.raises(bg.ParameterError):
            app.scheduler.submit(bad)  # type: ignore[arg-type]
        with pytest.raises(bg.ParameterError):
            app.scheduler.submit_many([bg.ProcessingTaskRequest(job("good")), bad])  # type: ignore[list-item]
    app.scheduler.submit_many([])  # an empty batch is fine and writes nothing
    assert snapshot(redis_client) == written


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda a: a.scheduler_for(""), id="scope-empty"),
        pytest.param(lambda a: a.scheduler_for("device 1"), id="scope-space"),
        pytest.param(lambda a: a.scheduler_for(7), id="scope-int"),
        pytest.param(lambda a: a.scheduler_for("#refresh"), id="scope-hash"),
        pytest.param(lambda a: a.scheduler.history(limit=0), id="history-0"),
        pytest.param(lambda a: a.scheduler.history(limit=-1), id="history-negative"),
        pytest.param(lambda a: a.scheduler.history(limit=True), id="history-bool"),
        pytest.param(lambda a: a.scheduler.history(limit="5"), id="history-text"),
        pytest.param(lambda a: a.scheduler.cancel(""), id="cancel-empty"),
        pytest.param(lambda a: a.scheduler.cancel("#processing"), id="cancel-count-field"),
        pytest.param(lambda a: a.scheduler.simulate_launch("a b"), id="simulate-space"),
        pytest.param(lambda a: a.scheduler.simulate_launch(None), id="simulate-none"),
    ],
)
def test_bad_scheduler_arguments(
    app: bg.BackgroundApp,
    redis_client: redis.Redis,
    written: dict[bytes, Any],
    call: Callable[[bg.BackgroundApp], Any],
) -> None:
    """Bad scopes, history limits and identifiers raise ParameterError and write nothing."""
    with pytest.raises(bg.ParameterError) as caught:
        call(app)
    assert caught.value.code == 401 and isinstance(caught.value, ValueError)
    assert snapshot(redis_client) == written
    assert len(app.scheduler.pending_task_requests()) == 1


@pytest.mark.parametrize(
    "field",
    [
        "max_pending_refresh",
        "max_pending_processing",
        "refresh_time_budget",
        "processing_time_budget",
        "expiration_warning",
        "transient_daily_quota",
    ],
)
@pytest.mark.parametrize("value", [-1, 0, -0.5, True, "10", None])
def test_limits_reject_non_positive_or_non_numbers(field: str, value: Any) -> None:
    """Every Limits field must be a positive number."""
    with pytest.raises(bg.ParameterError):
        bg.Limits(**{field: value})


BAD_APPS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("app-id-empty", ("",), {}),
    ("app-id-space", ("com example",), {}),
    ("app-id-braces", ("com.{x}",), {}),
    ("app-id-int", (5,), {}),
    ("permitted-str", (APP,), {"permitted_identifiers": REFRESH}),
    ("permitted-int-item", (APP,), {"permitted_identifiers": [5]}),
    ("permitted-space", (APP,), {"permitted_identifiers": ["a b"]}),
    ("mode-unknown", (APP,), {"background_modes": [99]}),
    ("mode-name", (APP,), {"background_modes": ["teleport"]}),
    ("system-text", (APP,), {"system": "yes"}),
    ("system-int", (APP,), {"system": 1}),
    ("broker-int", (APP,), {"broker_url": 6379}),
    ("limits-dict", (APP,), {"limits": {"max_pending_refresh": 2}}),
]


@pytest.mark.parametrize(
    ("args", "kwargs"), [(a, k) for _, a, k in BAD_APPS], ids=[n for n, _, _ in BAD_APPS]
)
def test_background_app_rejects_bad_arguments(
    redis_client: redis.Redis, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """BackgroundApp refuses bad ids, permissions, modes, flags, broker URLs and limits."""
    before = snapshot(redis_client)
    with pytest.raises(bg.ParameterError):
        bg.BackgroundApp(*args, **kwargs)
    assert snapshot(redis_client) == before


def test_continued_processing_fail_needs_a_free_worker_now(
    app: bg.BackgroundApp, redis_client: redis.Redis, written: dict[bytes, Any]
) -> None:
    """With no live worker, a FAIL-strategy continued request raises code 4; QUEUE waits."""
    with pytest.raises(bg.ImmediateRunIneligible) as caught:
        app.scheduler.submit(bg.ContinuedProcessingTaskRequest(job("now"), title="t"))
    assert (caught.value.code, caught.value.domain) == (4, APPLE_DOMAIN)
    assert snapshot(redis_client) == written
    queued = bg.ContinuedProcessingTaskRequest(
        job("now"), title="t", strategy=bg.ContinuedProcessingStrategy.QUEUE
    )
    app.scheduler.submit(queued)
    assert queued in app.scheduler.pending_task_requests()


def test_a_fail_request_replaced_within_its_batch_needs_no_free_slot(
    app: bg.BackgroundApp,
) -> None:
    """A request given twice in a batch is the later one, so a FAIL-strategy request that a
    later entry of its batch replaces never needs a free slot. (Before, the batch was
    refused with ImmediateRunIneligible for a request it was not going to schedule.)"""
    app.scheduler.submit_many(
        [bg.ContinuedProcessingTaskRequest(job("c"), title="t"), bg.ProcessingTaskRequest(job("c"))]
    )
    assert app.scheduler.pending_task_requests() == [bg.ProcessingTaskRequest(job("c"))]


# --- cancel, scopes, history --------------------------------------------------------


def test_cancel_before_dispatch(app: bg.BackgroundApp, redis_client: redis.Redis) -> None:
    """Cancel removes a pending request (True), a second cancel finds nothing (False)."""
    app.scheduler.submit(bg.AppRefreshTaskRequest(REFRESH, earliest_begin_date=LATER))
    app.scheduler.submit(bg.ProcessingTaskRequest(job(1)))
    assert app.scheduler.cancel(REFRESH) is True
    assert app.scheduler.cancel(REFRESH) is False
    assert app.scheduler.cancel(job("never-submitted")) is False
    assert [r.identifier for r in app.scheduler.pending_task_requests()] == [job(1)]
    assert due_score(redis_client, app, 0, REFRESH) is None
    # The refresh slot is free again.
    app.scheduler.submit(bg.AppRefreshTaskRequest(job("r2")))
    [entry] = app.scheduler.history()
    assert (entry.identifier, entry.scope, entry.kind, entry.state, entry.success) == (
        REFRESH,
        "default",
        "refresh",
        "cancelled",
        False,
    )
    assert entry.started_at is None and entry.worker is None
    assert entry.finished_at is not None
    assert abs(entry.finished_at - datetime.now(UTC)) < timedelta(seconds=30)


def test_cancel_all_counts_and_spares_other_scopes(app: bg.BackgroundApp) -> None:
    """cancel_all empties its own scope, returns how many it cancelled, and nothing else."""
    device = app.scheduler_for("device-1")
    app.scheduler.submit(bg.AppRefreshTaskRequest(REFRESH))
    app.scheduler.submit_many(bg.ProcessingTaskRequest(job(i)) for i in range(4))
    device.submit_many([bg.AppRefreshTaskRequest(REFRESH), bg.ProcessingTaskRequest(job(0))])

    assert app.scheduler.cancel_all() == 5
    assert app.scheduler.pending_task_requests() == []
    assert app.scheduler.cancel_all() == 0
    assert {r.identifier for r in device.pending_task_requests()} == {REFRESH, job(0)}
    assert device.history() == []
    history = app.scheduler.history()
    assert len(history) == 5 and {r.state for r in history} == {"cancelled"}
    # The limits count from zero again.
    app.scheduler.submit(bg.AppRefreshTaskRequest(REFRESH))
    app.scheduler.submit_many(bg.ProcessingTaskRequest(job(i)) for i in range(10))


def test_scopes_are_independent(app: bg.BackgroundApp) -> None:
    """Two scopes of one app have their own pending requests, cancels and history."""
    device = app.scheduler_for("device-1")
    mine = bg.ProcessingTaskRequest(job("same"), payload="default")
    theirs = bg.ProcessingTaskRequest(job("same"), payload="device")
    app.scheduler.submit(mine)
    device.submit(theirs)
    assert app.scheduler.pending_task_requests() == [mine]
    assert device.pending_task_requests() == [theirs]

    assert device.cancel(job("same")) is True
    assert app.scheduler.pending_task_requests() == [mine]
    assert [r.scope for r in device.history()] == ["device-1"]
    assert app.scheduler.history() == []
    assert app.scheduler_for("device-1").pending_task_requests() == []


def test_history_is_newest_first_and_limited(app: bg.BackgroundApp) -> None:
    """history(limit) returns at most `limit` records, the most recent first."""
    names = [job(i) for i in range(5)]
    app.scheduler.submit_many(bg.ProcessingTaskRequest(n) for n in names)
    for name in names:
        assert app.scheduler.cancel(name)
    assert [r.identifier for r in app.scheduler.history(limit=2)] == [names[4], names[3]]
    assert [r.identifier for r in app.scheduler.history()] == names[::-1]
    assert [r.identifier for r in app.scheduler.history(limit=1)] == [names[4]]
    finished_at = [r.finished_at for r in app.scheduler.history()]
    assert finished_at == sorted(finished_at, reverse=True)


def test_simulate_launch_without_workers(app: bg.BackgroundApp, redis_client: redis.Redis) -> None:
    """simulate_launch makes a pending request due now; an unknown identifier gives False."""
    assert app.scheduler.simulate_launch(job("unknown")) is False
    app.scheduler.submit(bg.ProcessingTaskRequest(job(1), earliest_begin_date=LATER))
    assert app.scheduler_for("device-1").simulate_launch(job(1)) is False
    assert app.scheduler.simulate_launch(job(1)) is True
    assert due_score(redis_client, app, 0, job(1)) == 0
    # The request itself keeps its date.
    assert app.scheduler.pending_task_requests()[0].earliest_begin_date == LATER


# --- with beat and a worker ---------------------------------------------------------


def test_replaced_future_request_runs_once_when_resubmitted_due_now(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A far-future request replaced by a due-now one runs once, with the new payload."""
    name = SAMPLE + "process"
    sample_app.scheduler.submit(
        bg.ProcessingTaskRequest(
            name,
            earliest_begin_date=datetime.now(UTC) + timedelta(days=1),
            payload={"v": 1, "complete": True},
        )
    )
    sample_app.scheduler.submit(bg.ProcessingTaskRequest(name, payload={"v": 2, "complete": True}))
    cluster.beat()
    cluster.worker(concurrency=1)

    [record] = wait_for(lambda: finished(sample_app, name), message="the replaced request")
    assert (record.state, record.success, record.worker) == ("completed", True, "w1")
    [start] = events(redis_client, "start", name)
    assert start["payload"] == {"v": 2, "complete": True}
    # Nothing is left that could run it again: no record, no due entry, no lease.
    assert sample_app.scheduler.pending_task_requests() == []
    scheduled = sample_app.keys.sched_all("default")
    assert all(redis_client.zscore(k, name) is None for k in scheduled)
    assert redis_client.zscore(sample_app.keys.leases, keys.member("default", name)) is None


def test_cancel_and_replace_after_dispatch(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A dispatched request that is cancelled never starts; a replaced one runs once, new."""
    slow, cancelled, replaced = SAMPLE + "slow", SAMPLE + "a", SAMPLE + "b"
    cluster.beat()
    cluster.worker(concurrency=1)
    scheduler = sample_app.scheduler
    scheduler.submit(bg.ProcessingTaskRequest(slow, payload={"sleep": 2, "complete": True}))
    wait_for(lambda: events(redis_client, "start", slow), message="the slow task to start")

    # The only pool process is busy: these wait on the Celery queue, dispatched.
    scheduler.submit(bg.ProcessingTaskRequest(cancelled, payload={"complete": True}))
    scheduler.submit(bg.ProcessingTaskRequest(replaced, payload={"v": 1, "complete": True}))
    for name in (cancelled, replaced):
        wait_for(
            lambda n=name: (sample_record(redis_client, n) or {}).get("s") == "dispatched",
            message=f"{name} dispatched",
        )
    assert events(redis_client, "end", slow) == []  # still inside the window we want
    assert scheduler.cancel(cancelled) is True
    scheduler.submit(bg.ProcessingTaskRequest(replaced, payload={"v": 2, "complete": True}))

    wait_for(lambda: finished(sample_app, replaced), message="the replaced request to run")
    assert [r.state for r in finished(sample_app, slow)] == ["completed"]
    # The stale messages were consumed before the replacement's (one FIFO queue).
    assert events(redis_client, "start", cancelled) == []
    starts = events(redis_client, "start", replaced)
    assert [s["payload"] for s in starts] == [{"v": 2, "complete": True}]
    [record] = finished(sample_app, cancelled)
    assert (record.state, record.success, record.started_at) == ("cancelled", False, None)
    assert [r.state for r in finished(sample_app, replaced)] == ["completed"]
    assert scheduler.pending_task_requests() == []


def test_simulate_launch_runs_a_future_request_promptly(
    cluster: Cluster, sample_app: bg.BackgroundApp, redis_client: redis.Redis
) -> None:
    """A request due in an hour runs within seconds of simulate_launch, not before."""
    future, marker = SAMPLE + "c", SAMPLE + "a"
    cluster.beat()
    cluster.worker(concurrency=1)
    sample_app.scheduler.submit(
        bg.ProcessingTaskRequest(
            future,
            earliest_begin_date=datetime.now(UTC) + timedelta(hours=1),
            payload={"complete": True},
        )
    )
    # A due-now request submitted after it runs: beat and the worker are serving.
    sample_app.scheduler.submit(bg.ProcessingTaskRequest(marker, payload={"complete": True}))
    wait_for(lambda: finished(sample_app, marker), message="the due-now request")
    assert events(redis_client, "start", future) == []
    assert [r.identifier for r in sample_app.scheduler.pending_task_requests()] == [future]

    started = time.monotonic()
    assert sample_app.scheduler.simulate_launch(future) is True
    wait_for(
        lambda: events(redis_client, "start", future), timeout=5, message="the simulated launch"
    )
    print(f"simulate_launch → start: {(time.monotonic() - started) * 1000:.1f} ms")
    wait_for(lambda: finished(sample_app, future), message="the launched request to finish")
    assert sample_app.scheduler.simulate_launch(future) is False  # it ran: nothing pending
    assert sample_app.scheduler.simulate_launch(SAMPLE + "unknown") is False


# --- volume -------------------------------------------------------------------------


def test_submit_many_thousand_requests_across_hundred_scopes(app: bg.BackgroundApp) -> None:
    """1,000 processing requests, 10 in each of 100 scopes, are all accepted."""
    scopes = [app.scheduler_for(f"device-{s}") for s in range(100)]
    batches = [
        [bg.ProcessingTaskRequest(job(i), payload={"s": s, "i": i}) for i in range(10)]
        for s in range(100)
    ]
    started = time.perf_counter()
    for scheduler, batch in zip(scopes, batches, strict=True):
        scheduler.submit_many(batch)
    elapsed = time.perf_counter() - started
    print(f"submit_many: {1000 / elapsed:,.0f} requests/s (1,000 in 100 scopes)")
    for s, scheduler in enumerate(scopes):
        pending = scheduler.pending_task_requests()
        assert len(pending) == 10
        assert {r.payload["s"] for r in pending} == {s}
    with pytest.raises(bg.TooManyPendingTaskRequests):
        scopes[42].submit(bg.ProcessingTaskRequest(job(10)))
