"""The `bgqueue status` report: what Flower cannot show, because pending requests,
continuous tasks, transient delays, efficiency grants and works are Redis records, not
Celery messages.

It works from the broker alone: it knows apps only by their ids in `bgqueue:apps`, never
loads an app module, and so has no app's `Limits` (see `daily_quota`). Every time shown is
relative to Redis's clock, like every time bgqueue keeps.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from bgqueue import transient
from bgqueue.broker import deadletter
from bgqueue.continuous import ContinuousTaskInfo
from bgqueue.efficiency import read_grants
from bgqueue.errors import ParameterError
from bgqueue.model import keys
from bgqueue.model.conditions import profiles
from bgqueue.model.counts import REASONS, pending_requests
from bgqueue.model.limits import Limits
from bgqueue.model.scripts import Scripts
from bgqueue.works import WorkInfo

# A worker heartbeat: its name, ms until it lapses (negative: lapsed), and its JSON.
Worker = tuple[str, float, dict[str, Any]]


def report(client: Any) -> str:
    """A plain-text report of beat, and per app: workers, requests, continuous tasks,
    transient delays, efficiency resources and works."""
    lines: list[str] = []
    holder = client.get(keys.BEAT_LEASE)
    ttl = client.pttl(keys.BEAT_LEASE)
    lines.append(
        f"beat: {holder.decode()} (lease {ttl / 1000:.1f}s)" if holder else "beat: none leading"
    )
    scripts = Scripts(client)
    for app_id in sorted(a.decode() for a in client.smembers(keys.APPS)):
        app = keys.AppKeys(app_id)
        now, workers = _workers(scripts, app)
        lines.append(f"app {app_id}")
        lines += _worker_lines(workers)
        lines += _request_lines(client, app, now, workers)
        lines += continuous_lines(client, app, now)
        lines += transient_lines(client, scripts, app, workers)
        lines += efficiency_lines(client, app, now)
        lines += work_lines(client, scripts, app, now)
        lines += dead_letter_lines(client, app)
    return "\n".join(lines)


def dead_letter_lines(client: Any, app: keys.AppKeys) -> list[str]:
    """How many entries the app's dead letter holds and the newest one's reason (never its
    data, which may carry secrets); nothing when it is empty."""
    total = deadletter.count(client, app)
    if not total:
        return []
    newest = deadletter.read(client, app, 1)[0]
    when = newest.at.isoformat(timespec="seconds") if newest.at else "?"
    return [
        f"  dead letters: {total} (newest {when} from {newest.source}: {newest.reason}); "
        f"read them with LRANGE {app.deadletter} 0 -1"
    ]


def seconds(ms: float) -> str:
    """A duration in ms, for people: '4.2 s'."""
    return f"{ms / 1000:.1f} s"


def _ms(moment: datetime) -> float:
    return moment.timestamp() * 1000


# -- workers and requests ------------------------------------------------------------------


def _workers(scripts: Scripts, app: keys.AppKeys) -> tuple[int, list[Worker]]:
    """Redis's clock (ms) and the app's recently seen workers."""
    script_keys = [app.workers, app.alive, app.classes, app.classlive, app.deadletter]
    raw = scripts.workers(keys=script_keys, args=[0])
    now = int(raw[0])
    found = [
        (raw[i].decode(), float(raw[i + 1]) - now, json.loads(raw[i + 2]))
        for i in range(3, len(raw), 3)
    ]
    return now, found


def _worker_lines(workers: list[Worker]) -> list[str]:
    lines = ["  workers:"]
    for name, lapse, beat in workers:
        state = "alive" if lapse > 0 else f"lapsed {-lapse / 1000:.1f}s ago"
        conds = " ".join(f"{k}={v}" for k, v in sorted(beat.get("conditions", {}).items()))
        slots = f"busy {beat.get('busy', 0)}/{beat.get('concurrency', 0)}"
        extra = "  continuous" if beat.get("continuous") else ""
        lines.append(f"    {name}  {state}  {slots}{extra}  {conds}")
    return lines


def _request_lines(client: Any, app: keys.AppKeys, now: int, workers: list[Worker]) -> list[str]:
    live = [beat for _, lapse, beat in workers if lapse > 0]
    eligible = {p for beat in live for p in profiles(beat.get("conditions", {}))}
    waiting = pending_requests(client, app, eligible, now)
    by_reason = {
        reason: sum(n for (_, r), n in waiting.items() if r == reason) for reason in REASONS
    }
    running = client.hgetall(app.running)
    pending = sum(n for reason, n in by_reason.items() if reason != "dispatched")
    lines = [
        f"  pending: {pending} (not yet due: {by_reason['not_due']}, "
        f"no capable worker: {by_reason['no_capable_worker']}, "
        f"no handler: {by_reason['no_handler']})",
        f"  dispatched, not started: {by_reason['dispatched']}",
        f"  running: {len(running)}",
    ]
    for gen, rec_raw in sorted(running.items()):
        try:
            rec = json.loads(rec_raw)
            lines.append(f"    #{gen.decode()} {rec['sc']}/{rec['i']} ({rec['k']}) on {rec['w']}")
        except (ValueError, KeyError, TypeError):
            lines.append(f"    #{gen.decode()} (unreadable record)")
    return lines


# -- continuous tasks ----------------------------------------------------------------------


def continuous_lines(client: Any, app: keys.AppKeys, now: int) -> list[str]:
    """One line per continuous task: ability, modes, state, worker, restarts, progress."""
    tasks = sorted(
        (ContinuousTaskInfo.from_record(raw) for raw in client.hvals(app.continuous)),
        key=lambda task: task.continuous_task_id,
    )
    lines = [f"  continuous tasks: {len(tasks) or 'none'}"]
    for task in tasks:
        modes = ",".join(mode.name for mode in task.background_modes)
        where = f" on {task.worker} (pid {task.pid})" if task.worker and task.pid else ""
        since = f" for {seconds(now - _ms(task.started_at))}" if task.started_at else ""
        progress = f"  progress {task.progress[0]}/{task.progress[1]}" if task.progress else ""
        lines.append(
            f"    {task.ability_name} #{task.continuous_task_id}  {modes}  "
            f"{task.state}{where}{since}  restarts {task.restarts}{progress}"
        )
    return lines


# -- transient delays ----------------------------------------------------------------------


def daily_quota(workers: list[Worker]) -> tuple[float, str]:
    """The app's `transient_daily_quota` (seconds) and where it comes from.

    Status loads no app module, so it cannot read the app's `Limits`; each worker puts its
    app's quota in its heartbeat (bgqueue/worker/ `Heartbeat.send`), and the live workers' value
    is used (the largest, should a rolling deploy make them differ). With no live worker,
    the default `Limits().transient_daily_quota`, and the report says so.
    """
    reported = [
        float(beat["transient_daily_quota"])
        for _, lapse, beat in workers
        if lapse > 0 and "transient_daily_quota" in beat
    ]
    if reported:
        return max(reported), "as its workers report"
    return Limits().transient_daily_quota, "the default; no live worker reports the app's"


def transient_scopes(client: Any, app: keys.AppKeys) -> list[str]:
    """Scopes with live delays or quota charges. Found through the small index
    `transient:scopes` that every grant updates (lua/transient_delays.lua), not by
    scanning keys; a scope in it whose delays and charges have all gone is left out."""
    scopes = sorted(s.decode() for s in client.zrange(app.transient_scopes, 0, -1))
    with client.pipeline(transaction=False) as pipe:
        for scope in scopes:
            pipe.exists(app.transient_delays(scope), app.transient_ledger(scope))
        present = pipe.execute()
    return [scope for scope, count in zip(scopes, present, strict=True) if count]


def transient_lines(
    client: Any, scripts: Scripts, app: keys.AppKeys, workers: list[Worker]
) -> list[str]:
    """Per scope: the quota left for new delays today and each live delay's time left."""
    quota, source = daily_quota(workers)
    scopes = transient_scopes(client, app)
    if not scopes:
        return ["  transient delays: none"]
    lines = [f"  transient delays (daily quota {quota:g} s per scope, {source}):"]
    for scope in scopes:
        # The same `info` as getTransientTaskInfo: it also settles delays of runs whose
        # worker died, so the quota shown is what the next grant can take.
        raw = scripts.transient_delays(
            keys=transient.script_keys(app, scope), args=["info", int(quota * 1000)]
        )
        info = transient.parse_info(raw)
        reasons = {
            int(rid): json.loads(rec).get("r", "")
            for rid, rec in client.hgetall(app.transient_delays(scope)).items()
        }
        delays = "; ".join(
            f'delay #{d.request_id} "{reasons.get(d.request_id, "")}" '
            f"{seconds(d.actual_delay_time)} left"
            for d in info.transient_tasks
        )
        lines.append(
            f"    [{scope}] quota left {seconds(info.remaining_quota)}; "
            f"{delays or 'no live delays'}"
        )
    return lines


