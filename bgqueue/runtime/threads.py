"""Threads kept between jobs, for watchdogs and for user callbacks.

A pool process runs thousands of short requests, and starting a thread for each costs more
CPU than a no-op run itself, so finished threads wait for the next job. User code
(expiration handlers, suspend-delay callbacks, `on_work_stop`) always runs through
`call_user`, in a thread of its own: whatever it does, it cannot hold up the thread that
renews a lease or enforces a deadline.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("bgqueue.threads")


class Threads:
    """Daemon threads that run the jobs they are given, one after the other, and wait for
    the next one when idle. A job that never returns keeps its thread; others get new ones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Thread] = []
        self._pid = os.getpid()

    def spawn(self, job: Callable[[], None], name: str) -> None:
        """Run `job` now in an idle thread (or a new one), in a copy of the caller's context,
        so that its log lines name the same request."""
        context = contextvars.copy_context()
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's threads did not come along
                self._idle, self._pid = [], os.getpid()
            thread = self._idle.pop() if self._idle else _Thread(self)
        thread.give(lambda: context.run(job), name)

    def _done(self, thread: _Thread) -> None:
        with self._lock:
            self._idle.append(thread)


class _Thread:
    def __init__(self, pool: Threads) -> None:
        self._pool = pool
        self._job: Callable[[], None] | None = None
        self._given = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="bgqueue-idle", daemon=True)
        self._thread.start()

    def give(self, job: Callable[[], None], name: str) -> None:
        with self._given:
            self._job = job
            self._thread.name = name
            self._given.notify()

    def _loop(self) -> None:
        while True:
            with self._given:
                while self._job is None:
                    self._given.wait()
                job, self._job = self._job, None
            try:
                job()
            except Exception:  # a job that fails must not take the thread with it
                log.exception("%s failed", self._thread.name)
            self._thread.name = "bgqueue-idle"
            self._pool._done(self)


threads = Threads()


def call_user(what: str, callback: Callable[[], object]) -> None:
    """Call user code (`what` names it in logs) in a thread of its own; an exception it
    raises is logged, never passed on."""

    def job() -> None:
        try:
            callback()
        except Exception:
            log.exception("%s raised", what)

    threads.spawn(job, f"bgqueue-callback: {what}"[:60])
