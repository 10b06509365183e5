"""Beat: releases due requests to workers that can run them.

One beat leads at a time, by a renewed lease in Redis; standbys wait to take over. The
leader sleeps until a request enters the dispatch window or until a submit, a worker's
arrival or a sweep wakes it; there is no fixed polling of the due sets.

Each pass serves every app in turn, a bounded amount of work each (one claim batch per
requirement profile), so one app's or one profile's burst never makes another wait
behind it. Per app, beat reads its *view* of the live worker classes (bgqueue/worker/):
which profiles they satisfy and which handlers they have. A due request goes to the
queue of a class that can run it; one that no live class has the handler for is parked
until one arrives. Requests due within the dispatch window are sent ahead, with their
date as Celery's ETA. Claims are atomic per request (lua/claim.lua), so even two leaders
at once dispatch each request once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import redis

from bgqueue import continuous, efficiency, works
from bgqueue.broker import connect, deadletter, messages
from bgqueue.model import keys
from bgqueue.model.requests import PROFILE_COUNT, requirement_names
from bgqueue.model.scripts import Scripts
from bgqueue.model.settings import Settings
from bgqueue.telemetry import logs
from bgqueue.telemetry.metrics import BeatMetrics

log = logging.getLogger("bgqueue.beat")

# Dispatchers of other kinds of work (continuous tasks, the work scheduler): each module
# has `dispatch(beat, app) -> seconds until it next needs beat` and `sweep(beat, app, live)`,
# called with the app's live workers' heartbeats.
EXTENSIONS: tuple[Any, ...] = (continuous, works, efficiency)

MAX_SLEEP = 5.0  # stays under the client's socket timeout while blocked on wake-ups
EARLY_MS = 2  # a request due sooner than this goes without an ETA

# Errors of decoding data that is not bgqueue's (json's errors are ValueErrors).
DATA_ERRORS = (ValueError, KeyError, TypeError, IndexError, AttributeError)

Live = dict[str, dict[str, Any]]  # live workers' heartbeats by name


@dataclass
class Claimed:
    """A request claimed for dispatch, ready to publish."""

    scope: str
    identifier: str
    gen: int
    class_id: str
    profile: int
    date: int = 0  # earliest-begin ms: sent with an ETA if still ahead
    since: int = 0  # ms it may start: its earliest-begin date, or when it became pending


@dataclass
class View:
    """An app's live worker classes as beat sees them on one pass."""

    now: int  # Redis's clock, ms
    classes: frozenset[str]
    # profile -> identifier -> the live classes that satisfy the profile and have the handler
    routes: dict[int, dict[str, list[str]]] = field(default_factory=dict)


class Round(NamedTuple):
    """What one dispatch pass over an app reads (round.lua)."""

    now: int  # Redis's clock, ms
    live: frozenset[str]  # live worker classes
    lane: int  # the Celery priority its requests go out with (efficiency.lane)
    heads: dict[int, tuple[list[str], list[Any]]]  # profile -> (scopes due, [scope, date])


ALL_PROFILES = list(range(PROFILE_COUNT))


