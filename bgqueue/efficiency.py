"""Efficiency resources (HarmonyOS `applyEfficiencyResources`): privileged exemptions that
a system app holds for a while, and the effects other modules ask about with `granted`.

A grant is one Redis string per (resource type, level), holding its reason and terms as
JSON, set to expire at the grant's end on Redis's own clock: the automatic release at
`time_out` is Redis deleting the key, so no reader can ever see an expired grant and no
sweep is needed for it. Persistent grants have no TTL. Process-level grants
(`is_process=True`) belong to the app's worker processes and are also released by beat's
sweep once the app has no live worker left (see `sweep`).

Effects (DESIGN.md §4): CPU puts the app's requests in the priority lane of their queue
(`lane`) and lifts the budget/5 cap on the expiration warning (`warning_lead`); TIMER and
WORK_SCHEDULER are applied by the work scheduler through `granted`; the others are only
recorded, for handlers to ask about with `task.has_resource(...)`.
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bgqueue.errors import EfficiencyResourceVerificationFailed, ParameterError
from bgqueue.keys import AppKeys
from bgqueue.requests import from_ms

if TYPE_CHECKING:
    from bgqueue.app import BackgroundApp

log = logging.getLogger("bgqueue.efficiency")

MAX_TIME_OUT = 2**31 - 1  # ms; HarmonyOS reads timeOut as an int32 (about 24.8 days)
MAX_REASON = 1024

# kombu's Redis transport keeps one list per priority step and a worker pops the lists of
# step 0 first (BRPOP over every queue's step-0 list, then step 3, ...); a message with no
# priority lands on step 0. So ordinary requests are published on step 3, and those of an
# app holding CPU on step 0: ahead of everything waiting, first-in first-out within a step.
PRIORITY_LANE = 0
NORMAL_LANE = 3


class ResourceType(enum.IntFlag):
    """Efficiency resource types, the bit values of HarmonyOS's `ResourceType`."""

    CPU = 1
    COMMON_EVENT = 2
    TIMER = 4
    WORK_SCHEDULER = 8
    BLUETOOTH = 16
    GPS = 32
    AUDIO = 64
    RUNNING_LOCK = 128
    SENSOR = 256


ALL_TYPES = tuple(ResourceType)
ALL_BITS = sum(ALL_TYPES)
SINGLE_BITS = frozenset(int(t) for t in ALL_TYPES)


def _check_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise ParameterError(f"{what} must be True or False, got {value!r}")
    return value


