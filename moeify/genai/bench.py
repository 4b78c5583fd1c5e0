"""Prefill latency and decode throughput of a GenAI folder, for `moeify bench DIR`.

Each run is one greedy `generate` (moeify.genai.generate): the prompt of `seq` tokens is prefilled in one
forward, then `new_tokens` are decoded one forward each (eos cannot end a run early, so every run decodes
the same number of tokens). Percentiles are over the runs, after `warmup` untimed runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeify.errors import MoeifyError
from moeify.runtime.bench import BenchResult, summarize


@dataclass(frozen=True)
class GenAIBenchResult:
    prefill: BenchResult  # per-run ms of the prompt's forward; tokens = prompt length
    decode: BenchResult  # per-run ms of the decode loop; tokens = new tokens per run

    def to_dict(self) -> dict:
        return {"prefill": self.prefill.to_dict(), "decode": self.decode.to_dict()}


def load_model_with_threads(folder, threads: int | None):
    """`onnxruntime_genai.Model` of `folder`, its session's intra-op threads overridden when given."""
    from moeify.genai.generate import load_model

    if threads is None:
        return load_model(folder)
    import onnxruntime_genai as og

    load_model(folder)  # the folder and runtime checks, with their one-line errors
    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def prompt_of(length: int, vocab_size: int, seed: int = 0) -> list[int]:
    """`length` fixed pseudo-random token ids in [3, vocab_size) (clear of the usual special ids)."""
    return np.random.default_rng(seed).integers(3, max(4, vocab_size), size=length).tolist()


def vocab_size_of(folder) -> int:
    config = json.loads((Path(folder) / "genai_config.json").read_text())
    return int(config["model"]["vocab_size"])


def bench_genai(folder, *, seq: int = 128, new_tokens: int = 32, runs: int = 5, warmup: int = 1,
                threads: int | None = None) -> GenAIBenchResult:
    """Time `runs` greedy generations of `new_tokens` after a `seq`-token prompt from a GenAI folder."""
    from moeify.genai.generate import generate

    if runs < 1 or seq < 1 or new_tokens < 1:
        raise MoeifyError(f"runs, seq and new tokens must be >= 1, got {runs}, {seq}, {new_tokens}")
    model = load_model_with_threads(folder, threads)
    prompt = prompt_of(seq, vocab_size_of(folder))
    results = [generate(model, prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
               for _ in range(warmup + runs)][warmup:]
    prefill_ms = np.array([r.prefill_ms for r in results])  # [runs]
    decode_ms = np.array([r.decode_s * 1e3 for r in results])  # [runs]
    return GenAIBenchResult(summarize(prefill_ms, seq), summarize(decode_ms, len(results[0].tokens)))