# -- efficiency resources ------------------------------------------------------------------


def efficiency_lines(client: Any, app: keys.AppKeys, now: int) -> list[str]:
    """One line per grant: type, level, reason, and time left or persistent."""
    grants = read_grants(client, app)
    lines = [f"  efficiency resources: {len(grants) or 'none'}"]
    for grant in grants:
        level = "process" if grant.is_for_process else "app"
        name = grant.resource_types.name
        if grant.expires_at is None:
            left = "persistent"
        else:
            left = f"{seconds(max(0.0, _ms(grant.expires_at) - now))} left"
        lines.append(f'    {name} ({level} level)  "{grant.reason}"  {left}')
    return lines


# -- works ---------------------------------------------------------------------------------


def work_conditions(info: WorkInfo) -> str:
    """A work's conditions and repeat, for people: 'network ANY + charging, every 5 s'."""
    named = (
        ("network", info.network_type),
        ("charger", info.charger_type),
        ("battery", info.battery_status),
        ("storage", info.storage_request),
    )
    parts = [f"{what} {value.name}" for what, value in named if value is not None]
    if info.is_charging:
        parts.insert(1 if info.network_type is not None else 0, "charging")
    if info.battery_level is not None:
        parts.append(f"battery >= {info.battery_level}%")
    if info.is_deep_idle:
        parts.append(f"deep idle {seconds(info.idle_wait_time or 0)}")
    conditions = " + ".join(parts) or "no device condition"
    if info.repeat_cycle_time is None:
        return f"{conditions}, once"
    runs = f" ({info.repeat_count} runs)" if info.repeat_count else ""
    return f"{conditions}, every {seconds(info.repeat_cycle_time)}{runs}"


