"""`moeify bench DIR` on an ONNX Runtime GenAI folder: prefill ms and decode tok/s.

`bench_command` in onnx_commands.py hands over here when DIR holds genai_config.json; the work is
`moeify.genai.bench.bench_genai`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from moeify.cli.common import err_console, out_console
from moeify.errors import MoeifyError


def is_genai_folder(model: str) -> bool:
    return (Path(model) / "genai_config.json").is_file()


def bench_genai_command(model: str, runs: int, warmup: int, threads: int | None, batch: int, seq: int,
                        new_tokens: int, provider: str | None, as_json: bool) -> None:
    from moeify.genai.bench import bench_genai

    if batch != 1:
        raise MoeifyError(f"--batch {batch}: a GenAI folder is benchmarked one sequence at a time; "
                          "drop --batch")
    if provider is not None:
        raise MoeifyError("--provider does not apply to a GenAI folder (its provider is fixed at export); "
                          "export again with moeify export --genai --provider")
    with err_console().status(f"benchmarking {model} ({warmup} warm-up + {runs} runs) ..."):
        result = bench_genai(model, seq=seq, new_tokens=new_tokens, runs=runs, warmup=warmup, threads=threads)
    if as_json:
        click.echo(json.dumps({"model": model, "seq": seq, "new_tokens": result.decode.tokens,
                               **result.to_dict()}))
        return
    table = Table(title=f"{model}: prompt {seq} tokens, {result.decode.tokens} new tokens, {runs} runs"
                        + (f", {threads} threads" if threads else ""))
    for column in ("phase", "p50 ms", "p90 ms", "p99 ms", "mean ms", "tokens/s"):
        table.add_column(column, justify="right")
    for phase, r in (("prefill", result.prefill), ("decode", result.decode)):
        table.add_row(phase, f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.mean_ms:.2f}",
                      f"{r.tokens_per_s:,.1f}")
    out_console().print(table)
