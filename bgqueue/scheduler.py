"""The producer's scheduler for one scope (Apple's BGTaskScheduler).

Every change is one Lua script call, so a refused submit writes nothing and a
replaced request never coexists with its replacement.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from bgqueue import efficiency, tracing
from bgqueue.errors import (
    ImmediateRunIneligible,
    NotPermitted,
    ParameterError,
    TooManyPendingTaskRequests,
    Unavailable,
)
from bgqueue.model import keys
from bgqueue.model.requests import (
    BGTaskRequest,
    ContinuedProcessingStrategy,
    ContinuedProcessingTaskRequest,
    TaskRecord,
    check_name,
    from_record,
    requirement_names,
)
from bgqueue.model.scripts import ScriptCall

if TYPE_CHECKING:
    # The façade's part this module uses, by the name it stands for (model/context.py).
    from bgqueue.model.context import AppContext as BackgroundApp


# submit.lua's ARGV, 0-based: where the places and the requests (two values each) are,
# and how many values the place 'now' adds before the requests.
_PLACES, _REQUESTS, _NOW_ARGS = 5, 6, 4


class Scheduler:
    """Submit, list, cancel and inspect the requests of one scope of an app."""

    def __init__(self, app: BackgroundApp, scope: str) -> None:
        self.app = app
        self.scope = check_name(scope, "scope")

    # Each producer call has a sync and an asyncio twin (Django's `a` prefix). Both build
    # their script call with one `_<name>_call` and read its reply with one
    # `_<name>_result`, so the checks, the script's KEYS/ARGV and the errors stay one copy.

    def submit(self, request: BGTaskRequest) -> None:
        """Schedule a request, replacing the not-yet-started one with the same identifier."""
        self.submit_many([request])

    async def asubmit(self, request: BGTaskRequest) -> None:
        """`submit` from an event loop, without blocking it."""
        await self.asubmit_many([request])

    def submit_many(self, requests: Iterable[BGTaskRequest]) -> None:
        """Schedule a batch atomically: every request is accepted, or none is."""
        call = self._submit_call(list(requests))
        while call is not None:
            call = self._submit_result(call, self.app.call(*call))

    async def asubmit_many(self, requests: Iterable[BGTaskRequest]) -> None:
        """`submit_many` from an event loop, without blocking it."""
        call = self._submit_call(list(requests))
        while call is not None:
            call = self._submit_result(call, await self.app.acall(*call))

    def _submit_call(self, batch: list[BGTaskRequest]) -> ScriptCall | None:
        """Check every request of the batch and build its submit.lua call (None for an
        empty batch), with the keys of the places its requests go to. The script wakes
        beat itself; the call also names the app to beat (`announce`, once per process)."""
        limits = self.app.limits
        traced = tracing.submitting(self.app.app_id, self.scope)  # None while tracing is off
        args: list[Any] = [
            limits.max_pending_refresh,
            limits.max_pending_processing,
            self.scope,
            keys.BEAT_WAKE,
            self.app.app_id,
            "",  # the places, set by _placed
        ]
        places = set()
        for request in batch:
            record, profile, begin = self._check(request)
            if traced is not None:
                record = traced(request, record)
            args += (request.identifier, record)
            places.add(str(profile))
            if (
                isinstance(request, ContinuedProcessingTaskRequest)
                and request.strategy is ContinuedProcessingStrategy.FAIL
            ):
                places.add("slots")  # it must start now: free slots are counted
        if not batch:
            return None
        if len(batch) == 1 and "slots" not in places and begin <= time.time() * 1000:
            # Due now: the script may dispatch it itself (its pass 4), with this message id.
            lease_ms = int(self.app.settings.dispatch_lease * 1000)
            message = [str(uuid.uuid4()), *_requires_text(profile), lease_ms]
            args[_REQUESTS:_REQUESTS] = message
            places.add("now")
        return self._placed(args, list(places))

    def _placed(self, args: list[Any], places: list[str]) -> ScriptCall:
        """The submit.lua call of these arguments with the keys of these places (the
        script's header names them)."""
        app_keys = self.app.keys
        script_keys = [app_keys.requests(self.scope), app_keys.counts]
        for place in places:
            if place.isdigit():  # a profile
                profile = int(place)
                script_keys += [app_keys.due_all[profile], app_keys.sched(profile, self.scope)]
            elif place == "parked":
                script_keys.append(app_keys.parked)
            elif place == "dispatched":
                script_keys.append(app_keys.leases)
            elif place == "deadletter":
                script_keys.append(app_keys.deadletter)
            elif place == "now":
                script_keys += [app_keys.routes, app_keys.classlive, app_keys.seq]
                script_keys += [app_keys.leases, *efficiency.cpu_keys(app_keys)]
            else:  # slots
                script_keys += [app_keys.workers, app_keys.alive, app_keys.running]
                script_keys += [app_keys.classes, app_keys.leases]
        args[_PLACES] = " ".join(places)
        return ScriptCall("submit", script_keys, args, announce=True)

    def _submit_result(self, call: ScriptCall, result: int | list[Any]) -> ScriptCall | None:
        """None if submit.lua accepted the batch; the call again with more keys if the
        script asked for them (what a request it replaces needs, the dead letter); else
        raise why it refused the batch."""
        if isinstance(result, int):  # how many it replaced
            return None
        if result[0] == b"places":
            places = call.args[_PLACES].split() + result[1].decode().split()
            return self._placed(list(call.args), places)
        if result[0] == b"foreign":
            raise _foreign(result, "nothing was scheduled")
        if result[0] == b"busy":
            raise ImmediateRunIneligible(
                f"continued-processing requests must start now, but live workers that can run "
                f"them (requirements {requirement_names(int(result[1]))}) have "
                f"{max(int(result[2]), 0)} free slot(s); nothing was scheduled. "
                "Use strategy=QUEUE to wait for a worker"
            )
        index, kind = int(result[1]), result[2].decode()
        allowed = getattr(self.app.limits, f"max_pending_{kind}")
        first = _REQUESTS + (_NOW_ARGS if "now" in call.args[_PLACES].split() else 0)
        identifier = call.args[first + 2 * index]
        raise TooManyPendingTaskRequests(
            f"scope {self.scope!r} already has {allowed} pending {kind} request(s); "
            f"{identifier!r} was not scheduled (nothing in the batch was). "
            "Cancel one or wait for it to run."
        )

    def _check(self, request: BGTaskRequest) -> tuple[str, int, int]:
        """The request's record, profile and earliest-begin ms, once it is valid and
        permitted."""
        if not isinstance(request, BGTaskRequest):
            raise ParameterError(f"expected a task request, got {type(request).__name__}")
        record, profile, begin = request.record()
        if not self.app.is_permitted(request.identifier):
            raise NotPermitted(
                f"identifier {request.identifier!r} is not in the permitted identifiers of "
                f"{self.app.app_id!r}; add it to BackgroundApp(permitted_identifiers=...)"
            )
        return record, profile, begin

    def cancel(self, identifier: str) -> bool:
        """Cancel the not-yet-started request with this identifier; True if there was one."""
        return self._cancel_result(self.app.call(*self._cancel_call([identifier]))) > 0

    async def acancel(self, identifier: str) -> bool:
        """`cancel` from an event loop, without blocking it."""
        return self._cancel_result(await self.app.acall(*self._cancel_call([identifier]))) > 0

    def cancel_all(self) -> int:
        """Cancel every not-yet-started request of this scope; returns how many."""
        return self._cancel_result(self.app.call(*self._cancel_call([])))

    async def acancel_all(self) -> int:
        """`cancel_all` from an event loop, without blocking it."""
        return self._cancel_result(await self.app.acall(*self._cancel_call([])))

    def _cancel_call(self, identifiers: Sequence[str]) -> ScriptCall:
        """Check the identifiers and build the cancel.lua call (no identifier: all)."""
        checked = [check_name(identifier, "identifier") for identifier in identifiers]
        app_keys = self.app.keys
        script_keys = [*app_keys.due_all, *app_keys.sched_all(self.scope)]
        script_keys += [app_keys.requests(self.scope), app_keys.leases, app_keys.parked]
        script_keys += [app_keys.history(self.scope), app_keys.counts, app_keys.deadletter]
        args = [self.scope, *self.app.settings.history, *checked]
        return ScriptCall("cancel", script_keys, args)

    @staticmethod
    def _cancel_result(result: int | list[bytes]) -> int:
        """How many cancel.lua cancelled, or why it wrote nothing."""
        if isinstance(result, list):
            raise _foreign(result, "nothing was cancelled")
        return int(result)

    def pending_task_requests(self) -> list[BGTaskRequest]:
        """Copies of the requests not yet started (pending or dispatched), earliest first."""
        with self.app.service():
            raw = self.app.client.hgetall(self.app.keys.requests(self.scope))
        return _copies(raw)

    async def apending_task_requests(self) -> list[BGTaskRequest]:
        """`pending_task_requests` from an event loop, without blocking it."""
        client = await self.app.aclient()
        with self.app.service():
            raw = await client.hgetall(self.app.keys.requests(self.scope))
        return _copies(raw)

    def history(self, limit: int = 100) -> list[TaskRecord]:
        """The scope's most recent finished or cancelled runs, newest first."""
        _check_limit(limit)
        with self.app.service():
            entries = self.app.client.lrange(self.app.keys.history(self.scope), 0, limit - 1)
        return _records(entries)

    async def ahistory(self, limit: int = 100) -> list[TaskRecord]:
        """`history` from an event loop, without blocking it."""
        _check_limit(limit)
        client = await self.app.aclient()
        with self.app.service():
            entries = await client.lrange(self.app.keys.history(self.scope), 0, limit - 1)
        return _records(entries)

    def simulate_launch(self, identifier: str) -> bool:
        """Make a pending request due now, ignoring its earliest-begin date (Apple's
        `_simulateLaunchForTaskWithIdentifier`). Requirements and handlers still apply."""
        check_name(identifier, "identifier")
        app_keys = self.app.keys
        with self.app.service():
            raw = self.app.client.hget(app_keys.requests(self.scope), identifier)
        try:
            profile = int(json.loads(raw)["r"])
        except (TypeError, ValueError, KeyError):  # none, or not a request's record
            return False
        script_keys = [
            app_keys.requests(self.scope),
            app_keys.sched(profile, self.scope),
            app_keys.due(profile),
        ]
        args = [self.scope, identifier, profile]
        return bool(self.app.call("launch", script_keys, args, wake=True))

    def simulate_expiration(self, identifier: str) -> int:
        """Run the expiration handler of every running task with this identifier now
        (Apple's `_simulateExpirationForTaskWithIdentifier`); returns how many."""
        check_name(identifier, "identifier")
        with self.app.service():
            running = self.app.client.hgetall(self.app.keys.running)
            gens = [gen for gen, raw in running.items() if _runs(raw, self.scope, identifier)]
            if gens:
                self.app.client.sadd(self.app.keys.expire, *gens)
        return len(gens)


def _runs(raw: bytes, scope: str, identifier: str) -> bool:
    """Whether a running record is a run of this identifier in this scope."""
    try:
        record = json.loads(raw)
        return bool(record["sc"] == scope and record["i"] == identifier)
    except (ValueError, KeyError, TypeError):
        return False


@functools.cache
def _requires_text(profile: int) -> tuple[str, str]:
    """A profile's requirement names as JSON and as Python's repr, as a run message's
    kwargs carry them (submit.lua writes the message of a request it dispatches)."""
    names = requirement_names(profile)
    return json.dumps(names), repr(names)


def _copies(raw: dict[bytes, bytes]) -> list[BGTaskRequest]:
    """Request copies from a scope's hash (HGETALL), earliest first. A record bgqueue did
    not write is left out (the scripts that meet it dead-letter it)."""
    found = []
    for field, value in raw.items():
        if field.startswith(b"#"):
            continue
        try:
            record = json.loads(value)
            found.append((record["e"], field.decode(), from_record(field.decode(), record)))
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    found.sort(key=lambda entry: (entry[0], entry[1]))
    return [request for _, _, request in found]


def _records(entries: list[bytes]) -> list[TaskRecord]:
    """TaskRecords of history entries, newest first; an entry bgqueue did not write is
    left out."""
    found = []
    for entry in entries:
        try:
            found.append(TaskRecord.from_json(entry))
        except (ValueError, KeyError, TypeError):
            continue
    return found


def _check_limit(limit: object) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ParameterError(f"limit must be a positive integer, got {limit!r}")


def _foreign(result: list[bytes], outcome: str) -> Unavailable:
    """A script's {'foreign', key, type} reply: a key it would write holds foreign data."""
    key, found = result[1].decode(), result[2].decode()
    return Unavailable(
        f"{key} holds a {found}, not what bgqueue keeps there; {outcome}. "
        "Beat moves such keys into the dead letter (bgqueue status shows it)"
    )