def last_run(last: dict[str, Any]) -> str:
    """A work's last run: outcome, timed out or not, how long, where, why."""
    outcome = "TIMED OUT" if last.get("to") else "in time"
    took = seconds(last["fa"] - last["sa"]) if last.get("sa") and last.get("fa") else "?"
    why = f" ({last['why']})" if last.get("why") else ""
    return f"run {last.get('n', '?')} on {last.get('w') or '?'} took {took}, {outcome}{why}"


def read_works(client: Any, scripts: Scripts, app: keys.AppKeys) -> list[dict[str, Any]]:
    """The app's works by id: `info` (WorkInfo), `record` (state...), `due` (ms or None)
    and `last` (its last run, or None). Read through `work_read.lua` first, so works that a
    Redis restart ended are forgotten as every work call does."""
    flat = scripts.work_read(keys=app.work_all, args=[""])
    with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(app.work_last)
        pipe.zrange(app.work_due, 0, -1, withscores=True)
        lasts, due = pipe.execute()
    due_at = {int(work_id): score for work_id, score in due}
    works = []
    for i in range(0, len(flat), 2):
        work_id, record = int(flat[i]), json.loads(flat[i + 1])
        last = lasts.get(flat[i])
        works.append(
            {
                "info": WorkInfo.from_json(record["info"], app.app_id),
                "record": record,
                "due": due_at.get(work_id),
                "last": json.loads(last) if last else None,
            }
        )
    return sorted(works, key=lambda work: int(work["info"].work_id))


def work_state(work: dict[str, Any], now: int) -> str:
    """Where a work is in its life: waiting (next due), dispatched or running."""
    record = work["record"]
    state = str(record.get("s", "?"))
    if state == "running" and record.get("sa"):
        return f"running on {record.get('w')} for {seconds(now - record['sa'])}"
    if state == "dispatched":
        return f"dispatched to {record.get('w')}"
    if work["due"] is not None:
        due = work["due"] - now
        return f"waiting, next run {'due now' if due <= 0 else 'in ' + seconds(due)}"
    return state


def work_lines(client: Any, scripts: Scripts, app: keys.AppKeys, now: int) -> list[str]:
    """One line per work: id, ability, conditions and repeat, state, last run."""
    works = read_works(client, scripts, app)
    lines = [f"  works: {len(works) or 'none'}"]
    for work in works:
        info: WorkInfo = work["info"]
        last = f"last {last_run(work['last'])}" if work["last"] else "not run yet"
        lines.append(
            f"    #{info.work_id} {info.ability_name}  {work_conditions(info)}  "
            f"{work_state(work, now)}  {last}"
        )
    return lines


# -- probes --------------------------------------------------------------------------------


def worker_liveness(client: Any, name: str) -> tuple[bool, str]:
    """Whether a worker called `name` has a live heartbeat in any app, and one line saying
    so (`bgqueue status --check-worker NAME`, the workers' health checks and probes).

    Live means its score in an app's `alive` set (when its heartbeat lapses) is later than
    Redis's clock, the clock every heartbeat is stamped with, so the probe's own clock does
    not matter. One ZSCORE per app, pipelined with TIME: no script spans two apps' hash slots.
    """
    if not name.strip():
        raise ParameterError("--check-worker needs a worker name (its `bgqueue worker --name`)")
    app_ids = sorted(a.decode() for a in client.smembers(keys.APPS))
    with client.pipeline(transaction=False) as pipe:
        pipe.time()
        for app_id in app_ids:
            pipe.zscore(keys.AppKeys(app_id).alive, name)
        (secs, micros), *scores = pipe.execute()
    now = secs * 1000 + micros / 1000
    # The app whose heartbeat from it lapses last: live if that one is.
    known = [
        (float(score), app_id)
        for app_id, score in zip(app_ids, scores, strict=True)
        if score is not None
    ]
    if not known:
        return False, (
            f"worker {name}: not live: unknown (no heartbeat under that name in "
            f"{len(app_ids)} app(s): not started yet, or stopped and left)"
        )
    lapses, app_id = max(known)
    if lapses > now:
        return (
            True,
            f"worker {name}: live (app {app_id}, heartbeat good for {seconds(lapses - now)})",
        )
    return (
        False,
        f"worker {name}: not live: heartbeat lapsed {seconds(now - lapses)} ago (app {app_id})",
    )
