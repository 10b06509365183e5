"""Every Redis key and Celery queue name bgqueue uses, in one place.

All keys of one app share the hash tag `{app_id}`, so each Lua script touches a
single Cluster slot. The only cross-app names are beat's lease, its wake-up
pub/sub channel and the set of known apps.

Per app (`bgqueue:{app}:...`):
  req:<scope>      HASH identifier → JSON record of the request not yet started
                   (pending or dispatched), plus '#refresh'/'#processing' counts.
  due:<profile>    ZSET "<scope>\\x1f<identifier>" → earliest-begin ms; pending only,
                   one set per requirement profile so beat skips what no worker can run.
  leases           ZSET "<scope>\\x1f<identifier>" → ms when a dispatch is presumed lost.
  running          HASH request id (generation) → JSON record of a running task.
  runleases        ZSET request id → ms when the run is presumed dead (renewed by its watchdog).
  seq              STRING generation counter: one number per dispatch.
  history:<scope>  LIST of JSON TaskRecords, newest first, capped.
  workers          HASH worker name → JSON heartbeat (conditions, slots, queues).
  alive            ZSET worker name → ms its heartbeat lapses (server clock).
  expire           SET request ids whose expiration was simulated, until their watchdog sees it.
"""

from __future__ import annotations

from bgqueue.requests import PROFILE_COUNT

PREFIX = "bgqueue"
SEPARATOR = "\x1f"  # unit separator: check_name forbids it inside names

APPS = f"{PREFIX}:apps"
BEAT_LEASE = f"{PREFIX}:beat:lease"
BEAT_WAKE = f"{PREFIX}:beat:wake"  # a pub/sub channel: waking beat writes no key


def member(scope: str, identifier: str) -> str:
    """The due/lease set member naming one request of a scope."""
    return f"{scope}{SEPARATOR}{identifier}"


def split_member(value: str) -> tuple[str, str]:
    """Inverse of `member`."""
    scope, _, identifier = value.partition(SEPARATOR)
    return scope, identifier


class AppKeys:
    """Key names of one app."""

    def __init__(self, app_id: str) -> None:
        self.app_id = app_id
        self.base = f"{PREFIX}:{{{app_id}}}"
        self.leases = f"{self.base}:leases"
        self.running = f"{self.base}:running"
        self.runleases = f"{self.base}:runleases"
        self.seq = f"{self.base}:seq"
        self.workers = f"{self.base}:workers"
        self.expire = f"{self.base}:expire"
        self.alive = f"{self.base}:alive"
        self.due_all = [self.due(p) for p in range(PROFILE_COUNT)]

    def requests(self, scope: str) -> str:
        """Hash of the scope's not-yet-started requests."""
        return f"{self.base}:req:{scope}"

    def due(self, profile: int) -> str:
        """Sorted set of pending requests with this requirement profile."""
        return f"{self.base}:due:{profile}"

    def history(self, scope: str) -> str:
        """List of the scope's finished runs."""
        return f"{self.base}:history:{scope}"

    def queue(self, profile: int) -> str:
        """The Celery queue carrying dispatched requests of one profile."""
        return f"bgqueue.{self.app_id}.p{profile}"

    def worker_queue(self, worker: str) -> str:
        """The Celery queue of one worker: work that beat routes to that worker alone."""
        return f"bgqueue.{self.app_id}.worker.{worker}"

    @property
    def continuous_queue(self) -> str:
        """The Celery queue of continuous tasks, consumed by workers started with --continuous."""
        return f"bgqueue.{self.app_id}.continuous"

    # -- transient delays (bgqueue/transient.py) --

    # -- efficiency resources (bgqueue/efficiency.py) --

    # -- continuous tasks (bgqueue/continuous.py) --

    # -- work scheduler (bgqueue/works.py) --
