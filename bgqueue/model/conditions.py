"""Worker conditions (network, power, battery, storage, idle, data protection).

A worker probes what its machine has, lets `--condition KEY=VALUE` override any
key, and publishes the result in its heartbeat. Beat matches requests' requirement
profiles against these; the worker re-checks them before it starts a task. A work's
conditions (WorkInfo) are matched by the work scheduler (`bgqueue.works.matches_work`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import psutil

from bgqueue.errors import ParameterError
from bgqueue.model.requests import PROFILE_COUNT, FileProtectionType, Requirement

NETWORK_TYPES = ("none", "any", "mobile", "wifi", "ethernet", "bluetooth", "wifi_p2p")
CHARGERS = ("ac", "usb", "wireless")
LEVELS = ("low", "okay")
BOOLS = ("true", "false")
PROTECTIONS = tuple(str(p) for p in FileProtectionType)

# Anything a machine cannot tell us defaults to the value that runs work (DESIGN.md §2).
SAFE_DEFAULTS: dict[str, str] = {
    "network": "any",
    "external_power": "true",
    "battery_level": "100",
    "battery_status": "okay",
    "storage": "okay",
    "idle": "false",
    "data_protection": "complete",
}
CHOICES: dict[str, tuple[str, ...]] = {
    "network": NETWORK_TYPES,
    "external_power": BOOLS,
    "charger": CHARGERS,
    "battery_status": LEVELS,
    "storage": LEVELS,
    "idle": BOOLS,
    "data_protection": PROTECTIONS,
}
KEYS = (*CHOICES, "battery_level")
LOW_BATTERY = 20
LOW_STORAGE_BYTES = 1 << 30
IDLE_LOAD_PER_CPU = 0.1  # one-minute load average per CPU under which a machine is idle


def check(key: str, value: str) -> str:
    """The normalised value of one condition, or ParameterError naming the allowed values."""
    value = value.strip().lower()
    if key == "battery_level":
        if not value.isdigit() or not 0 <= int(value) <= 100:
            raise ParameterError(f"condition battery_level must be 0-100, got {value!r}")
        return str(int(value))
    if key not in CHOICES:
        raise ParameterError(f"unknown condition {key!r}; known: {', '.join(KEYS)}")
    if value not in CHOICES[key]:
        raise ParameterError(f"condition {key} must be one of {', '.join(CHOICES[key])}")
    return value


def parse_overrides(pairs: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` strings from the command line as a checked mapping."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ParameterError(f"condition {pair!r} must look like KEY=VALUE")
        result[key.strip()] = check(key.strip(), value)
    return result


def _probe_network() -> str:
    stats = psutil.net_if_stats()
    up = [name for name, st in stats.items() if st.isup and not name.startswith("lo")]
    if not stats:
        return SAFE_DEFAULTS["network"]
    if not up:
        return "none"
    if any(name.startswith(("eth", "en")) for name in up):
        return "ethernet"
    if any(name.startswith("wl") for name in up):
        return "wifi"
    return "any"


def _probe_power() -> dict[str, str]:
    battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    if battery is None:  # no battery: a server on mains
        return {}
    level = round(battery.percent)
    return {
        "external_power": "true" if battery.power_plugged else "false",
        "battery_level": str(level),
        "battery_status": "low" if level < LOW_BATTERY else "okay",
    }


def _probe_storage(path: str) -> str:
    try:
        free = psutil.disk_usage(path).free
    except OSError:
        return SAFE_DEFAULTS["storage"]
    return "low" if free < LOW_STORAGE_BYTES else "okay"


def _probe_idle() -> str:
    # Deep idle, as WorkScheduler means it: the machine has had next to nothing to do.
    try:
        load = os.getloadavg()[0]
    except OSError:
        return SAFE_DEFAULTS["idle"]
    return "true" if load < IDLE_LOAD_PER_CPU * (os.cpu_count() or 1) else "false"


def probe(path: str | None = None) -> dict[str, str]:
    """What this machine can tell about itself, safe defaults for the rest."""
    found = dict(SAFE_DEFAULTS)
    found["network"] = _probe_network()
    found["idle"] = _probe_idle()
    found.update(_probe_power())
    found["storage"] = _probe_storage(path or os.getcwd())
    return found


def current(overrides: Mapping[str, str], path: str | None = None) -> dict[str, str]:
    """Probed conditions with the worker's overrides applied (overrides win)."""
    return {**probe(path), **overrides}


def satisfies(conditions: Mapping[str, Any], profile: int) -> bool:
    """Whether a worker with these conditions may run a request of this profile."""
    if profile & Requirement.NETWORK and conditions.get("network", "any") == "none":
        return False
    if profile & Requirement.EXTERNAL_POWER and conditions.get("external_power") != "true":
        return False
    have = FileProtectionType(conditions.get("data_protection", "complete")).level
    return have >= profile >> 2


def profiles(conditions: Mapping[str, Any]) -> list[int]:
    """Every requirement profile a worker with these conditions satisfies."""
    return [p for p in range(PROFILE_COUNT) if satisfies(conditions, p)]
