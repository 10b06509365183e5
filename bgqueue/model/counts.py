"""The one counter system: how many requests wait where, kept by the Lua scripts that move
them (the convention is written once, in lua/include/requests.lua) and read here by
metrics, `bgqueue status` and the Pending page alike. No reader samples records.

Two kinds of counter, each changed in the same script as the state it counts:

- the app's `counts` HASH, '<kind>:<place>' → requests of that kind at that place: a
  profile number (pending, on its schedule), 'parked' (pending, no live worker has its
  handler) or 'dispatched' (claimed, not started). Running and finished requests are not
  counted here (`running` and `history:<scope>` hold them one entry each);
- each scope's `req:<scope>` fields '#refresh' and '#processing' → its not-started
  requests that count against the pending limits (`Limits.max_pending_*`, checked by
  submit.lua); a requeued run (attempt > 0) waits outside them.

A field that reaches zero is deleted, so an idle app or scope keeps no counter at all.
tests/test_metrics.py recounts both kinds from the records after every transition.
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import Any

from bgqueue.model.keys import AppKeys
from bgqueue.model.requests import Kind

# Why a request waits, the first that applies: no live worker satisfying its requirements
# has its handler (parked); no live worker satisfies its requirements; it is not due yet
# (in a profile some live worker serves, a pending request is claimed as it comes due);
# it is dispatched and not started.
REASONS = ("no_handler", "no_capable_worker", "not_due", "dispatched")


def pending_requests(
    client: Any, app: AppKeys, eligible: set[int], now_ms: int
) -> Tally[tuple[str, str]]:
    """Requests waiting by (kind, reason), from the counts the request scripts keep
    (lua/include/requests.lua): no record is read."""
    result: Tally[tuple[str, str]] = Tally()
    for field, value in client.hgetall(app.counts).items():
        kind, _, place = field.decode().rpartition(":")
        if kind not in set(Kind) or not value.isdigit():
            continue
        if place == "dispatched":
            reason = "dispatched"
        elif place == "parked":
            reason = "no_handler"
        elif place.isdigit():
            reason = "not_due" if int(place) in eligible else "no_capable_worker"
        else:
            continue
        result[(kind, reason)] += int(value)
    return result
