"""The body of a run: the thread running a handler, and the two ways to stop it.

A watchdog stops a body that must not go on by *interrupting* it: `TaskTerminated` is
raised in the body's thread, even inside a sleep or a blocking read. In a prefork pool
process the body is the main thread and the interrupt is INTERRUPT_SIGNAL, whose handler
raises; elsewhere (solo or thread pools) it is an asynchronous exception. A body that has
not returned INTERRUPT_GRACE later (it swallowed the exception, or is stuck in C code) is
*killed* with its pool process, which Celery's prefork pool replaces: Python cannot stop
a thread.

bgqueue's own calls made from the body's thread (recording an outcome, granting a delay)
are *shielded*: an interrupt that comes meanwhile waits until the call is done, since a
Redis reply read half-way would be lost or, worse, read by the next command.

Once a stopped run's outcome has reached the worker's main process, that process sends
RETIRE_SIGNAL, and the pool process leaves as billiard recycles one (EX_RECYCLE, replaced
at once): whatever the stopped body left behind (threads, half-changed state) goes with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class TaskTerminated(BaseException):
    """Raised into a body that must stop (it overran its deadline, or its run was given up as
    lost); a BaseException, so that a body's `except Exception` does not swallow it."""


# INTERRUPT_SIGNAL is billiard's soft-time-limit signal, whose handler stays in charge of any
# SIGUSR1 that no watchdog sent.
INTERRUPT_SIGNAL = signal.SIGUSR1
RETIRE_SIGNAL = signal.SIGUSR2
INTERRUPT_GRACE = 1.0
EX_RECYCLE = 0x9B  # billiard.pool.EX_RECYCLE: the parent replaces the process without a warning


class PoolProcess:
    """What a pool process knows of itself: whether it is one (set by the worker's
    `worker_process_init` hook), and the body its watchdog may interrupt."""

    def __init__(self) -> None:
        self.is_pool_process = False
        self.installed = False
        self.previous: Any = None
        self.body: Body | None = None
        self.sent = False  # a watchdog sent INTERRUPT_SIGNAL, not yet handled

    def install(self) -> bool:
        """Install the signal handlers from a pool process's main thread (only there can they
        be installed, and only there do they run); whether they are installed."""
        main = threading.current_thread() is threading.main_thread()
        if not self.installed and self.is_pool_process and main:
            self.previous = signal.signal(INTERRUPT_SIGNAL, self._interrupt)
            signal.signal(RETIRE_SIGNAL, _retire)
            self.installed = True
        return self.installed

    def _interrupt(self, signum: int, frame: Any) -> None:
        if not self.sent:  # not a watchdog's: Celery's soft time limit, if one is set
            if callable(self.previous):
                self.previous(signum, frame)
            return
        self.sent = False
        if self.body is not None:
            self.body.interrupted()


pool = PoolProcess()


def _retire(signum: int, frame: Any) -> None:
    """RETIRE_SIGNAL: the pool process is idle (its last run's outcome has been reported and
    consumed), so it leaves at once, with the exit code of a recycled process."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EX_RECYCLE)


def retire_pool_process(pid: int | None) -> None:
    """In the worker's main process: retire the pool process `pid`, whose run's body had to
    be stopped, once that run's outcome has been reported."""
    if not pid or pid == os.getpid():  # a solo pool runs tasks in the worker itself
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, RETIRE_SIGNAL)


class Body:
    """The handler's thread, made in that thread. `leave()` when the handler has returned;
    from then on nothing interrupts it."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.returned = threading.Event()
        self.interrupt_sent = False
        self._lock = threading.Lock()
        self._shields = 0
        self._deferred = False
        self._by_signal = pool.install()
        pool.body = self

    def leave(self) -> None:
        """The handler has returned (or raised): no interrupt may reach the thread now."""
        with self._lock:
            self.returned.set()

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """Hold off an interrupt while bgqueue's own code runs in the body's thread; one that
        came meanwhile is raised on the way out. Other threads pass straight through."""
        if threading.get_ident() != self.thread:
            yield
            return
        with self._lock:
            self._shields += 1
        try:
            yield
        finally:
            with self._lock:
                self._shields -= 1
                raise_now = self._deferred and not self._shields
                if raise_now:
                    self._deferred = False
        if raise_now:
            raise TaskTerminated

    def interrupt(self) -> None:
        """Raise TaskTerminated in the body (once), unless it has returned."""
        with self._lock:
            if self.returned.is_set() or self.interrupt_sent:
                return
            self.interrupt_sent = True
            if self._shields:
                self._deferred = True
            elif self._by_signal:
                pool.sent = True
                signal.pthread_kill(self.thread, INTERRUPT_SIGNAL)
            else:
                _raise_in(self.thread)

    def interrupted(self) -> None:
        """INTERRUPT_SIGNAL's handler, in the body's thread."""
        with self._lock:
            if self.returned.is_set():
                return
            if self._shields:
                self._deferred = True
                return
        raise TaskTerminated

    def kill(self) -> None:
        """End a body that did not return: with its pool process, or (solo and thread pools,
        which share the worker's process) by one more asynchronous exception."""
        if self.returned.is_set():
            return
        if pool.is_pool_process:
            os.kill(os.getpid(), signal.SIGKILL)
        _raise_in(self.thread)


def _raise_in(thread: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread), ctypes.py_object(TaskTerminated)
    )
