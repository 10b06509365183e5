"""(in progress)"""

from __future__ import annotations

from typing import Any


def dispatch(beat: Any, app: Any, live: dict[str, dict[str, Any]]) -> float:
    return float("inf")


def sweep(beat: Any, app: Any, live: dict[str, dict[str, Any]]) -> None:
    return None
