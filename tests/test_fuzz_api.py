"""Hypothesis over the public API (DESIGN.md §2): arbitrary values, valid ones mixed in.

Property: a call either succeeds and what was asked round-trips, or raises a typed
`bg.BackgroundTaskError` and every Redis key is unchanged. Never a bare TypeError,
ValueError, KeyError or redis error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, timedelta, timezone
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bgqueue as bg
from tests.test_scheduler import snapshot

APP = "com.fuzz"
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

odd_text = st.one_of(
    st.text(max_size=20),
    st.just("\x00"),
    st.just("a" * 300),
    st.just("#refresh"),
    st.just("com.fuzz.x\x1fy"),
    st.just("com.fuzz.é"),
)
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    odd_text,
    st.binary(max_size=10),
    st.lists(st.integers(), max_size=3),
    st.tuples(st.integers()),
    st.dictionaries(st.integers(), st.integers(), max_size=2),
    st.just(object()),
)
names = st.one_of(st.sampled_from([f"{APP}.a", f"{APP}.b"]), odd_text, anything)
dates = st.one_of(
    st.none(),
    st.datetimes(timezones=st.just(UTC)),
    st.datetimes(),  # naive: refused
    st.datetimes(timezones=st.just(timezone(timedelta(hours=5)))),
    anything,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
payloads = st.one_of(json_values, anything, st.floats(), st.dictionaries(st.integers(), st.none()))
flags = st.one_of(st.booleans(), anything)
REQUESTS = [
    bg.AppRefreshTaskRequest,
    bg.ProcessingTaskRequest,
    bg.HealthResearchTaskRequest,
    bg.ContinuedProcessingTaskRequest,
]


def typed_or_ok(call: Callable[[], Any]) -> tuple[bool, Any]:
    """(True, result) or (False, error) for a typed bgqueue error; anything else fails."""
    try:
        return True, call()
    except bg.BackgroundTaskError as exc:
        assert exc.code and exc.domain and str(exc)
        return False, exc


@FUZZ
@given(
    kind=st.sampled_from(REQUESTS),
    identifier=names,
    date=dates,
    network=flags,
    power=flags,
    payload=payloads,
    scope=names,
)
def test_submit_round_trips_or_refuses_and_changes_nothing(
    redis_url: str,
    redis_client: redis.Redis,
    kind: type[bg.BGTaskRequest],
    identifier: Any,
    date: Any,
    network: Any,
    power: Any,
    payload: Any,
    scope: Any,
) -> None:
    """Constructing a request and submitting it in some scope: round-trips or a typed
    error with nothing written."""
    redis_client.flushall()
    app = bg.BackgroundApp(APP, permitted_identifiers=[f"{APP}.*"], broker_url=redis_url)
    app.scheduler.submit(bg.ProcessingTaskRequest(f"{APP}.kept", payload={"x": 1}))
    before = snapshot(redis_client)
    ok, request = typed_or_ok(
        lambda: kind(
            identifier,
            earliest_begin_date=date,
            requires_network_connectivity=network,
            requires_external_power=power,
            payload=payload,
        )
    )
    if ok:
        ok, scheduler = typed_or_ok(lambda: app.scheduler_for(scope))
    if ok:
        ok, _ = typed_or_ok(lambda: scheduler.submit(request))
    if not ok:
        assert snapshot(redis_client) == before
        return
    copy = next(r for r in scheduler.pending_task_requests() if r.identifier == identifier)
    assert type(copy) is kind
    assert copy.payload == payload
    assert copy.requires_network_connectivity is network
    assert copy.requires_external_power is power
    if date is not None:
        assert copy.earliest_begin_date is not None
        assert abs((copy.earliest_begin_date - date).total_seconds()) < 0.002


@FUZZ
@given(
    method=st.sampled_from(["cancel", "history", "simulate_launch", "simulate_expiration"]),
    arg=anything | names,
)
def test_scheduler_methods_refuse_bad_arguments(
    redis_url: str, redis_client: redis.Redis, method: str, arg: Any
) -> None:
    redis_client.flushall()
    app = bg.BackgroundApp(APP, permitted_identifiers=[f"{APP}.*"], broker_url=redis_url)
    app.scheduler.submit(bg.ProcessingTaskRequest(f"{APP}.kept"))
    before = snapshot(redis_client)
    ok, _ = typed_or_ok(lambda: getattr(app.scheduler, method)(arg))
    if not ok or method in ("history", "simulate_expiration"):
        assert snapshot(redis_client) == before


@FUZZ
@given(data=st.data())
def test_limits_and_app_constructor(data: st.DataObject) -> None:
    field = data.draw(st.sampled_from([f.name for f in bg.Limits.__dataclass_fields__.values()]))
    value = data.draw(anything | st.integers(1, 10**6) | st.floats(0.001, 1e6))
    ok, limits = typed_or_ok(lambda: bg.Limits(**{field: value}))
    if ok:
        assert getattr(limits, field) == value and getattr(limits, field) > 0
        assert math.isfinite(getattr(limits, field))
    kwargs = data.draw(
        st.fixed_dictionaries(
            {},
            optional={
                "permitted_identifiers": anything | st.lists(names, max_size=3),
                "background_modes": anything
                | st.lists(st.sampled_from(list(bg.BackgroundMode)) | anything, max_size=2),
                "system": flags,
                "broker_url": anything,
                "limits": anything,
            },
        )
    )
    typed_or_ok(lambda: bg.BackgroundApp(data.draw(names), **kwargs))


@FUZZ
@given(
    resource_types=anything | st.integers(-5, 600),
    is_apply=flags,
    time_out=anything | st.integers(-5, 2**32),
    reason=anything | odd_text,
    is_persist=flags,
    is_process=flags,
)
def test_efficiency_request_constructor(**fields: Any) -> None:
    ok, request = typed_or_ok(lambda: bg.EfficiencyResourcesRequest(**fields))
    if ok:
        assert request.resource_types == fields["resource_types"]


@FUZZ
@given(
    work_id=anything | st.integers(-5, 2**32),
    ability=names,
    network=anything | st.sampled_from(list(bg.NetworkType)),
    battery=anything | st.integers(-5, 105),
    repeat=flags,
    cycle=anything | st.integers(0, 2**54),
    parameters=anything | st.dictionaries(odd_text, anything, max_size=2),
)
def test_work_info_and_start_work(
    redis_url: str,
    redis_client: redis.Redis,
    work_id: Any,
    ability: Any,
    network: Any,
    battery: Any,
    repeat: Any,
    cycle: Any,
    parameters: Any,
) -> None:
    redis_client.flushall()
    app = bg.BackgroundApp(APP, broker_url=redis_url)
    before = snapshot(redis_client)
    ok, work = typed_or_ok(
        lambda: bg.WorkInfo(
            work_id=work_id,
            ability_name=ability,
            network_type=network,
            battery_level=battery,
            is_repeat=repeat,
            repeat_cycle_time=cycle,
            parameters=parameters,
        )
    )
    if ok:
        ok, _ = typed_or_ok(lambda: app.start_work(work))
    if not ok:
        assert snapshot(redis_client) == before
        return
    assert app.get_work_status(work_id).to_json() == work.to_json()


@FUZZ
@given(
    ability=names,
    modes=anything | st.lists(st.sampled_from(list(bg.BackgroundMode)) | anything, max_size=3),
    payload=payloads,
)
def test_start_background_running(
    redis_url: str, redis_client: redis.Redis, ability: Any, modes: Any, payload: Any
) -> None:
    redis_client.flushall()
    app = bg.BackgroundApp(APP, background_modes=list(bg.BackgroundMode)[:3], broker_url=redis_url)
    before = snapshot(redis_client)
    ok, _ = typed_or_ok(lambda: app.start_background_running(ability, modes, payload=payload))
    if not ok:
        assert snapshot(redis_client) == before
        return
    (info,) = app.all_continuous_tasks()
    assert info.ability_name == ability and info.payload == payload


@FUZZ
@given(value=anything, count=anything)
def test_task_object_methods_outside_a_run(value: Any, count: Any) -> None:
    """What a handler may call, on a task built by hand: typed errors only."""
    task = bg.ContinuedProcessingTask(f"{APP}.a", "default", None, 1, 1)
    typed_or_ok(lambda: setattr(task, "expiration_handler", value))
    typed_or_ok(lambda: task.set_task_completed(value))
    typed_or_ok(lambda: task.update_title(value, "s"))
    typed_or_ok(lambda: setattr(task.progress, "completed_unit_count", count))
    typed_or_ok(lambda: task.request_suspend_delay(value, lambda: None))
    typed_or_ok(lambda: task.get_remaining_delay_time(count))
    typed_or_ok(lambda: task.cancel_suspend_delay(count))
    typed_or_ok(lambda: task.has_resource(value))


@FUZZ
@given(scope=names)
def test_transient_task_info(redis_url: str, scope: Any) -> None:
    app = bg.BackgroundApp(APP, broker_url=redis_url)
    ok, info = typed_or_ok(lambda: app.transient_task_info(scope))
    if ok:
        assert info.remaining_quota >= 0


@pytest.mark.parametrize("call", ["apply", "reset", "all"])
def test_efficiency_apis_of_a_non_system_app(redis_url: str, call: str) -> None:
    app = bg.BackgroundApp(APP, broker_url=redis_url)
    request = bg.EfficiencyResourcesRequest(
        resource_types=bg.ResourceType.CPU, is_apply=True, time_out=1000, reason="r"
    )
    calls = {
        "apply": lambda: app.apply_efficiency_resources(request),
        "reset": app.reset_all_efficiency_resources,
        "all": app.all_efficiency_resources,
    }
    with pytest.raises(bg.NotSystemApp):
        calls[call]()