@dataclass(kw_only=True)
class EfficiencyResourcesRequest:
    """Apply for (or, with `is_apply=False`, release) efficiency resources.

    `resource_types` is one `ResourceType` or several or-ed together; `time_out` is in
    milliseconds and is ignored for persistent grants and releases; `is_process` applies to
    the app's worker processes rather than the app (see docs/harmony.md).
    """

    resource_types: int
    is_apply: bool
    time_out: int
    reason: str
    is_persist: bool = False
    is_process: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise for anything an apply would refuse (requests are mutable): 18700001 for
        bad resource types, ParameterError (401) for any other bad field."""
        types = self.resource_types
        if isinstance(types, bool) or not isinstance(types, int):
            raise ParameterError(f"resource_types must be a ResourceType, got {types!r}")
        if types <= 0 or types & ~ALL_BITS:
            raise EfficiencyResourceVerificationFailed(
                f"resource_types {types!r} is not a combination of ResourceType values "
                f"(1 to {ALL_BITS})"
            )
        _check_bool(self.is_apply, "is_apply")
        _check_bool(self.is_persist, "is_persist")
        _check_bool(self.is_process, "is_process")
        time_out = self.time_out
        if isinstance(time_out, bool) or not isinstance(time_out, int):
            raise ParameterError(f"time_out must be whole milliseconds, got {time_out!r}")
        if not 0 <= time_out <= MAX_TIME_OUT:
            raise ParameterError(f"time_out must be 0 to {MAX_TIME_OUT} ms, got {time_out}")
        if self.is_apply and not self.is_persist and time_out == 0:
            raise ParameterError("time_out must be positive unless is_persist is set")
        if not isinstance(self.reason, str) or len(self.reason) > MAX_REASON:
            raise ParameterError(f"reason must be a string of at most {MAX_REASON} characters")
        if self.is_apply and self.is_process and types & ResourceType.WORK_SCHEDULER:
            # HarmonyOS ignores such a request ("not recommended"); refusing says so.
            raise EfficiencyResourceVerificationFailed(
                "WORK_SCHEDULER can be applied for by the app only, not by a process"
            )

    @property
    def types(self) -> list[ResourceType]:
        """The single resource types this request names."""
        return [t for t in ALL_TYPES if self.resource_types & t]


@dataclass(frozen=True)
class EfficiencyResourcesInfo:
    """One held grant (HarmonyOS's `EfficiencyResourcesInfo`), as `all_efficiency_resources`
    lists them: one per resource type and level."""

    resource_types: ResourceType
    timeout: int  # ms, as last applied; 0 for a persistent grant
    is_persistent: bool
    is_for_process: bool
    reason: str
    expires_at: datetime | None  # the automatic release (server clock); None if persistent


# -- producer side (BackgroundApp's three methods) ------------------------------------


def check_type(resource: object) -> ResourceType:
    """The single ResourceType `resource` names, or ParameterError."""
    if isinstance(resource, bool) or not isinstance(resource, int) or resource not in SINGLE_BITS:
        raise ParameterError(f"resource must be a single ResourceType, got {resource!r}")
    return ResourceType(resource)


def apply(app: BackgroundApp, request: EfficiencyResourcesRequest) -> None:
    """Apply for or release the request's types (see `BackgroundApp.apply_efficiency_resources`)."""
    if not isinstance(request, EfficiencyResourcesRequest):
        raise ParameterError("request must be a bgqueue.EfficiencyResourcesRequest")
    request.validate()
    k = app.keys
    if not request.is_apply:
        # Releasing the app's grant also releases its processes' grants of those types,
        # as HarmonyOS does; a process-level release touches process grants only.
        doomed = [k.efficiency(t, True) for t in request.types]
        if not request.is_process:
            doomed += [k.efficiency(t, False) for t in request.types]
        with app.service():
            app.client.delete(*doomed)
        return
    script_keys = [k.alive, *(k.efficiency(t, request.is_process) for t in request.types)]
    args = [request.time_out, int(request.is_persist), int(request.is_process), request.reason]
    if not app.call("efficiency_apply", script_keys, args):
        raise EfficiencyResourceVerificationFailed(
            "a process-level grant needs a live worker of the app (its processes); none is alive"
        )
    app.announce()  # beat must know the app to publish in its lane and sweep process grants


def reset_all(app: BackgroundApp) -> None:
    """Release every grant of the app, at both levels."""
    with app.service():
        app.client.delete(*app.keys.efficiency_all)


def all_grants(app: BackgroundApp) -> list[EfficiencyResourcesInfo]:
    """Every grant the app holds now: app-level first, then process-level, by type."""
    with app.service():
        return read_grants(app.client, app.keys)


def read_grants(client: Any, app_keys: AppKeys) -> list[EfficiencyResourcesInfo]:
    """`all_grants` for code with a client and an app's keys but no BackgroundApp (status)."""
    values = client.mget(app_keys.efficiency_all)
    found = []
    for index, raw in enumerate(values):
        if raw is None:
            continue
        grant = json.loads(raw)
        found.append(
            EfficiencyResourcesInfo(
                resource_types=ALL_TYPES[index % len(ALL_TYPES)],
                timeout=0 if grant["p"] else int(grant["t"]),
                is_persistent=bool(grant["p"]),
                is_for_process=index >= len(ALL_TYPES),
                reason=grant["r"],
                expires_at=None if grant["p"] else from_ms(grant["x"]),
            )
        )
    return found


# -- what other modules ask -------------------------------------------------------------


def granted(app: BackgroundApp, resource: ResourceType) -> bool:
    """Whether `app` holds a live grant of one resource type now (app- or process-level).

    For the modules that apply a resource's effect, e.g. the work scheduler asks
    `granted(app, ResourceType.TIMER)`. Expired grants never count: Redis deletes them at
    their timeout on its own clock. One round trip; always False for a non-system app.
    """
    resource = check_type(resource)
    if not app.system:
        return False
    with app.service():
        return held(app.client, app.keys, resource)


def held(client: Any, app_keys: AppKeys, resource: ResourceType) -> bool:
    """`granted` for code that has a client and an app's keys but no BackgroundApp (beat)."""
    names = (app_keys.efficiency(resource, False), app_keys.efficiency(resource, True))
    return bool(client.exists(*names))


def cpu_keys(app_keys: AppKeys) -> list[str]:
    """The keys of the app's CPU grants (app-wide, per process): either one held puts its
    requests in the priority lane (beat reads them in round.lua)."""
    return [app_keys.efficiency(ResourceType.CPU, process) for process in (False, True)]


def lane(client: Any, app_keys: AppKeys) -> int:
    """The Celery priority to publish the app's requests with: the priority lane while the
    app holds CPU, else the normal lane (kombu's Redis transport serves 0 first)."""
    return PRIORITY_LANE if held(client, app_keys, ResourceType.CPU) else NORMAL_LANE


def warning_lead(app: BackgroundApp, budget: float) -> float:
    """How long before its deadline a task's expiration handler runs.

    Normally `Limits.warning_lead` (at most a fifth of the budget); while the app holds CPU
    the cap is lifted, and the handler runs the full `expiration_warning` before the
    deadline as long as that still falls inside the budget. Asks Redis only when the cap
    would bind, so default budgets cost no round trip.
    """
    limits = app.limits
    lead = limits.warning_lead(budget)
    if not lead < limits.expiration_warning < budget or not app.system:
        return lead
    try:
        cpu = granted(app, ResourceType.CPU)
    except Exception as exc:  # a broker blip must not kill the watchdog: keep the cap
        log.warning("could not look up the CPU grant of %s: %s", app.app_id, type(exc).__name__)
        return lead
    return limits.expiration_warning if cpu else lead


# -- beat --------------------------------------------------------------------------------


def dispatch(beat: Any, app: AppKeys) -> float:
    """Nothing to dispatch: grants act when others publish or run (beat EXTENSIONS hook)."""
    return float("inf")


def sweep(beat: Any, app: AppKeys, live: dict[str, dict[str, Any]]) -> None:
    """Release process-level grants once the app has no live worker left: its processes
    are gone, as a phone releases a process's grants when the process dies."""
    if live:
        return
    released = beat.scripts.efficiency_sweep(
        keys=[app.alive, *(app.efficiency(t, True) for t in ALL_TYPES)], args=[]
    )
    if released:
        log.info("released %d process-level grant(s) of %s: no live worker", released, app.app_id)
