"""What one page of the backlog reads from Redis, and the cancel it offers.

A page lists one app's requests in the order of its indexes, which follow REASONS:

    no_handler         parked    ZSET, one entry per request, by earliest date
    no_capable_worker  due:<p>   ZSET, one entry per scope, for each profile p that no
                                 live worker satisfies
    not_due            due:<p>   the same, for each profile p some live worker satisfies
    dispatched         leases    ZSET, one entry per request

Every waiting request is in exactly one of these places (lua/include/requests.lua), so no
two pages show the same row. A page is `size` entries from an offset into that sequence:
one ZCARD per index says which indexes the page falls in, one ZRANGE per index reads only
the page's slice, and a scope's entry reads at most PER_SCOPE of its requests of that
profile (a scope holds a handful). One page thus costs at most 3 × size + 36 reads, in four
pipelined round trips after the app list, the live workers and the counts, whether a hundred
or a million requests wait; no SCAN, no KEYS. The counts on top come from the app's `counts` hash
(bgqueue/model/counts.py), never from counting rows.

Rows may move between two page loads (beat claims, producers submit): a page is what Redis
held when it was read, and an entry whose request moved in between is left out and counted.
"""

from __future__ import annotations

import json
import threading
from collections import Counter as Tally
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from bgqueue.app import BackgroundApp
from bgqueue.broker import connect
from bgqueue.errors import ParameterError
from bgqueue.model import keys
from bgqueue.model.counts import REASONS, pending_requests
from bgqueue.model.requests import PROFILE_COUNT, check_name, requirement_names
from bgqueue.model.scripts import Scripts

PAGE_SIZE = 100
MAX_PAGE_SIZE = 500
PER_SCOPE = 25  # requests of one scope and profile an entry shows (the default limit is 11)
MAX_SCOPE_FIELDS = 1000  # a single scope's view reads its whole hash, up to this size
WAITING = ("pending", "parked", "dispatched")  # the states of a scope's records (keys.py)


@dataclass(frozen=True)
class Query:
    """What the page shows: an app ('' for the first), a reason or scope ('' for all), a page."""

    app_id: str = ""
    reason: str = ""
    scope: str = ""
    page: int = 1
    size: int = PAGE_SIZE

    @classmethod
    def parse(cls, args: Mapping[str, str]) -> Query:
        """A query from URL or form arguments; ParameterError says what is wrong."""
        app_id = args.get("app", "")
        if app_id and not keys.is_app_id(app_id):
            raise ParameterError(f"app {app_id!r} cannot be an app id")
        reason = args.get("reason", "")
        if reason and reason not in REASONS:
            raise ParameterError(f"reason must be one of {', '.join(REASONS)}, got {reason!r}")
        scope = args.get("scope", "")
        if scope:
            check_name(scope, "scope")
        page = _whole(args.get("page", ""), "page", 1, 1 << 31, 1)
        size = _whole(args.get("size", ""), "size", 1, MAX_PAGE_SIZE, PAGE_SIZE)
        return cls(app_id, reason, scope, page, size)

    def params(self, **changes: Any) -> dict[str, str]:
        """This query's URL arguments with `changes` applied, defaults left out."""
        query = replace(self, **changes)
        pairs = {
            "app": query.app_id,
            "reason": query.reason,
            "scope": query.scope,
            "page": str(query.page) if query.page != 1 else "",
            "size": str(query.size) if query.size != PAGE_SIZE else "",
        }
        return {name: value for name, value in pairs.items() if value}


def _whole(raw: str, what: str, low: int, high: int, default: int) -> int:
    if not raw:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ParameterError(f"{what} must be a whole number from {low} to {high}, got {raw!r}")
    return int(raw)


@dataclass(frozen=True)
class Row:
    """One waiting request as the page shows it."""

    scope: str
    identifier: str
    kind: str
    reason: str
    profile: int
    earliest_ms: int  # 0: no earliest-begin date
    attempts: int  # runs that were lost with their worker so far
    payload: str  # JSON text
    since_ms: int  # when it became pending again after a date, a release or a launch; 0: unknown
    simulated: bool  # a simulated launch waived its date

    @property
    def requirements(self) -> list[str]:
        """What a worker must satisfy, by name (as beat sends them in Flower's kwargs)."""
        return requirement_names(self.profile)


