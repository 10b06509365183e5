"""What the layers below the façade use of an app and of beat, as protocols.

`bgqueue.app.BackgroundApp` composes the producer side, the features and the worker's
Celery app, so it sits above them; and beat calls the features' dispatchers, so it sits
above them too. Code below either one names it by the protocol here, never by importing
it: imports only point down (docs/architecture.md). mypy checks that the real classes
satisfy these wherever they pass themselves down.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from bgqueue.model.keys import AppKeys
from bgqueue.model.limits import Limits
from bgqueue.model.modes import BackgroundMode
from bgqueue.model.scripts import Scripts
from bgqueue.model.settings import Settings


class AppContext(Protocol):
    """The part of `BackgroundApp` the producer side, the features, the run core and the
    worker use: its identity and limits, its Redis client and scripts, and its handlers."""

    app_id: str
    system: bool
    background_modes: frozenset[BackgroundMode]
    limits: Limits
    settings: Settings
    keys: AppKeys
    handlers: dict[str, Callable[..., Any]]
    continuous_handlers: dict[str, Callable[..., Any]]
    # WorkSchedulerExtension subclasses by ability name (a type of bgqueue.works, above).
    work_handlers: dict[str, Any]

    @property
    def broker_url(self) -> str: ...

    @property
    def client(self) -> Any: ...

    @property
    def scripts(self) -> Scripts: ...

    @property
    def celery(self) -> Any: ...

    def call(
        self,
        script: str,
        script_keys: Sequence[str],
        args: Sequence[Any],
        wake: bool = False,
        announce: bool = False,
    ) -> Any: ...

    async def acall(
        self,
        script: str,
        script_keys: Sequence[str],
        args: Sequence[Any],
        wake: bool = False,
        announce: bool = False,
    ) -> Any: ...

    async def aclient(self) -> Any: ...

    def service(self) -> AbstractContextManager[None]: ...

    def announce(self) -> None: ...

    def is_permitted(self, identifier: str) -> bool: ...

    def scheduler_for(self, scope: str) -> Any:
        """A `bgqueue.scheduler.Scheduler` (a side beside the worker, not below it)."""
        ...


class BeatContext(Protocol):
    """The part of `bgqueue.beat.Beat` a beat extension uses (`beat.EXTENSIONS`: a module
    with `dispatch(beat, app)` and `sweep(beat, app, live)`)."""

    settings: Settings
    client: Any
    scripts: Scripts

    def server_ms(self) -> int: ...

    def live_workers(self, app: AppKeys, forget: bool = False) -> dict[str, dict[str, Any]]: ...

    def class_of(self, app: AppKeys, heartbeat: dict[str, Any]) -> dict[str, Any]: ...

    def queued(self, app: AppKeys, queues: list[str]) -> set[str]: ...
