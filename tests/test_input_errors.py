"""Bad input that once slipped through: each gets a typed error and changes nothing."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis

import bgqueue as bg
from bgqueue.broker import deadletter
from bgqueue.broker.embedded import RedisServer
from bgqueue.model import keys


def snapshot(client: redis.Redis) -> dict[bytes, bytes | None]:
    """Every key's serialised value (small keys only: DUMP order is stable for them)."""
    return {k: client.dump(k) for k in client.keys("*")}


def test_refused_submit_writes_nothing_even_after_beat_drained_its_wake_list(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """A submit refused with TooManyPendingTaskRequests must not write (or wake beat)."""
    app = bg.BackgroundApp("com.ex", permitted_identifiers=["com.ex.*"], broker_url=redis_url)
    app.scheduler.submit(bg.AppRefreshTaskRequest("com.ex.r1"))
    before = snapshot(redis_client)
    with pytest.raises(bg.TooManyPendingTaskRequests):
        app.scheduler.submit(bg.AppRefreshTaskRequest("com.ex.r2"))
    assert snapshot(redis_client) == before


@pytest.mark.parametrize(
    "field", ["processing_time_budget", "max_pending_refresh", "expiration_warning"]
)
def test_limits_reject_nan(field: str) -> None:
    """NaN is not a positive number."""
    with pytest.raises(bg.ParameterError):
        bg.Limits(**{field: math.nan})


@pytest.mark.parametrize(
    "field",
    ["max_pending_refresh", "max_pending_processing", "max_works", "transient_max_concurrent"],
)
def test_limits_counts_are_integers(field: str) -> None:
    """Counts are whole numbers."""
    with pytest.raises(bg.ParameterError):
        bg.Limits(**{field: 1.5})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"permitted_identifiers": None},
        {"permitted_identifiers": 5},
        {"background_modes": None},
        {"background_modes": 5},
    ],
)
def test_background_app_non_iterables_are_parameter_errors(kwargs: dict[str, object]) -> None:
    """Non-list arguments are ParameterErrors, not TypeErrors."""
    with pytest.raises(bg.ParameterError):
        bg.BackgroundApp("com.ex", **kwargs)


@pytest.mark.parametrize("payload", [{1: "a"}, {"t": (1, 2)}])
def test_payload_that_json_would_change_is_refused(redis_url: str, payload: object) -> None:
    """'JSON only': a payload must come back equal, or be refused."""
    app = bg.BackgroundApp("com.ex", permitted_identifiers=["com.ex.*"], broker_url=redis_url)
    try:
        app.scheduler.submit(bg.ProcessingTaskRequest("com.ex.p", payload=payload))
    except bg.ParameterError:
        return
    assert app.scheduler.pending_task_requests()[0].payload == payload


def test_continued_processing_refuses_a_future_start_date() -> None:
    """ContinuedProcessingTaskRequest.validate's docstring: 'no future start date'."""
    with pytest.raises(bg.ParameterError):
        bg.ContinuedProcessingTaskRequest(
            "com.ex.c", earliest_begin_date=datetime.now(UTC) + timedelta(hours=1)
        )


def test_app_is_announced_after_a_broker_blip(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    """A submit during an outage is a ServiceError; the next accepted one makes the app known
    to beat (bgqueue:apps), so its requests are dispatched."""
    server = make_redis_server()
    app = bg.BackgroundApp("com.ex", permitted_identifiers=["com.ex.*"], broker_url=server.url)
    app.scheduler.pending_task_requests()  # connected
    server.stop()
    with pytest.raises(bg.ServiceError):
        app.scheduler.submit(bg.ProcessingTaskRequest("com.ex.p"))
    server.start()
    app.scheduler.submit(bg.ProcessingTaskRequest("com.ex.p"))
    client = server.client()
    try:
        assert client.sismember(keys.APPS, "com.ex")
    finally:
        client.close()


def test_submit_survives_an_emptied_script_cache(redis_url: str, redis_client: redis.Redis) -> None:
    """A restarted Redis has no Lua scripts cached; the next submit loads them and succeeds."""
    app = bg.BackgroundApp("com.ex", permitted_identifiers=["com.ex.*"], broker_url=redis_url)
    app.scheduler.submit(bg.ProcessingTaskRequest("com.ex.first"))
    redis_client.script_flush()
    app.scheduler.submit(bg.ProcessingTaskRequest("com.ex.second"))
    pending = [r.identifier for r in app.scheduler.pending_task_requests()]
    assert pending == ["com.ex.first", "com.ex.second"]


@pytest.mark.parametrize("target", ["due", "counts", "scope"])
def test_submit_over_a_key_of_the_wrong_type_is_unavailable_and_writes_nothing(
    redis_url: str, redis_client: redis.Redis, target: str
) -> None:
    """Foreign data where bgqueue keeps a sorted set or a hash: a typed error, and the
    script stops before its first write (a Lua script that fails half-way keeps its writes)."""
    app = bg.BackgroundApp("com.ex", permitted_identifiers=["com.ex.*"], broker_url=redis_url)
    app.scheduler.submit(bg.ProcessingTaskRequest("com.ex.first"))
    key = {"due": app.keys.due(0), "counts": app.keys.counts, "scope": app.keys.requests("s")}
    redis_client.delete(key[target])
    redis_client.set(key[target], "not bgqueue's")
    before = snapshot(redis_client)
    with pytest.raises(bg.Unavailable, match="bgqueue"):
        app.scheduler_for("s").submit(bg.ProcessingTaskRequest("com.ex.second"))
    assert snapshot(redis_client) == before


def test_submit_over_a_foreign_record_dead_letters_it_and_replaces_it(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """A stored record bgqueue did not write is kept in the dead letter, then replaced."""
    app = bg.BackgroundApp("com.ex", permitted_identifiers=["com.ex.*"], broker_url=redis_url)
    redis_client.hset(app.keys.requests("s"), "com.ex.job", "{not json")
    app.scheduler_for("s").submit(bg.ProcessingTaskRequest("com.ex.job", payload={"n": 1}))
    [pending] = app.scheduler_for("s").pending_task_requests()
    assert pending.payload == {"n": 1}
    [letter] = deadletter.read(redis_client, app.keys)
    assert letter.raw == "{not json" and "replaced by a submit" in letter.reason


def test_cancel_meets_foreign_data_with_a_typed_error_or_a_dead_letter(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Cancel removes a record bgqueue did not write (kept in the dead letter); over a key of
    the wrong type it is Unavailable and cancels nothing."""
    app = bg.BackgroundApp("com.ex", permitted_identifiers=["com.ex.*"], broker_url=redis_url)
    scheduler = app.scheduler_for("s")
    scheduler.submit(bg.ProcessingTaskRequest("com.ex.real"))
    redis_client.hset(app.keys.requests("s"), "com.ex.junk", "[1, 2]")
    redis_client.set(app.keys.history("s"), "not a list")
    before = snapshot(redis_client)
    with pytest.raises(bg.Unavailable, match="history"):
        scheduler.cancel_all()
    assert snapshot(redis_client) == before
    redis_client.delete(app.keys.history("s"))
    scheduler.cancel_all()
    assert scheduler.pending_task_requests() == []
    assert redis_client.hkeys(app.keys.requests("s")) == []
    [letter] = deadletter.read(redis_client, app.keys)
    assert letter.raw == "[1, 2]" and "removed by a cancel" in letter.reason
