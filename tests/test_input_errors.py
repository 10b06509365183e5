"""Bad input that once slipped through: each gets a typed error and changes nothing."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis

import bgqueue as bg
from bgqueue import keys
from bgqueue.embedded import RedisServer


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
