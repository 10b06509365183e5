"""One row per fault scenario: what was accepted, lost, run more than once, and how long
the system took to recover; checked against DESIGN.md §6 and printed as a table at the
end of the run (tests/faults/conftest.py).

A row is recorded before its checks run, so a failing scenario still shows its numbers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

RECOVERY_LIMIT = 10.0  # seconds: "back to serving within 10 s" (DESIGN.md §6)


@dataclass
class Row:
    """The measured outcome of one fault scenario."""

    scenario: str
    accepted: int  # requests whose submit returned: each must complete
    lost: int  # accepted requests that never completed successfully: must be 0
    twice: int  # requests that started more than once (at-least-once reruns)
    allowed: int  # how many may run twice: what was running in a process that died or stalled
    recovery: float | None  # seconds from the fault (or its end) back to serving; None: no outage
    note: str = ""
    test: str = ""
    chaos: bool = False

    def problems(self) -> list[str]:
        """What this row breaks of DESIGN.md §6, if anything."""
        found = []
        if self.lost:
            found.append(f"{self.lost} accepted request(s) lost")
        if self.twice > self.allowed:
            found.append(f"{self.twice} ran more than once, at most {self.allowed} may")
        if self.recovery is not None and self.recovery > RECOVERY_LIMIT:
            found.append(f"recovered in {self.recovery:.2f} s, over {RECOVERY_LIMIT:.0f} s")
        return found


ROWS: list[Row] = []


def record(row: Row) -> None:
    """Keep the row for the summary table, then fail the test if it breaks §6."""
    ROWS.append(row)
    problems = row.problems()
    assert not problems, f"{row.scenario}: {'; '.join(problems)}"


def table(rows: list[Row]) -> list[str]:
    """The rows as aligned text lines, a header first."""
    header = ("scenario", "accepted", "lost", "ran twice", "allowed", "recover s", "note")
    cells = [
        (
            ("[chaos] " if r.chaos else "") + r.scenario,
            str(r.accepted),
            str(r.lost),
            str(r.twice),
            str(r.allowed),
            "-" if r.recovery is None else f"{r.recovery:.2f}",
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header) - 1)]

    def line(values: tuple[str, ...]) -> str:
        left = values[0].ljust(widths[0])
        numbers = [v.rjust(w) for v, w in zip(values[1:-1], widths[1:], strict=True)]
        return "  ".join([left, *numbers, values[-1]]).rstrip()

    return [line(header), *(line(c) for c in cells)]


def write_jsonl(rows: list[Row], path: Path) -> None:
    """Every row as one JSON object per line (for docs and for comparing runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        for row in rows:
            out.write(json.dumps(asdict(row)) + "\n")
