"""The producer's scheduler for one scope (Apple's BGTaskScheduler).

Every change is one Lua script call, so a refused submit writes nothing and a
replaced request never coexists with its replacement.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from bgqueue import keys
from bgqueue.errors import (
    ImmediateRunIneligible,
    NotPermitted,
    ParameterError,
    TooManyPendingTaskRequests,
    Unavailable,
)
from bgqueue.requests import (
    BGTaskRequest,
    ContinuedProcessingStrategy,
    ContinuedProcessingTaskRequest,
    State,
    TaskRecord,
    check_name,
    from_record,
)
from bgqueue.scripts import ScriptCall

if TYPE_CHECKING:
    from bgqueue.app import BackgroundApp


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
        batch = list(requests)
        call = self._submit_call(batch)
        if call is None:
            return
        self._check_start_now(batch)
        self._submit_result(batch, self.app.call(*call))  # submit.lua wakes beat itself
        self.app.announce()

    async def asubmit_many(self, requests: Iterable[BGTaskRequest]) -> None:
        """`submit_many` from an event loop, without blocking it."""
        batch = list(requests)
        call = self._submit_call(batch)
        if call is None:
            return
        if _must_start_now(batch):
            # The sync check's reads, in a thread: the loop serves other tasks meanwhile.
            # (Once submit.lua checks free slots itself, both twins drop this pre-check.)
            await asyncio.to_thread(self._check_start_now, batch)
        self._submit_result(batch, await self.app.acall(*call))
        await self.app.aannounce()

    def _submit_call(self, batch: list[BGTaskRequest]) -> ScriptCall | None:
        """Check every request of the batch and build its submit.lua call (None for an
        empty batch)."""
        app_keys = self.app.keys
        limits = self.app.limits
        args: list[Any] = [
            limits.max_pending_refresh,
            limits.max_pending_processing,
            keys.member(self.scope, ""),
            keys.BEAT_WAKE,
            self.app.app_id,
        ]
        for request in batch:
            record, profile, begin = self._check(request)
            args += [request.identifier, record, profile, begin, request.kind]
        if not batch:
            return None
        script_keys = [*app_keys.due_all, app_keys.leases, app_keys.counts]
        script_keys += [app_keys.requests(self.scope), app_keys.deadletter]
        return ScriptCall("submit", script_keys, args)

    def _submit_result(self, batch: list[BGTaskRequest], result: list[Any]) -> None:
        """Return if submit.lua accepted the batch, else raise why it did not."""
        if result[0] == b"ok":
            return
        if result[0] == b"foreign":
            raise _foreign(result, "nothing was scheduled")
        index, kind = int(result[1]), result[2].decode()
        allowed = getattr(self.app.limits, f"max_pending_{kind}")
        raise TooManyPendingTaskRequests(
            f"scope {self.scope!r} already has {allowed} pending {kind} request(s); "
            f"{batch[index].identifier!r} was not scheduled (nothing in the batch was). "
            "Cancel one or wait for it to run."
        )

    def _check(self, request: BGTaskRequest) -> tuple[str, int, int]:
        """The request's record, profile and earliest-begin ms, once it is valid and
        permitted."""
        if not isinstance(request, BGTaskRequest):
            raise ParameterError(f"expected a task request, got {type(request).__name__}")
        record = request.record()
        if not self.app.is_permitted(request.identifier):
            raise NotPermitted(
                f"identifier {request.identifier!r} is not in the permitted identifiers of "
                f"{self.app.app_id!r}; add it to BackgroundApp(permitted_identifiers=...)"
            )
        return record

    def _check_start_now(self, batch: list[BGTaskRequest]) -> None:
        """Continued-processing requests with the FAIL strategy need a free slot each, now."""
        for profile, count in _must_start_now(batch).items():
            free = self.app.free_slots(profile)
            if free < count:
                raise ImmediateRunIneligible(
                    f"{count} continued-processing request(s) must start now, but live workers "
                    f"that can run them have {max(free, 0)} free slot(s); nothing was scheduled. "
                    "Use strategy=QUEUE to wait for a worker"
                )

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
        script_keys = [
            *app_keys.due_all,
            app_keys.leases,
            app_keys.requests(self.scope),
            app_keys.history(self.scope),
            app_keys.counts,
            app_keys.deadletter,
        ]
        args = [self.scope, self.app.settings.history_limit, *checked]
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
        return [TaskRecord.from_json(entry) for entry in entries]

    async def ahistory(self, limit: int = 100) -> list[TaskRecord]:
        """`history` from an event loop, without blocking it."""
        _check_limit(limit)
        client = await self.app.aclient()
        with self.app.service():
            entries = await client.lrange(self.app.keys.history(self.scope), 0, limit - 1)
        return [TaskRecord.from_json(entry) for entry in entries]

    def simulate_launch(self, identifier: str) -> bool:
        """Make a pending request due now, ignoring its earliest-begin date (Apple's
        `_simulateLaunchForTaskWithIdentifier`). Requirements still apply."""
        check_name(identifier, "identifier")
        with self.app.service():
            raw = self.app.client.hget(self.app.keys.requests(self.scope), identifier)
            if raw is None:
                return False
            record = json.loads(raw)
            if record["s"] != State.PENDING:
                return bool(record["s"] == State.DISPATCHED)
            member = keys.member(self.scope, identifier)
            with self.app.client.pipeline(transaction=False) as pipe:
                pipe.zadd(self.app.keys.due(record["r"]), {member: 0}, xx=True)
                pipe.publish(keys.BEAT_WAKE, self.app.app_id)
                pipe.execute()
        return True

    def simulate_expiration(self, identifier: str) -> int:
        """Run the expiration handler of every running task with this identifier now
        (Apple's `_simulateExpirationForTaskWithIdentifier`); returns how many."""
        check_name(identifier, "identifier")
        with self.app.service():
            running = self.app.client.hgetall(self.app.keys.running)
            gens = [
                gen
                for gen, raw in running.items()
                if (rec := json.loads(raw))["sc"] == self.scope and rec["i"] == identifier
            ]
            if gens:
                self.app.client.sadd(self.app.keys.expire, *gens)
        return len(gens)


def _must_start_now(batch: list[BGTaskRequest]) -> Counter[int]:
    """How many continued-processing requests with the FAIL strategy each profile has."""
    return Counter(
        request.profile
        for request in batch
        if isinstance(request, ContinuedProcessingTaskRequest)
        and request.strategy is ContinuedProcessingStrategy.FAIL
    )


def _copies(raw: dict[bytes, bytes]) -> list[BGTaskRequest]:
    """Request copies from a scope's hash (HGETALL), earliest first."""
    found = [
        (json.loads(value), field.decode())
        for field, value in raw.items()
        if not field.startswith(b"#")
    ]
    found.sort(key=lambda pair: (pair[0]["e"], pair[1]))
    return [from_record(identifier, record) for record, identifier in found]


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