@dataclass
class Listing:
    """One page: the app's counts by (kind, reason), and the page's rows."""

    query: Query  # with the app it shows filled in
    apps: list[str]
    now: int  # Redis's clock, ms
    served: set[int] = field(default_factory=set)  # profiles some live worker satisfies
    counts: Tally[tuple[str, str]] = field(default_factory=Tally)
    total: int = 0  # entries of the listing, over every page
    rows: list[Row] = field(default_factory=list)
    cut: list[tuple[str, int, int]] = field(default_factory=list)  # scope, profile, not shown
    moved: int = 0  # entries whose request moved (or was unreadable) while the page was read
    error: str = ""

    @property
    def pages(self) -> int:
        """How many pages the listing has (at least one, maybe empty)."""
        return max(1, -(-self.total // self.query.size))


@dataclass(frozen=True)
class Index:
    """One request index of the listing: `parked`, `leases`, or a `due:<profile>` whose
    entries are scopes."""

    key: str
    reason: str
    profile: int | None = None


def indexes(app: keys.AppKeys, served: set[int], reason: str = "") -> list[Index]:
    """The indexes a listing walks, in REASONS order; only one reason's if given."""
    found = [Index(app.parked, "no_handler")]
    found += [
        Index(app.due(p), "no_capable_worker", p) for p in range(PROFILE_COUNT) if p not in served
    ]
    found += [Index(app.due(p), "not_due", p) for p in sorted(served)]
    found.append(Index(app.leases, "dispatched"))
    return [index for index in found if not reason or index.reason == reason]


def slices(cards: list[int], offset: int, size: int) -> list[tuple[int, int, int]]:
    """The (index, first, last) ranges, inclusive as ZRANGE takes them, that hold entries
    offset .. offset + size - 1 of indexes of these sizes laid end to end."""
    found = []
    for position, card in enumerate(cards):
        if size <= 0:
            break
        if offset >= card:
            offset -= card
            continue
        take = min(card - offset, size)
        found.append((position, offset, offset + take - 1))
        size -= take
        offset = 0
    return found


def reason_of(state: str, profile: int, served: set[int]) -> str:
    """Why a request waits, from its record's state and profile (counts.REASONS)."""
    if state == "parked":
        return "no_handler"
    if state == "dispatched":
        return "dispatched"
    return "not_due" if profile in served else "no_capable_worker"


def row_of(scope: str, identifier: str, raw: bytes | None, served: set[int]) -> Row | None:
    """A row from a request's record (lua/submit.lua), or None if it is gone or unreadable."""
    try:
        record = json.loads(raw or b"null")
        state, profile = str(record["s"]), int(record["r"])
        if state not in WAITING:
            return None
        payload = record.get("pl", "null")
        return Row(
            scope=scope,
            identifier=identifier,
            kind=str(record["k"]),
            reason=reason_of(state, profile, served),
            profile=profile,
            earliest_ms=int(record.get("e") or 0),
            attempts=int(record.get("a") or 0),
            payload=payload if isinstance(payload, str) else json.dumps(payload),
            since_ms=int(record.get("t") or 0),
            simulated=bool(record.get("x")),
        )
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


class Backlog:
    """Reads pages of one broker's pending requests, and cancels them (thread-safe: Flower
    runs each read in its thread pool)."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self._lock = threading.Lock()
        self._client: Any = None
        self._scripts: Any = None

    def _connected(self) -> tuple[Any, Any]:
        with self._lock:
            if self._client is None:
                self._client = connect(self.broker_url)
                self._scripts = Scripts(self._client)
            return self._client, self._scripts

    def read(self, query: Query) -> Listing:
        """The page `query` asks for."""
        client, scripts = self._connected()
        named = (member.decode(errors="replace") for member in client.smembers(keys.APPS))
        apps = sorted(filter(keys.is_app_id, named))
        query = replace(query, app_id=query.app_id or (apps[0] if apps else ""))
        if not query.app_id:
            seconds, micros = client.time()
            return Listing(query, apps, seconds * 1000 + micros // 1000)
        app = keys.AppKeys(query.app_id)
        now, served = _served(client, scripts, app)
        listing = Listing(query, apps, now, served, pending_requests(client, app, served, now))
        if query.scope:
            _read_scope(client, app, listing)
        else:
            _read_indexes(client, app, listing)
        return listing

    def cancel(self, app_id: str, scope: str, identifier: str) -> bool:
        """Cancel one waiting request with the app's own cancel (lua/cancel.lua: history
        and counts as a producer's cancel leaves them); True if it was still waiting."""
        app = BackgroundApp(app_id, broker_url=self.broker_url)  # no handlers needed
        cancelled = app.scheduler_for(scope).cancel(identifier)
        app.client.close()
        return cancelled


def _served(client: Any, scripts: Any, app: keys.AppKeys) -> tuple[int, set[int]]:
    """Redis's clock and the profiles the app's live worker classes satisfy (lua/view.lua:
    a fleet of a thousand workers of a few kinds is a few classes)."""
    raw = scripts.view(keys=[app.classlive, app.classes], args=[])
    now, live = int(raw[0]), list(raw[1])
    served: set[int] = set()
    for definition in client.hmget(app.classes, live) if live else []:
        try:
            mask = int(json.loads(definition)["m"])
        except (TypeError, ValueError, KeyError):
            continue
        served.update(p for p in range(PROFILE_COUNT) if mask >> p & 1)
    return now, served


def _read_indexes(client: Any, app: keys.AppKeys, listing: Listing) -> None:
    """The page's entries from the indexes: ZCARDs, the page's slices, then each entry."""
    query = listing.query
    walked = indexes(app, listing.served, query.reason)
    with client.pipeline(transaction=False) as pipe:
        for index in walked:
            pipe.zcard(index.key)
        cards = pipe.execute()
    listing.total = sum(cards)
    ranges = slices(cards, (query.page - 1) * query.size, query.size)
    with client.pipeline(transaction=False) as pipe:
        for position, first, last in ranges:
            pipe.zrange(walked[position].key, first, last)
        found = pipe.execute()
    entries = [
        (walked[position], member.decode(errors="replace"))
        for (position, _, _), members in zip(ranges, found, strict=True)
        for member in members
    ]
    _read_entries(client, app, listing, entries)


def _entry_request(index: Index, member: str) -> tuple[str, str] | None:
    """The scope and identifier a parked or leases member names (None: not one of ours)."""
    if index.reason == "dispatched":
        return keys.split_member(member)
    try:
        _, scope, identifier = keys.split_parked(member)
    except ValueError:
        return None
    return scope, identifier


def _read_entries(
    client: Any, app: keys.AppKeys, listing: Listing, entries: list[tuple[Index, str]]
) -> None:
    """Each entry's rows, in entry order: a parked or dispatched request's record, or a
    scope's first PER_SCOPE requests of the entry's profile with their records."""
    named = [_entry_request(index, member) for index, member in entries]
    with client.pipeline(transaction=False) as pipe:
        for (index, member), request in zip(entries, named, strict=True):
            if index.profile is not None:
                pipe.zrange(app.sched(index.profile, member), 0, PER_SCOPE - 1)
                pipe.zcard(app.sched(index.profile, member))
            elif request:
                pipe.hget(app.requests(request[0]), request[1])
        first = iter(pipe.execute())
    found: list[list[tuple[str, str, bytes | None]]] = []
    with client.pipeline(transaction=False) as pipe:
        for (index, member), request in zip(entries, named, strict=True):
            if index.profile is None:
                scope, identifier = request or (member, "")
                found.append([(scope, identifier, next(first) if request else None)])
            else:
                found.append(_scheduled(pipe, app, listing, index, member, first))
        records = iter(pipe.execute())
    for (index, _), rows in zip(entries, found, strict=True):
        if index.profile is not None and rows:
            rows = [(s, i, raw) for (s, i, _), raw in zip(rows, next(records), strict=True)]
        for scope, identifier, raw in rows:
            _keep(listing, index, scope, identifier, raw)


def _scheduled(
    pipe: Any, app: keys.AppKeys, listing: Listing, index: Index, scope: str, first: Any
) -> list[tuple[str, str, bytes | None]]:
    """A scope entry's identifiers (from its sched ZRANGE and ZCARD replies in `first`),
    queueing the HMGET of their records on `pipe`; notes what PER_SCOPE left out."""
    ids = [i.decode(errors="replace") for i in next(first)]
    total = int(next(first))
    if total > len(ids):
        listing.cut.append((scope, int(index.profile or 0), total - len(ids)))
    if ids:
        pipe.hmget(app.requests(scope), ids)
    return [(scope, identifier, None) for identifier in ids]


def _keep(listing: Listing, index: Index, scope: str, identifier: str, raw: bytes | None) -> None:
    """Add the row if its record is still where the index says; else count it as moved."""
    row = row_of(scope, identifier, raw, listing.served)
    where = index.profile in (None, row.profile) if row else False
    if row is not None and row.reason == index.reason and where:
        listing.rows.append(row)
    else:
        listing.moved += 1


def _read_scope(client: Any, app: keys.AppKeys, listing: Listing) -> None:
    """One scope's requests, from its hash (bounded by the app's pending limits; a scope
    over MAX_SCOPE_FIELDS is refused rather than read)."""
    query = listing.query
    key = app.requests(query.scope)
    fields = int(client.hlen(key))
    if fields > MAX_SCOPE_FIELDS:
        listing.error = (
            f"scope {query.scope!r} holds {fields} records, more than this page reads at once "
            f"({MAX_SCOPE_FIELDS}); list it by reason instead"
        )
        return
    rows = []
    for name, raw in client.hgetall(key).items():
        if name.startswith(b"#"):  # the scope's limit counters
            continue
        row = row_of(query.scope, name.decode(errors="replace"), raw, listing.served)
        if row is None:
            listing.moved += 1
        elif not query.reason or row.reason == query.reason:
            rows.append(row)
    rows.sort(key=lambda r: (REASONS.index(r.reason), r.earliest_ms, r.identifier))
    listing.total = len(rows)
    start = (query.page - 1) * query.size
    listing.rows = rows[start : start + query.size]
