"""Serving exported models with ONNX Runtime: sessions, a run helper, and a benchmark helper.

    session = moeify.runtime.make_session("model.onnx", threads=4)
    outputs = moeify.runtime.run(session, {"input_ids": ids})
    result = moeify.runtime.bench(session, runs=50)      # p50/p90/p99 latency, tokens/s
"""

from moeify.runtime.bench import BenchResult, bench, count_tokens, summarize, time_runs
from moeify.runtime.session import cuda_device_count, default_providers, example_feed, make_session, run

__all__ = ["BenchResult", "bench", "count_tokens", "cuda_device_count", "default_providers", "example_feed",
           "make_session", "run", "summarize", "time_runs"]