class Beat:
    """The dispatcher process. `run()` blocks until `stop()`."""

    def __init__(self, broker_url: str, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        # Any: redis-py annotates sync results as `Awaitable | Any`, which mypy cannot use.
        self.client: Any = connect(broker_url)
        self.scripts = Scripts(self.client)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stopping = threading.Event()
        self.offset = 0.0  # server clock minus local clock, seconds
        self.dispatched = 0
        self.metrics: BeatMetrics | None = None  # set to serve metrics (metrics.serve_beat)
        self.known_apps: set[str] = set()  # learnt from wake-ups too
        self._apps_read_at = -math.inf
        self._class_defs: dict[tuple[str, str], dict[str, Any]] = {}
        self._seen_classes: dict[str, frozenset[str]] = {}
        self._served: dict[str, list[int]] = {}  # app -> the profiles its live classes serve
        self._routes: dict[str, dict[str, str]] = {}  # app -> its `routes` as last written
        self._unpark_from: dict[str, int] = {}  # app -> offset in `parked` still to look at
        self._idle_since: dict[str, float] = {}  # app -> monotonic time it was first seen idle

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
        self._seen_classes.clear()  # a new leader looks at parked requests afresh
        self._routes.clear()  # and writes the routes it sees
        self.discover()
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

    def _wait(self, wakes: Any, timeout: float) -> None:
        """Sleep until a wake-up message or the timeout, then take in every queued wake-up.
        A wake-up names its app, so submitting alone makes an app known to beat."""
        message = wakes.get_message(timeout=timeout) if timeout > 0 else None
        while message is not None:
            if message.get("type") == "message":
                self._learn(message["data"])
            message = wakes.get_message(timeout=0)

    def _learn(self, data: Any) -> None:
        app_id = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
        if app_id not in self.known_apps and keys.is_app_id(app_id):
            self.known_apps.add(app_id)
            self.client.sadd(keys.APPS, app_id)

    # -- dispatch -------------------------------------------------------------

    def server_ms(self) -> int:
        """Now on the Redis server's clock, the one every lease and due time uses."""
        return int((time.time() + self.offset) * 1000)

    def apps(self) -> list[keys.AppKeys]:
        """Keys of every app that has submitted or run work on this broker. The index is
        read again once per sweep interval: in between, wake-ups name the apps that submit.
        An app beat knows but the index lost (a restore, a hand-edit) is named there again:
        a producer names its app once per process."""
        if time.monotonic() - self._apps_read_at >= self.settings.sweep_interval:
            named = {raw.decode() for raw in self.client.smembers(keys.APPS)}
            if self.known_apps - named:
                self.client.sadd(keys.APPS, *(self.known_apps - named))
            self.known_apps |= named
            self._apps_read_at = time.monotonic()
        return [keys.AppKeys(app_id) for app_id in sorted(self.known_apps)]

    def discover(self) -> None:
        """Name in `bgqueue:apps` every app with requests waiting (its counts exist). A
        producer names its app once per process, and its submits' wake-ups reach a beat that
        leads; so an app beat forgot, that submitted while no beat led, is found here, when
        a beat takes the lead: one SCAN of the keyspace."""
        found = set()
        for name in self.client.scan_iter(match=keys.COUNTS_PATTERN, count=1000):
            app_id = keys.app_of(name.decode(errors="replace"))
            if app_id is not None:
                found.add(app_id)
        if found:
            self.client.sadd(keys.APPS, *found)
            self.known_apps |= found

    def dispatch(self) -> float:
        """One pass: a bounded share of each app's due work, apps in turn. Returns seconds
        until beat is next needed (0 when some app has more due now)."""
        next_due = float("inf")
        for app in self.apps():
            with self.isolated(app, "dispatch"):
                next_due = min(next_due, self._dispatch_app(app))
                for extension in EXTENSIONS:
                    next_due = min(next_due, extension.dispatch(self, app))
        return next_due

    @contextlib.contextmanager
    def isolated(self, app: keys.AppKeys, step: str) -> Iterator[None]:
        """Keep one app's unreadable data from stopping beat for every app: a key of the
        wrong type is moved into the app's dead letter (bgqueue.broker.deadletter), and any other
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

    def view(self, app: keys.AppKeys, seen: tuple[int, frozenset[str]] | None = None) -> View:
        """The app's live classes and what each can run (class definitions are read once:
        a class id names its definition). `seen`: Redis's clock and the live classes, when
        the caller read them already (round.lua)."""
        if seen is None:
            raw = self.scripts.view(keys=[app.classlive, app.classes], args=[])
            seen = int(raw[0]), frozenset(c.decode() for c in raw[1])
        now, live = seen
        self.offset = now / 1000 - time.time()
        unknown = [c for c in live if (app.app_id, c) not in self._class_defs]
        if unknown:
            found = self.scripts.view(keys=[app.classlive, app.classes], args=unknown)[2:]
            for i in range(0, len(found), 2):
                self._class_defs[(app.app_id, found[i].decode())] = _class_def(found[i + 1])
        view = View(now, live)
        for class_id in sorted(live):
            definition = self._class_defs[(app.app_id, class_id)]
            for profile in range(PROFILE_COUNT):
                if definition["m"] >> profile & 1:
                    routes = view.routes.setdefault(profile, {})
                    for identifier in definition["h"]:
                        routes.setdefault(identifier, []).append(class_id)
        if live - self._seen_classes.get(app.app_id, frozenset()):
            self._unpark_from[app.app_id] = 0  # a class arrived: its handlers may be awaited
        self._seen_classes[app.app_id] = live
        return view

    def _round(self, app: keys.AppKeys, profiles: list[int]) -> Round:
        """What a dispatch pass reads (round.lua), in one round trip, for these profiles."""
        script_keys = [app.classlive, *efficiency.cpu_keys(app)]
        script_keys += [app.due(profile) for profile in profiles]
        args = [int(self.settings.dispatch_ahead * 1000), self.settings.claim_batch, *profiles]
        raw = self.scripts.round(keys=script_keys, args=args)
        heads = {
            profile: ([s.decode() for s in raw[3 + 2 * i]], raw[4 + 2 * i])
            for i, profile in enumerate(profiles)
        }
        live = frozenset(c.decode() for c in raw[1])
        lane = efficiency.PRIORITY_LANE if raw[2] else efficiency.NORMAL_LANE
        return Round(int(raw[0]), live, lane, heads)

    def class_of(self, app: keys.AppKeys, heartbeat: dict[str, Any]) -> dict[str, Any]:
        """The definition of a live worker's class (what it can run), from its heartbeat."""
        class_id = str(heartbeat.get("class", ""))
        if (app.app_id, class_id) not in self._class_defs:
            found = self.scripts.view(keys=[app.classlive, app.classes], args=[class_id])
            self._class_defs[(app.app_id, class_id)] = _class_def(found[3])
        return self._class_defs[(app.app_id, class_id)]

    def _dispatch_app(self, app: keys.AppKeys) -> float:
        # One round trip reads the live classes and the heads of the profiles they served
        # on the last pass (a profile served only now is read in a second one).
        asked = self._served.get(app.app_id, ALL_PROFILES)
        found = self._round(app, asked)
        view = self.view(app, (found.now, found.live))
        if self.metrics is not None:
            self.metrics.note_capable(app.app_id, view.routes, view.now)
        self._unpark(app, view)
        self._write_routes(app, view)
        profiles = sorted(view.routes)
        self._served[app.app_id] = profiles
        missing = [profile for profile in profiles if profile not in found.heads]
        if missing:
            found.heads.update(self._round(app, missing).heads)
        ahead_ms = int(self.settings.dispatch_ahead * 1000)
        horizon = view.now + ahead_ms
        batch = self.settings.claim_batch
        next_due = float("inf")
        for profile in profiles:
            # The scopes with something due by the horizon (up to a batch) and the first one
            # after it: a million waiting requests cost nothing to look past.
            scopes, later = found.heads[profile]
            if later:
                # Wake when it enters the window, a twentieth of a window at the soonest: a
                # steady stream goes out in small batches, not in bursts a worker must take
                # in all at once while it starts the earlier ones.
                enters = (int(later[1]) - horizon) / 1000
                next_due = min(next_due, max(enters, ahead_ms / 20_000))
            if scopes:
                claimed = self._claim(app, profile, scopes, view, horizon)
                self.publish(app, claimed, view.now, found.lane)
                if len(scopes) == batch or len(claimed) == batch:
                    next_due = 0.0  # more is due behind this batch: come back at once
        return max(0.0, next_due)

    def _write_routes(self, app: keys.AppKeys, view: View) -> None:
        """Keep `routes` (keys.py) what this pass sees, writing only when it changed: a
        submit reads it to release a request due now itself. No live class, no key."""
        routes = {
            f"{profile}{keys.SEPARATOR}{identifier}": " ".join(classes)
            for profile, handlers in view.routes.items()
            for identifier, classes in handlers.items()
        }
        if self._routes.get(app.app_id) == routes:
            return
        with self.client.pipeline(transaction=True) as pipe:  # readers see old or new, whole
            pipe.delete(app.routes)
            if routes:
                pipe.hset(app.routes, mapping=routes)
            pipe.execute()
        self._routes[app.app_id] = routes

    def _claim(
        self, app: keys.AppKeys, profile: int, scopes: list[str], view: View, horizon: int
    ) -> list[Claimed]:
        script_keys = [app.due(profile), app.leases, app.seq, app.counts, app.parked]
        script_keys.append(app.deadletter)
        for scope in scopes:
            script_keys += [app.requests(scope), app.sched(profile, scope)]
        lease_ms = int(self.settings.dispatch_lease * 1000)
        args: list[Any] = [profile, horizon, lease_ms, self.settings.claim_batch, len(scopes)]
        args += scopes
        for identifier, classes in view.routes[profile].items():
            args += [identifier, " ".join(classes)]
        raw = self.scripts.claim(keys=script_keys, args=args)
        claimed = [
            Claimed(
                raw[i].decode(),
                raw[i + 1].decode(),
                int(raw[i + 2]),
                raw[i + 3].decode(),
                profile,
                int(raw[i + 4]),
                int(raw[i + 5]),
            )
            for i in range(0, len(raw), 6)
        ]
        if self.metrics is not None:
            self.metrics.observe_claims(app.app_id, claimed, view.now)
        return claimed

    def publish(
        self, app: keys.AppKeys, claimed: list[Claimed], now: int, lane: int | None = None
    ) -> None:
        """Send each claimed request to its class's queue, with its date as the ETA when it
        is still ahead (the worker's timer starts it; the start checks its generation, so a
        cancel or a replace inside the window still wins).

        While the app holds the CPU efficiency resource its requests go in the priority
        lane, which workers serve before the messages already waiting (efficiency.lane).
        """
        if not claimed:
            return
        priority = efficiency.lane(self.client, app) if lane is None else lane
        sent = []
        for item in claimed:
            eta = None
            if item.date > now + EARLY_MS:
                eta = datetime.fromtimestamp(item.date / 1000, UTC)
            kwargs = {
                "scope": item.scope,
                "gen": item.gen,
                "requires": requirement_names(item.profile),
            }
            queue = app.class_queue(item.class_id)
            sent.append(messages.task_message(queue, item.identifier, kwargs, priority, eta))
        messages.push(self.client, sent)  # one pipelined round trip for the batch
        self.dispatched += len(claimed)

    def _unpark(self, app: keys.AppKeys, view: View) -> None:
        """Put back on schedule the parked requests a live class can now run: a batch per
        pass, from where the last pass stopped, after a class arrived."""
        start = self._unpark_from.get(app.app_id)
        if start is None:
            return
        batch = self.settings.claim_batch
        members = [m.decode() for m in self.client.zrange(app.parked, start, start + batch - 1)]
        runnable = []
        for member in members:
            profile, scope, identifier = keys.split_parked(member)
            if identifier in view.routes.get(profile, {}):
                runnable.append((member, profile, scope))
        if runnable:
            script_keys = [app.parked, app.counts, app.deadletter]
            for _, profile, scope in runnable:
                script_keys += [app.requests(scope), app.sched(profile, scope), app.due(profile)]
            self.scripts.unpark(keys=script_keys, args=[m for m, _, _ in runnable])
            log.info("%s: %d parked request(s) can run now", app.app_id, len(runnable))
        if len(members) < batch:
            del self._unpark_from[app.app_id]
        else:
            self._unpark_from[app.app_id] = start + len(members) - len(runnable)

    # -- recovery -------------------------------------------------------------

    def live_workers(self, app: keys.AppKeys, forget: bool = False) -> Live:
        """Heartbeats of the app's live workers, by name (judged on the server's clock).
        With `forget` (beat's sweep), workers and classes gone for `forget_after` are
        forgotten and their queues deleted."""
        forget_ms = int(self.settings.forget_after * 1000) if forget else 0
        k = app
        raw = self.scripts.workers(
            keys=[k.workers, k.alive, k.classes, k.classlive, k.deadletter], args=[forget_ms]
        )
        now = int(raw[0])
        self.offset = now / 1000 - time.time()
        gone_workers = [(raw[1][i].decode(), raw[1][i + 1]) for i in range(0, len(raw[1]), 2)]
        gone = [app.worker_queue(name) for name, _ in gone_workers]
        gone += [app.class_queue(c.decode()) for c in raw[2]]
        if gone:
            self._delete_queues(gone, [_node(heartbeat) for _, heartbeat in gone_workers])
        return {
            raw[i].decode(): json.loads(raw[i + 2])
            for i in range(3, len(raw), 3)
            if float(raw[i + 1]) > now
        }

    def _delete_queues(self, names: list[str], nodes: list[str]) -> None:
        """Delete the queues of forgotten workers and classes with kombu's bindings of them,
        and the forgotten workers' entries in Celery's remote-control binding. What was
        still queued there is recovered by its lease (lapsed dispatch or work)."""
        doomed = [lst for name in names for lst in keys.AppKeys.queue_lists(name)]
        doomed += [binding for name in names for binding in keys.AppKeys.bindings(name)]
        self.client.delete(*doomed)
        replies = {f"{node}.{PIDBOX}" for node in nodes if node}
        for pidbox in keys.AppKeys.bindings(PIDBOX):
            stale = [m for m in self.client.sscan_iter(pidbox) if _queue_of(m) in replies]
            if stale:
                self.client.srem(pidbox, *stale)
        log.info("deleted the queues of %d forgotten worker(s) and class(es)", len(names))

    def sweep(self) -> None:
        """Publish again what was claimed but not delivered; requeue runs whose lease lapsed;
        forget apps that have had nothing in Redis for `forget_after`."""
        seen = []
        for app in self.apps():
            with self.isolated(app, "sweep"):
                live = self.live_workers(app, forget=True)
                self._sweep_dispatches(app)
                self._sweep_runs(app)
                for extension in EXTENSIONS:
                    extension.sweep(self, app, live)
                seen.append((app, live))
                self._forget_if_idle(app)
        if self.metrics is not None:  # the gauges are refreshed here, not on every dispatch
            self.metrics.refresh(self, seen)

    def _forget_if_idle(self, app: keys.AppKeys) -> None:
        """Drop an app from `bgqueue:apps` once none of its keys that hold work, workers or
        grants has existed for `forget_after`: the index of apps stays bounded. A later
        submit names it again (and its wake-up reaches beat even in between)."""
        if self.client.exists(*app.holding):
            self._idle_since.pop(app.app_id, None)
            return
        since = self._idle_since.setdefault(app.app_id, time.monotonic())
        if time.monotonic() - since >= self.settings.forget_after:
            self.client.srem(keys.APPS, app.app_id)
            self.known_apps.discard(app.app_id)
            del self._idle_since[app.app_id]
            log.info("forgot app %s: nothing of it is left in Redis", app.app_id)

    def _sweep_dispatches(self, app: keys.AppKeys) -> None:
        batch = self.settings.claim_batch
        lapsed = self.client.zrangebyscore(app.leases, "-inf", self.server_ms(), start=0, num=batch)
        if not lapsed:
            return
        view = self.view(app)  # read before lapsed.lua writes: a failure here writes nothing
        members = [m.decode() for m in lapsed]
        script_keys = [app.leases, app.deadletter]
        script_keys += [app.requests(keys.split_member(m)[0]) for m in members]
        lease_ms = int(self.settings.dispatch_lease * 1000)
        raw = self.scripts.lapsed(keys=script_keys, args=[lease_ms, *members])
        found = []
        for i in range(0, len(raw), 5):
            scope, identifier = keys.split_member(raw[i].decode())
            item = Claimed(scope, identifier, int(raw[i + 1]), raw[i + 2].decode(), int(raw[i + 3]))
            item.date = int(raw[i + 4])
            found.append(item)
        # A message still queued behind others is not lost, only waiting: its lease was
        # renewed above, and publishing it again would only grow the backlog. One whose
        # class has no live worker left goes back to pending, to be routed afresh.
        gone = [item for item in found if item.class_id not in view.classes]
        for item in gone:
            self._release(app, item)
        live = sorted({i.class_id for i in found if i.class_id in view.classes})
        waiting = self.queued(app, [app.class_queue(c) for c in live])
        again = [
            i
            for i in found
            if i.class_id in view.classes and app.class_queue(i.class_id) not in waiting
        ]
        if again:
            log.warning("publishing %d lapsed dispatch(es) of %s again", len(again), app.app_id)
        self.publish(app, again, view.now)

    def queued(self, app: keys.AppKeys, queues: list[str]) -> set[str]:
        """The queues that hold messages (in any of their priority lists)."""
        if not queues:
            return set()
        lists = [keys.AppKeys.queue_lists(name) for name in queues]
        with self.client.pipeline(transaction=False) as pipe:
            for names in lists:
                for name in names:
                    pipe.llen(name)
            lengths = iter(pipe.execute())
        held = [sum(next(lengths) for _ in names) for names in lists]
        return {name for name, n in zip(queues, held, strict=True) if n}

    def _release(self, app: keys.AppKeys, item: Claimed) -> None:
        script_keys = [
            app.requests(item.scope),
            app.leases,
            app.sched(item.profile, item.scope),
            app.due(item.profile),
            app.counts,
            app.deadletter,
        ]
        if self.scripts.release(keys=script_keys, args=[item.scope, item.identifier, item.gen]):
            log.warning(
                "%s/%s of %s: its worker class left; back to pending",
                item.scope,
                item.identifier,
                app.app_id,
            )

    def _sweep_runs(self, app: keys.AppKeys) -> None:
        batch = self.settings.claim_batch
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hlen(app.running)
            pipe.zcard(app.runleases)
            running, leased = pipe.execute()
        if running > leased:  # leases lost (foreign data moved aside): lapse them now
            gens = self.client.hkeys(app.running)
            self.client.zadd(app.runleases, dict.fromkeys(gens, 0), nx=True)
        lapsed = self.client.zrangebyscore(
            app.runleases, "-inf", self.server_ms(), start=0, num=batch
        )
        if not lapsed:
            return
        records = self.client.hmget(app.running, lapsed)
        for gen, raw in zip(lapsed, records, strict=True):
            self._recover(app, gen, raw)

    def _recover(self, app: keys.AppKeys, gen: bytes, raw: bytes | None) -> None:
        """recover.lua for one lapsed run; a record beat cannot read is passed without its
        scope's keys, and the script dead-letters it."""
        script_keys = [app.running, app.runleases, app.expire, app.deadletter]
        record: dict[str, Any] = {}
        with contextlib.suppress(*DATA_ERRORS):
            record = json.loads(raw) if raw else {}
            scope, profile = record["sc"], int(record["r"])
            script_keys += [
                app.history(scope),
                app.requests(scope),
                app.sched(profile, scope),
                app.due(profile),
                app.counts,
            ]
        args = [gen, self.settings.max_attempts, *self.settings.history]
        outcome = self.scripts.recover(keys=script_keys, args=args)
        if not outcome or len(script_keys) == 4:
            return
        if self.metrics is not None:
            self.metrics.lost_run(app.app_id, record["k"])
        with logs.request(app.app_id, record["sc"], record["i"], int(gen)):
            log.warning(
                "run %s of %s/%s lost its worker %s: %s",
                gen.decode(),
                record["sc"],
                record["i"],
                record.get("w"),
                "requeued" if outcome == 1 else "not requeued",
            )


PIDBOX = "celery.pidbox"  # Celery's remote-control exchange: a binding per worker node


def _node(heartbeat: bytes) -> str:
    """The Celery node name a forgotten worker's heartbeat gave, or ''."""
    try:
        return str(json.loads(heartbeat).get("node", ""))
    except (ValueError, AttributeError):
        return ""


def _queue_of(binding: bytes) -> str:
    """The queue of one of kombu's binding entries ("<key>\x06\x16<pattern>\x06\x16<queue>")."""
    return binding.decode(errors="replace").rpartition(keys.AppKeys.KOMBU_SEP)[2]


def _class_def(raw: bytes) -> dict[str, Any]:
    """A class definition as heartbeat.lua stored it; an unreadable one runs nothing."""
    try:
        definition = json.loads(raw)
        mask, handlers = int(definition["m"]), [str(h) for h in definition["h"]]
    except DATA_ERRORS:
        return {"m": 0, "h": [], "c": [], "w": []}
    return {**definition, "m": mask, "h": handlers}
