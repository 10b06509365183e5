"""The Lua scripts in `bgqueue/lua/`, loaded once per Redis client.

Each script's header documents its KEYS and ARGV; every key it touches is passed
in KEYS so the scripts stay valid on Redis Cluster (all keys of one app share a slot).
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import redis

NAMES = (
    "submit",
    "cancel",
    "claim",
    "unpark",
    "launch",
    "view",
    "round",
    "lapsed",
    "start",
    "release",
    "renew",
    "finish",
    "recover",
    "heartbeat",
    "workers",
    "lease",
    "continuous_start",
    "continuous_update",
    "continuous_stop",
    "continuous_claim",
    "continuous_lapsed",
    "continuous_begin",
    "continuous_renew",
    "continuous_end",
    "continuous_handover",
    "efficiency_apply",
    "efficiency_sweep",
    "work_start",
    "work_stop",
    "work_read",
    "work_due",
    "work_claim",
    "work_begin",
    "work_renew",
    "work_end",
    "work_recover",
    "transient_delays",
    "deadletter",
)


FOLDER = Path(__file__).parent / "lua"
# Lua has no import: a line `-- include: NAME ...` is replaced by lua/include/NAME.lua.
INCLUDE = re.compile(r"^-- include: (\w+).*$", re.MULTILINE)


def source(name: str) -> str:
    """The text of lua/NAME.lua with its includes spliced in."""
    return splice((FOLDER / f"{name}.lua").read_text())


def splice(text: str) -> str:
    """Lua text with each `-- include: NAME` line replaced by lua/include/NAME.lua."""
    return INCLUDE.sub(lambda found: (FOLDER / "include" / f"{found[1]}.lua").read_text(), text)


@cache
def sha(name: str) -> str:
    """The SHA1 Redis knows lua/NAME.lua by (EVALSHA), computed here as redis-py does."""
    return hashlib.sha1(source(name).encode()).hexdigest()


class ScriptCall(NamedTuple):
    """One script call built and checked before anything is sent, so the same call goes to
    `BackgroundApp.call` or `BackgroundApp.acall`: `app.call(*script_call)`."""

    script: str
    keys: list[str]
    args: list[Any]
    wake: bool = False  # and wake beat, in the same round trip
    announce: bool = False  # and name the app in bgqueue:apps (once per process), in the same trip


class Scripts:
    """Callable scripts bound to one client: `scripts.submit(keys=[...], args=[...])`."""

    def __init__(self, client: redis.Redis) -> None:
        self._scripts = {name: client.register_script(source(name)) for name in NAMES}

    def __getattr__(self, name: str) -> Any:
        try:
            return self._scripts[name]
        except KeyError:
            raise AttributeError(name) from None
