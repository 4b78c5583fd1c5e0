"""Side-by-side timing shared by the benchmarks: medians over interleaved repeats.

Contenders run A, B, C, A, B, C, ... so that load from other processes on a shared machine hits all of them
alike and their ratios stay meaningful even when absolute times drift.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each step over `repeats` interleaved rounds (after one warm-up round)."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
