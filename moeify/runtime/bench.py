"""Latency and throughput of an ONNX Runtime session."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from moeify.errors import MoeifyError


@dataclass(frozen=True)
class BenchResult:
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    tokens: int  # tokens per run (batch x sequence of the first integer input, else leading dims of x)

    @property
    def runs_per_s(self) -> float:
        return 1000.0 / self.mean_ms if self.mean_ms > 0 else float("inf")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens * self.runs_per_s

    def to_dict(self) -> dict:
        return {"runs": self.runs, "p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms,
                "mean_ms": self.mean_ms, "tokens": self.tokens, "runs_per_s": self.runs_per_s,
                "tokens_per_s": self.tokens_per_s}


def count_tokens(feed: Mapping[str, np.ndarray]) -> int:
    """Tokens in one run: all elements of the first integer input (ids [B, S]), else the leading dims of the
    first float input ([B, S, D] -> B*S)."""
    arrays = list(feed.values())
    for a in arrays:
        if np.issubdtype(a.dtype, np.integer):
            return int(a.size)
    for a in arrays:
        if a.ndim >= 2:
            return int(np.prod(a.shape[:-1]))
    return 1


def time_runs(fn, runs: int = 20, warmup: int = 3) -> np.ndarray:
    """Wall-clock milliseconds of `runs` calls of fn() after `warmup` untimed calls."""
    if runs < 1:
        raise MoeifyError(f"runs must be >= 1, got {runs}")
    for _ in range(max(0, warmup)):
        fn()
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        fn()
        times[i] = (time.perf_counter() - start) * 1000.0
    return times


def summarize(times_ms: np.ndarray, tokens: int) -> BenchResult:
    p50, p90, p99 = np.percentile(times_ms, [50, 90, 99])
    return BenchResult(runs=len(times_ms), p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99),
                       mean_ms=float(times_ms.mean()), tokens=tokens)


def bench(session, feed: Mapping[str, np.ndarray] | None = None, runs: int = 20,
          warmup: int = 3) -> BenchResult:
    """Time `session.run` on `feed` (default: `example_feed(session)`): latency percentiles and throughput."""
    from moeify.runtime.session import example_feed

    feed = dict(feed) if feed is not None else example_feed(session)
    times = time_runs(lambda: session.run(None, feed), runs=runs, warmup=warmup)
    return summarize(times, count_tokens(feed))
