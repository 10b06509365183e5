"""Beat: releases due requests to workers that can run them.

One beat leads at a time, by a renewed lease in Redis; standbys wait to take
over. The leader sleeps until the next due time or until a submit, a worker's
arrival or a sweep wakes it; there is no fixed polling of the due sets. Claims are
atomic per request (claim.lua), so even two leaders at once dispatch each
request once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from bgqueue import continuous, deadletter, efficiency, keys, logs, works
from bgqueue.broker import connect
from bgqueue.celery_config import celery_config
from bgqueue.conditions import profiles
from bgqueue.metrics import BeatMetrics
from bgqueue.scripts import Scripts
from bgqueue.settings import Settings

log = logging.getLogger("bgqueue.beat")

# Dispatchers of other kinds of work (continuous tasks, the work scheduler): each module
# has `dispatch(beat, app, live) -> seconds until it next needs beat` and
# `sweep(beat, app, live)`, called with the app's live workers' heartbeats.
EXTENSIONS: tuple[Any, ...] = (continuous, works, efficiency)

MAX_SLEEP = 5.0  # stays under the client's socket timeout while blocked in BLPOP

# Errors of decoding data that is not bgqueue's (json's errors are ValueErrors).
DATA_ERRORS = (ValueError, KeyError, TypeError, IndexError, AttributeError)


@dataclass
class Claimed:
    """A request claimed for dispatch, ready to publish."""

    member: str
    gen: int
    profile: int
    begin: int = 0  # ms it may start: its earliest-begin date, or when it became pending


class Beat:
    """The dispatcher process. `run()` blocks until `stop()`."""

    def __init__(self, broker_url: str, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        # Any: redis-py annotates sync results as `Awaitable | Any`, which mypy cannot use.
        self.client: Any = connect(broker_url)
        self.scripts = Scripts(self.client)
        self.celery = Celery("bgqueue-beat", set_as_current=False)
        self.celery.conf.update(celery_config(broker_url))
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stopping = threading.Event()
        self.offset = 0.0  # server clock minus local clock, seconds
        self.dispatched = 0
        self.metrics: BeatMetrics | None = None  # set to serve metrics (metrics.serve_beat)

    # -- leadership -----------------------------------------------------------

    def _lease(self, ms: int) -> bool:
        return bool(self.scripts.lease(keys=[keys.BEAT_LEASE], args=[self.token, ms]))

    def run(self) -> None:
        """Lead when the lease is free, stand by otherwise, until stopped."""
        lease_ms = int(self.settings.beat_lease * 1000)
        try:
            while not self.stopping.is_set():
                try:
                    if self._lease(lease_ms):
                        log.info("beat %s leads", self.token)
                        self._lead()
                        log.info("beat %s no longer leads", self.token)
                        continue
                except Exception as exc:  # broker down or restarting: keep trying, never exit
                    log.warning("beat %s: %s: %s; retrying", self.token, type(exc).__name__, exc)
                self.stopping.wait(self.settings.beat_lease / 3)
        finally:
            with contextlib.suppress(redis.RedisError):
                self._lease(0)

    def stop(self) -> None:
        """Ask `run` to return; it releases the lease on the way out."""
        self.stopping.set()

    def _lead(self) -> None:
        renew_every = self.settings.beat_lease / 3
        renew_at = time.monotonic() + renew_every
        sweep_at = 0.0
        # Subscribed before the first dispatch, so a submit during a dispatch is not missed:
        # its wake-up waits in the subscription until the next wait.
        wakes = self.client.pubsub(ignore_subscribe_messages=True)
        wakes.subscribe(keys.BEAT_WAKE)
        try:
            while not self.stopping.is_set():
                if time.monotonic() >= renew_at:
                    if not self._lease(int(self.settings.beat_lease * 1000)):
                        return
                    renew_at = time.monotonic() + renew_every
                if time.monotonic() >= sweep_at:
                    self.sweep()
                    sweep_at = time.monotonic() + self.settings.sweep_interval
                next_due = self.dispatch()
                now = time.monotonic()
                self._wait(wakes, min(next_due, sweep_at - now, renew_at - now, MAX_SLEEP))
        finally:
            wakes.close()
            if self.metrics is not None:
                self.metrics.clear()

    @staticmethod
    def _wait(wakes: Any, timeout: float) -> None:
        """Sleep until a wake-up message or the timeout, then drop any other queued wake-ups."""
        if timeout > 0 and wakes.get_message(timeout=timeout) is None:
            return
        while wakes.get_message(timeout=0) is not None:
            pass

    # -- dispatch -------------------------------------------------------------

    def server_ms(self) -> int:
        """Now on the Redis server's clock, the one every lease and due time uses."""
        return int((time.time() + self.offset) * 1000)

    def apps(self) -> list[keys.AppKeys]:
        """Keys of every app that has submitted or run work on this broker."""
        return [keys.AppKeys(raw.decode()) for raw in sorted(self.client.smembers(keys.APPS))]

    def dispatch(self) -> float:
        """Dispatch everything due and runnable; seconds until the next due request."""
        next_due = float("inf")
        for app in self.apps():
            with self.isolated(app, "dispatch"):
                live = self.live_workers(app)
                next_due = min(next_due, self._dispatch_app(app, live))
                for extension in EXTENSIONS:
                    next_due = min(next_due, extension.dispatch(self, app, live))
        return next_due

    @contextlib.contextmanager
    def isolated(self, app: keys.AppKeys, step: str) -> Iterator[None]:
        """Keep one app's unreadable data from stopping beat for every app: a key of the
        wrong type is moved into the app's dead letter (bgqueue.deadletter), and any other
        data error is logged; the app is tried again on the next round. Connection errors
        go on up (the lease loop retries them)."""
        try:
            yield
        except redis.ResponseError as exc:
            moved = deadletter.quarantine(self.client, app)
            log.error("%s of %s failed: %s; moved aside: %s", step, app.app_id, exc, moved)
        except DATA_ERRORS as exc:
            log.error(
                "%s of %s met unreadable data: %s: %s", step, app.app_id, type(exc).__name__, exc
            )

    def live_workers(self, app: keys.AppKeys) -> dict[str, dict[str, Any]]:
        """Heartbeats of the app's live workers, by name (judged on the server's clock)."""
        forget_ms = int(self.settings.heartbeat_timeout * 1000 * 60)
        raw = self.scripts.workers(keys=[app.workers, app.alive], args=[forget_ms])
        now = int(raw[0])
        self.offset = now / 1000 - time.time()
        return {
            raw[i].decode(): json.loads(raw[i + 2])
            for i in range(1, len(raw), 3)
            if float(raw[i + 1]) > now
        }

    def _dispatch_app(self, app: keys.AppKeys, live: dict[str, dict[str, Any]]) -> float:
        eligible = sorted({p for beat in live.values() for p in profiles(beat["conditions"])})
        if self.metrics is not None:
            self.metrics.note_capable(app.app_id, eligible, self.server_ms())
        batch = self.settings.claim_batch
        while eligible:
            # Per profile, what is due now (up to a batch) and the first one not yet due:
            # a million waiting requests cost nothing to look past.
            now = self.server_ms()
            with self.client.pipeline(transaction=False) as pipe:
                for profile in eligible:
                    pipe.zrangebyscore(app.due(profile), "-inf", now, start=0, num=batch)
                    pipe.zrangebyscore(
                        app.due(profile), f"({now}", "+inf", start=0, num=1, withscores=True
                    )
                heads = pipe.execute()
            next_due = float("inf")
            full: list[int] = []
            for i, profile in enumerate(eligible):
                due, later = heads[2 * i], heads[2 * i + 1]
                if later:
                    next_due = min(next_due, (later[0][1] - now) / 1000)
                if due:
                    self._claim_and_publish(app, profile, [m.decode() for m in due])
                if len(due) == batch:
                    full.append(profile)
            if not full:
                return next_due
            eligible = full  # more may be due behind a full batch
        return float("inf")

    def _claim_and_publish(self, app: keys.AppKeys, profile: int, members: list[str]) -> None:
        script_keys = [app.due(profile), app.leases, app.seq, app.counts]
        script_keys += [app.requests(keys.split_member(m)[0]) for m in members]
        script_keys.append(app.deadletter)
        claim_ms = int(self.settings.claim_lease * 1000)
        claimed = _claimed(self.scripts.claim(keys=script_keys, args=[claim_ms, *members]))
        if self.metrics is not None:
            self.metrics.observe_claims(app.app_id, claimed, self.server_ms())
        self.publish(app, claimed)

    def publish(self, app: keys.AppKeys, claimed: list[Claimed]) -> None:
        """Send each claimed request to its profile's queue, then extend its lease.

        While the app holds the CPU efficiency resource its requests go in the priority
        lane, which workers serve before the messages already waiting (efficiency.lane).
        """
        if not claimed:
            return
        priority = efficiency.lane(self.client, app)
        # One pipelined round trip for the batch (kombu's publish batch), not one per message.
        with self.celery.producer_or_acquire() as producer, producer.batch():
            for item in claimed:
                scope, identifier = keys.split_member(item.member)
                self.celery.send_task(
                    identifier,
                    kwargs={"scope": scope, "gen": item.gen, "profile": item.profile},
                    queue=app.queue(item.profile),
                    priority=priority,
                    producer=producer,
                )
        until = self.server_ms() + int(self.settings.dispatch_lease * 1000)
        self.client.zadd(app.leases, {item.member: until for item in claimed}, xx=True)
        self.dispatched += len(claimed)

    # -- recovery -------------------------------------------------------------

    def sweep(self) -> None:
        """Publish again what was claimed but not delivered; requeue runs whose lease lapsed."""
        seen = []
        for app in self.apps():
            with self.isolated(app, "sweep"):
                self._sweep_dispatches(app)
                self._sweep_runs(app)
                live = self.live_workers(app)
                for extension in EXTENSIONS:
                    extension.sweep(self, app, live)
                seen.append((app, live))
        if self.metrics is not None:  # the gauges are refreshed here, not on every dispatch
            self.metrics.refresh(self, seen)

    def _sweep_dispatches(self, app: keys.AppKeys) -> None:
        batch = self.settings.claim_batch
        lapsed = self.client.zrangebyscore(app.leases, "-inf", self.server_ms(), start=0, num=batch)
        if not lapsed:
            return
        members = [m.decode() for m in lapsed]
        script_keys = [app.leases] + [app.requests(keys.split_member(m)[0]) for m in members]
        script_keys.append(app.deadletter)
        lease_ms = int(self.settings.dispatch_lease * 1000)
        lapsed_claims = _claimed(self.scripts.lapsed(keys=script_keys, args=[lease_ms, *members]))
        # A message still queued behind others is not lost, only waiting: its lease was
        # renewed above, and publishing it again would only grow the backlog.
        profiles = sorted({item.profile for item in lapsed_claims})
        # kombu keeps each priority step of a queue in a list of its own: count them all.
        steps = len(app.KOMBU_PRIORITY_STEPS)
        with self.client.pipeline(transaction=False) as pipe:
            for profile in profiles:
                for name in app.queue_lists(profile):
                    pipe.llen(name)
            lengths = pipe.execute()
        drained = {
            p for i, p in enumerate(profiles) if not sum(lengths[i * steps : (i + 1) * steps])
        }
        again = [item for item in lapsed_claims if item.profile in drained]
        if again:
            log.warning("publishing %d lapsed dispatch(es) of %s again", len(again), app.app_id)
        self.publish(app, again)

    def _sweep_runs(self, app: keys.AppKeys) -> None:
        batch = self.settings.claim_batch
        lapsed = self.client.zrangebyscore(
            app.runleases, "-inf", self.server_ms(), start=0, num=batch
        )
        for gen in lapsed:
            raw = self.client.hget(app.running, gen)
            if raw is None:
                self.client.zrem(app.runleases, gen)
                continue
            record: dict[str, Any] = json.loads(raw)
            scope = record["sc"]
            script_keys = [
                app.running,
                app.runleases,
                app.history(scope),
                app.requests(scope),
                app.due(record["r"]),
                app.expire,
                app.counts,
            ]
            args = [gen, self.settings.history_limit, self.settings.max_attempts]
            outcome = self.scripts.recover(keys=script_keys, args=args)
            if not outcome:
                continue
            if self.metrics is not None:
                self.metrics.lost_run(app.app_id, record["k"])
            with logs.request(app.app_id, scope, record["i"], int(gen)):
                log.warning(
                    "run %s of %s/%s lost its worker %s: %s",
                    gen.decode(),
                    scope,
                    record["i"],
                    record["w"],
                    "requeued" if outcome == 1 else "not requeued",
                )


def _claimed(raw: list[Any]) -> list[Claimed]:
    claimed = []
    for i in range(0, len(raw), 3):
        record = json.loads(raw[i + 2])
        member, gen = raw[i].decode(), int(raw[i + 1])
        begin = max(int(record["e"]), int(record.get("t", 0)))
        claimed.append(Claimed(member, gen, int(record["r"]), begin))
    return claimed
