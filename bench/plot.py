"""Draw a run's figures (bench/results/latest.json) as docs/performance.png.

    .venv/bin/python bench/plot.py [--json PATH] [--out PATH]

One panel per comparison, each system's bar side by side: single-message producer calls,
drain rate, idle submit-to-start latency, and start lateness when the run measured it.
A figure the run did not produce is left out of its panel.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
COLOURS = {
    "bgqueue": "#2f6fb0",
    "Celery": "#8a8a8a",
    "Celery, bgqueue cfg": "#b5b5b5",
    "Dramatiq": "#d08a2e",
    "RQ": "#a04848",
    "raw BLPOP": "#5c9c5c",
}

# (panel title, axis label, log scale, [(bar label, figure name), ...])
PANELS = [
    (
        "(a) single-message producer call",
        "calls per second",
        False,
        [
            ("bgqueue", "submit_per_s"),
            ("Celery", "celery_apply_async_per_s"),
            ("Celery, bgqueue cfg", "celery_events_apply_async_per_s"),
            ("Dramatiq", "dramatiq_send_per_s"),
            ("RQ", "rq_enqueue_per_s"),
        ],
    ),
    (
        "(c) no-op drain, 2 processes",
        "completed per second",
        True,
        [
            ("bgqueue", "drain_per_s"),
            ("Celery", "celery_drain_per_s"),
            ("Dramatiq", "dramatiq_drain_per_s"),
            ("raw BLPOP", "raw_drain_per_s"),
        ],
    ),
    (
        "idle submit-to-start latency, p50",
        "ms",
        True,
        [
            ("bgqueue", "latency_p50_ms"),
            ("Celery", "celery_latency_p50_ms"),
            ("Dramatiq", "dramatiq_latency_p50_ms"),
            ("raw BLPOP", "raw_latency_p50_ms"),
        ],
    ),
    (
        "(d) start lateness p99, 500 due/s",
        "ms",
        True,
        [
            ("bgqueue", "lateness_p99_ms_500"),
            ("Celery", "celery_lateness_p99_ms_500"),
            ("RQ", "rq_lateness_p99_ms_500"),
        ],
    ),
]


def draw(figures: dict[str, float], title: str, out: Path) -> None:
    """Write the panels that have at least one figure to `out` as a PNG."""
    panels = []
    for name, label, log, bars in PANELS:
        present = [(b, figures[key]) for b, key in bars if _usable(figures.get(key))]
        if present:
            panels.append((name, label, log, present))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (name, label, log, present) in zip(axes[0], panels, strict=True):
        labels = [b for b, _ in present]
        values = [v for _, v in present]
        bars = ax.bar(labels, values, color=[COLOURS.get(b, "#666") for b in labels])
        ax.bar_label(bars, labels=[_short(v) for v in values], fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _usable(value: float | None) -> bool:
    return value is not None and not math.isnan(value) and value > 0


def _short(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "latest.json")
    parser.add_argument("--out", type=Path, default=BENCH_DIR.parent / "docs" / "performance.png")
    args = parser.parse_args()
    run = json.loads(args.json.read_text())
    info = run["machine"]
    title = (
        f"bgqueue {'quick ' if run['quick'] else ''}benchmark, {info['date']}\n"
        f"{info['cores']} cores, Python {info['python']}, Redis {info.get('redis_server', '?')}, "
        f"Celery {info['celery']}, Dramatiq {info['dramatiq']}, RQ {info['rq']}"
    )
    draw(run["figures"], title, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
