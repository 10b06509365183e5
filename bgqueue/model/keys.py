"""Every Redis key and Celery queue name bgqueue uses, in one place.

All keys of one app share the hash tag `{app_id}`, so each Lua script touches a
single Cluster slot. The only cross-app names are beat's lease, its wake-up
pub/sub channel and the set of known apps.

Per app (`bgqueue:{app}:...`):
  req:<scope>      HASH identifier -> JSON record of the request not yet started (pending,
                   parked or dispatched), plus '#refresh'/'#processing': how many of them
                   count against the scope's pending limit (lua/include/requests.lua).
  sched:<profile>:<scope>  ZSET identifier -> earliest-begin ms of the scope's pending
                   requests of one requirement profile (a scope holds a handful: small).
  due:<profile>    ZSET scope -> the earliest date in its sched:<profile>:<scope>: beat
                   reads what is due here and looks past nothing else.
  parked           ZSET "<profile>\x1f<scope>\x1f<identifier>" -> earliest-begin ms of
                   pending requests that no live worker has the handler for.
  leases           ZSET "<scope>\x1f<identifier>" -> ms when a dispatch is presumed lost.
  running          HASH request id (generation) -> JSON record of a running task.
  runleases        ZSET request id -> ms when the run is presumed dead (renewed by its watchdog).
  seq              STRING generation counter: one number per dispatch.
  counts           HASH "<kind>:<place>" -> requests of that kind pending in profile <place>,
                   'parked' or 'dispatched'; kept by the request scripts, read by metrics.
  history:<scope>  LIST of JSON TaskRecords, newest first, capped and expiring.
  workers          HASH worker name -> JSON heartbeat (conditions, slots, class, token).
  alive            ZSET worker name -> ms its heartbeat lapses (server clock).
  classes          HASH class id -> JSON of a worker class: the profiles its workers'
                   conditions satisfy and the handlers their build registered.
  classlive        ZSET class id -> ms the heartbeat of its longest-lived worker lapses.
  routes           HASH "<profile>\x1f<identifier>" -> the live classes (space-separated)
                   that satisfy the profile and have the handler: beat's view, written
                   when it changes, so that a submit can dispatch a request due now itself.
  expire           SET request ids whose expiration was simulated, until their watchdog sees it.
  deadletter       LIST of JSON entries, newest first, capped: data met in the app's keys
                   or queues that bgqueue could not read (bgqueue/broker/deadletter.py).
  efficiency:<level>:<type>  STRING JSON of an efficiency grant (level app|process, type a
                   ResourceType bit); a timed grant's key expires at its end.

Celery queues: one per worker class (`class_queue`), which every worker of that class
consumes, and one per worker (`worker_queue`), where beat routes works and continuous
tasks to the worker it picked.
"""

from __future__ import annotations

from bgqueue.errors import ParameterError
from bgqueue.model.requests import PROFILE_COUNT, check_name

PREFIX = "bgqueue"
SEPARATOR = "\x1f"  # unit separator: check_name forbids it inside names

APPS = f"{PREFIX}:apps"
COUNTS_PATTERN = f"{PREFIX}:{{*}}:counts"  # SCAN MATCH for every app's counts (Beat.discover)
BEAT_LEASE = f"{PREFIX}:beat:lease"
BEAT_WAKE = f"{PREFIX}:beat:wake"  # a pub/sub channel: waking beat writes no key


def member(scope: str, identifier: str) -> str:
    """The due/lease set member naming one request of a scope."""
    return f"{scope}{SEPARATOR}{identifier}"


def split_member(value: str) -> tuple[str, str]:
    """Inverse of `member`."""
    scope, _, identifier = value.partition(SEPARATOR)
    return scope, identifier


def split_parked(value: str) -> tuple[int, str, str]:
    """A member of `parked`: "<profile>\x1f<scope>\x1f<identifier>" (lua/claim.lua)."""
    profile, scope, identifier = value.split(SEPARATOR, 2)
    return int(profile), scope, identifier


def app_of(key: str) -> str | None:
    """The app a key of an app belongs to (`bgqueue:{<app id>}:...`), or None."""
    head = f"{PREFIX}:{{"
    if not key.startswith(head) or "}" not in key:
        return None
    app_id = key[len(head) : key.index("}")]  # app ids hold no braces
    return app_id if is_app_id(app_id) else None


