"""The `bgqueue status` report: what Flower cannot show, because pending requests
are Redis records, not Celery messages."""

from __future__ import annotations

import json
from typing import Any

from bgqueue import keys
from bgqueue.scripts import Scripts
from bgqueue.settings import Settings


def report(client: Any) -> str:
    """A plain-text report of beat, and per app: workers, pending, dispatched, running."""
    lines: list[str] = []
    holder = client.get(keys.BEAT_LEASE)
    ttl = client.pttl(keys.BEAT_LEASE)
    lines.append(
        f"beat: {holder.decode()} (lease {ttl / 1000:.1f}s)" if holder else "beat: none leading"
    )
    scripts = Scripts(client)
    forget_ms = int(Settings.from_env().heartbeat_timeout * 1000 * 60)
    for app_id in sorted(a.decode() for a in client.smembers(keys.APPS)):
        app = keys.AppKeys(app_id)
        lines.append(f"app {app_id}")
        raw = scripts.workers(keys=[app.workers, app.alive], args=[forget_ms])
        now = int(raw[0])
        lines.append("  workers:")
        for i in range(1, len(raw), 3):
            beat = json.loads(raw[i + 2])
            lapse = (float(raw[i + 1]) - now) / 1000
            state = "alive" if lapse > 0 else f"lapsed {-lapse:.1f}s ago"
            conds = " ".join(f"{k}={v}" for k, v in sorted(beat["conditions"].items()))
            slots = f"busy {beat['busy']}/{beat['concurrency']}"
            lines.append(f"    {raw[i].decode()}  {state}  {slots}  {conds}")
        with client.pipeline(transaction=False) as pipe:
            for due in app.due_all:
                pipe.zcard(due)
                pipe.zcount(due, "-inf", now)
            pipe.zcard(app.leases)
            pipe.hgetall(app.running)
            counts = pipe.execute()
        waiting = sum(counts[0:32:2])
        due_now = sum(counts[1:32:2])
        lines.append(f"  pending: {waiting} (due now: {due_now}, not yet due: {waiting - due_now})")
        lines.append(f"  dispatched, not started: {counts[32]}")
        running = counts[33]
        lines.append(f"  running: {len(running)}")
        for gen, rec_raw in sorted(running.items()):
            rec = json.loads(rec_raw)
            lines.append(f"    #{gen.decode()} {rec['sc']}/{rec['i']} ({rec['k']}) on {rec['w']}")
    return "\n".join(lines)
