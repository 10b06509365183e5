"""Quotas and time budgets (DESIGN.md §4), one frozen object per app.

Seconds throughout; the HarmonyOS-shaped values that the phone API expresses in
milliseconds are converted at that API, not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from bgqueue.errors import ParameterError


@dataclass(frozen=True)
class Limits:
    """Every quota and budget, overridable so tests can run in seconds."""

    max_pending_refresh: int = 1
    max_pending_processing: int = 10
    refresh_time_budget: float = 30
    processing_time_budget: float = 600
    health_research_time_budget: float = 600
    # A continued-processing task has no fixed budget; it lives while it reports progress.
    continued_processing_stall: float = 30
    expiration_warning: float = 6
    transient_max_concurrent: int = 3
    transient_max_delay: float = 180
    transient_daily_quota: float = 600
    data_transfer_stall: float = 600
    max_works: int = 10
    min_repeat_interval: float = 1200
    work_run_limit: float = 120

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            # Counts are whole numbers; NaN or infinity would silently disable a budget.
            wanted = int if field.type == "int" else int | float
            if isinstance(value, bool) or not isinstance(value, wanted) or not math.isfinite(value):
                raise ParameterError(
                    f"Limits.{field.name} must be a finite {field.type}: {value!r}"
                )
            if value <= 0:
                raise ParameterError(f"Limits.{field.name} must be positive, got {value!r}")

    def warning_lead(self, budget: float) -> float:
        """How long before a deadline the expiration handler runs: at most a fifth of it."""
        return min(self.expiration_warning, budget / 5)