def is_app_id(value: str) -> bool:
    """Whether a name could be an app's id (BackgroundApp checks the same)."""
    try:
        check_name(value, "app_id")
    except ParameterError:
        return False
    return "{" not in value and "}" not in value


class AppKeys:
    """Key names of one app."""

    def __init__(self, app_id: str) -> None:
        self.app_id = app_id
        self.base = f"{PREFIX}:{{{app_id}}}"
        self.leases = f"{self.base}:leases"
        self.running = f"{self.base}:running"
        self.runleases = f"{self.base}:runleases"
        self.seq = f"{self.base}:seq"
        self.counts = f"{self.base}:counts"
        self.workers = f"{self.base}:workers"
        self.expire = f"{self.base}:expire"
        self.alive = f"{self.base}:alive"
        self.classes = f"{self.base}:classes"
        self.classlive = f"{self.base}:classlive"
        self.routes = f"{self.base}:routes"
        self.parked = f"{self.base}:parked"
        self.deadletter = f"{self.base}:deadletter"
        self.due_all = [self.due(p) for p in range(PROFILE_COUNT)]

    @property
    def holding(self) -> list[str]:
        """The keys whose existence means the app has something in Redis: waiting or running
        requests, workers, continuous tasks, works, transient delays, grants, dead letters.
        (Scope keys are covered: requests count in `counts`, histories expire by themselves.)"""
        return [
            self.counts,
            self.leases,
            self.running,
            self.runleases,
            self.alive,
            self.classlive,
            self.parked,
            self.continuous,
            self.works,
            self.transient_scopes,
            self.deadletter,
            *self.efficiency_all,
        ]

    def requests(self, scope: str) -> str:
        """Hash of the scope's not-yet-started requests."""
        return f"{self.base}:req:{scope}"

    def due(self, profile: int) -> str:
        """Sorted set of the scopes with pending requests of this profile, by earliest date."""
        return f"{self.base}:due:{profile}"

    def sched(self, profile: int, scope: str) -> str:
        """Sorted set of a scope's pending requests of one profile, by earliest date."""
        return f"{self.base}:sched:{profile}:{scope}"

    def sched_all(self, scope: str) -> list[str]:
        """The scope's sched keys, profiles 0..15 in order."""
        return [self.sched(p, scope) for p in range(PROFILE_COUNT)]

    def history(self, scope: str) -> str:
        """List of the scope's finished runs."""
        return f"{self.base}:history:{scope}"

    def class_queue(self, class_id: str) -> str:
        """The Celery queue of one worker class, consumed by every worker of that class."""
        return f"bgqueue.{self.app_id}.class.{class_id}"

    def worker_queue(self, worker: str) -> str:
        """The Celery queue of one worker: work that beat routes to that worker alone."""
        return f"bgqueue.{self.app_id}.worker.{worker}"

    # -- transient delays (bgqueue/transient/) --

    def transient_delays(self, scope: str) -> str:
        """HASH request id → JSON delay {g: run generation, s: granted ms, e: ends ms,
        r: reason} of the scope's running tasks, until cancelled or their run settles."""
        return f"{self.base}:transient:delays:{scope}"

    def transient_runs(self, scope: str) -> str:
        """HASH run generation → JSON {b: base deadline ms} of the scope's runs that hold
        delays, and '#t' → ms up to which the scope has been charged."""
        return f"{self.base}:transient:runs:{scope}"

    def transient_ledger(self, scope: str) -> str:
        """ZSET "<ms>:<charged ms>" scored by when the delay time was charged: the scope's
        rolling 24-hour quota."""
        return f"{self.base}:transient:ledger:{scope}"

    @property
    def transient_seq(self) -> str:
        """STRING counter of suspend-delay request ids."""
        return f"{self.base}:transient:seq"

    @property
    def transient_scopes(self) -> str:
        """ZSET scope → ms of its latest grant: the scopes that may hold delays or quota
        charges (an index for `bgqueue status`; entries over two days old are trimmed)."""
        return f"{self.base}:transient:scopes"

    # -- efficiency resources (bgqueue/efficiency/) --

    # kombu's Redis transport (kombu.transport.redis: Channel.sep) keeps a queue's messages
    # of each priority step in its own list, the step-0 list under the queue's own name.
    # bgqueue uses two steps (celery_config sets kombu's `priority_steps`): the priority lane
    # and the normal one (bgqueue/efficiency/), so a worker's BRPOP covers two lists per
    # queue instead of kombu's default four.
    KOMBU_SEP = "\x06\x16"
    KOMBU_PRIORITY_STEPS = (0, 3)
    RESOURCE_BITS = tuple(1 << i for i in range(9))  # efficiency.ResourceType: CPU .. SENSOR

    def efficiency(self, resource: int, process: bool) -> str:
        """STRING: JSON of the app's grant of one resource type (`process`: its workers'
        processes' grant), expiring at the grant's end (lua/efficiency_apply.lua)."""
        return f"{self.base}:efficiency:{'process' if process else 'app'}:{int(resource)}"

    @property
    def efficiency_all(self) -> list[str]:
        """Every grant key of the app: app level by resource type, then process level."""
        levels = (False, True)
        return [self.efficiency(bit, process) for process in levels for bit in self.RESOURCE_BITS]

    @classmethod
    def queue_lists(cls, name: str) -> list[str]:
        """The Redis lists kombu keeps for one queue, one per priority step."""
        steps = cls.KOMBU_PRIORITY_STEPS[1:]
        return [name] + [f"{name}{cls.KOMBU_SEP}{step}" for step in steps]

    @staticmethod
    def bindings(name: str) -> list[str]:
        """kombu's binding sets of an exchange (kombu.transport.redis keyprefix_queue and
        keyprefix_binding_permanent); Celery gives each queue an exchange of its name."""
        return [f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}"]

    # -- continuous tasks (bgqueue/continuous/) --
    # ct          HASH ability → JSON record of its continuous task: modes, payload (JSON
    #             text), state pending | dispatched | running | stopping, generation, id,
    #             restarts, worker, pid, progress, cancel reason, handover flag.
    # ct:pending  ZSET ability → ms it began waiting for a continuous worker.
    # ct:leases   ZSET ability → ms its dispatch (dispatched) or run (running, stopping)
    #             is presumed lost; a run's watchdog renews it.
    # ct:cancel   pub/sub channel of cancel events (JSON: reason, id, ability, message).

    @property
    def continuous(self) -> str:
        """HASH of the app's continuous tasks, one per ability."""
        return f"{self.base}:ct"

    @property
    def continuous_pending(self) -> str:
        """ZSET of continuous tasks waiting for a continuous worker."""
        return f"{self.base}:ct:pending"

    @property
    def continuous_leases(self) -> str:
        """ZSET of continuous tasks' dispatch and run leases."""
        return f"{self.base}:ct:leases"

    @property
    def continuous_cancel(self) -> str:
        """Pub/sub channel announcing continuous tasks cancelled by the system."""
        return f"{self.base}:ct:cancel"

    # -- work scheduler (bgqueue/works/) --
    # works       HASH work id → JSON record: the WorkInfo (as opaque JSON text), state
    #             waiting | dispatched | running, runs done, generation, worker, start ms.
    # work:due    ZSET work id → ms from which a waiting work may start.
    # work:leases ZSET work id → ms when a dispatched or running work is presumed lost.
    # work:last   HASH work id → JSON of its last run (timed out?); kept after a one-shot
    #             work is done, so is_last_work_time_out still answers.
    # work:boot   STRING run_id of the Redis process that last forgot non-persisted works.
    # work:stop   SET "<work id>:<generation>" of runs stop_work asked to stop.
    # work:seq    STRING generation counter of work dispatches.

    @property
    def work_all(self) -> list[str]:
        """Every work-scheduler key of the app, in the order the work_*.lua scripts take."""
        names = ("works", "work:due", "work:leases", "work:last", "work:boot", "work:stop")
        return [f"{self.base}:{name}" for name in (*names, "work:seq")]

    @property
    def works(self) -> str:
        """HASH of the app's works by id."""
        return f"{self.base}:works"

    @property
    def work_due(self) -> str:
        """ZSET of waiting works by the ms they may start."""
        return f"{self.base}:work:due"

    @property
    def work_leases(self) -> str:
        """ZSET of dispatched or running works by the ms they are presumed lost."""
        return f"{self.base}:work:leases"

    @property
    def work_last(self) -> str:
        """HASH of each work's last run by id (JSON: timed out, start, end, worker, runs)."""
        return f"{self.base}:work:last"
