"""`moeify export`, `moeify run`, `moeify bench`: ONNX export and ONNX Runtime serving from the shell.

Standalone click commands; the `moeify` group registers them. User mistakes raise `MoeifyError` with one
line (the group prints it and exits 1).

    moeify export moeify.zoo:tiny_llama -o llama.onnx --target ort
    moeify export mypkg.models:build -o m.onnx --input-spec x:2x16x512 --fp16
    moeify run llama.onnx --input input_ids=ids.npy
    moeify bench llama.onnx --runs 50 --threads 4 --batch 1 --seq 512
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from moeify.cli.common import examples
from moeify.errors import MoeifyError

_DTYPES = {"float32": np.float32, "float": np.float32, "fp32": np.float32, "float16": np.float16,
           "fp16": np.float16, "half": np.float16, "int64": np.int64, "long": np.int64, "int32": np.int32,
           "bool": np.bool_}


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


# --- parsing -------------------------------------------------------------------------------------------

def parse_shape(text: str) -> tuple[int, ...]:
    """"2x16x512" -> (2, 16, 512)."""
    parts = text.lower().split("x")
    if not text or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise MoeifyError(f"bad shape {text!r}: write positive sizes joined by 'x', e.g. 2x16x512")
    return tuple(int(p) for p in parts)


def parse_input_spec(spec: str) -> tuple[str | None, tuple[int, ...], str]:
    """"[NAME:]SHAPE[:DTYPE]" -> (name or None, shape, dtype). Default dtype: int64 for names ending in
    _ids or mask, else float32."""
    parts = spec.split(":")
    name = None
    if parts and not re.fullmatch(r"\d+(x\d+)*", parts[0].lower()):
        name, parts = parts[0], parts[1:]
    if len(parts) not in (1, 2):
        raise MoeifyError(f"bad --input-spec {spec!r}: use NAME:SHAPE[:DTYPE] or SHAPE[:DTYPE], "
                          "e.g. input_ids:2x16:int64 or 2x16x512")
    shape = parse_shape(parts[0])
    default = "int64" if name and (name.endswith("ids") or "mask" in name) else "float32"
    dtype = parts[1].lower() if len(parts) == 2 else default
    if dtype not in _DTYPES:
        valid = ", ".join(sorted(_DTYPES))
        raise MoeifyError(f"bad dtype {dtype!r} in --input-spec {spec!r}; valid: {valid}")
    return name, shape, dtype


def example_from_specs(specs: tuple[str, ...], vocab: int | None):
    """Example inputs for export: a tuple (no names given) or a dict (all named)."""
    import torch

    from moeify.runtime.session import random_input

    parsed = [parse_input_spec(s) for s in specs]
    named = [p[0] is not None for p in parsed]
    if any(named) and not all(named):
        raise MoeifyError("--input-spec: name all inputs or none")
    rng = np.random.default_rng(0)
    values = []
    for name, shape, dtype in parsed:
        high = vocab if (vocab and name and name.endswith("ids")) else 2
        values.append(torch.from_numpy(random_input(name or "", shape, _DTYPES[dtype], high, rng)))
    if all(named):
        return {p[0]: v for p, v in zip(parsed, values, strict=True)}
    return tuple(values)


def load_model_ref(spec: str, arch: str | None = None, trust_pickle: bool = False):
    """A model argument -> (nn.Module, example inputs or None).

    `module:callable` calls the callable; it may return a module or (module, example_inputs). Anything else
    goes to moeify's model loader (`moeify.io.load_model`: Hugging Face folders, .pt/.safetensors files
    with `arch`, folders written by moeify).
    """
    from torch import nn

    from moeify.io.sources import call_builder, is_callable_spec

    if is_callable_spec(spec):
        made = call_builder(spec)
    else:
        try:
            from moeify.io import load_model
        except ImportError:
            raise MoeifyError(f"{spec!r} is not module:callable, and this moeify cannot load saved "
                              "models") from None
        made = load_model(spec, arch=arch, trust_pickle=trust_pickle)
        made = getattr(made, "model", made)
    example = None
    if isinstance(made, tuple) and len(made) == 2:
        made, example = made
    if not isinstance(made, nn.Module):
        raise MoeifyError(f"{spec!r} gave a {type(made).__name__}, not a torch.nn.Module")
    return made, example


def parse_run_inputs(session, items: tuple[str, ...], batch: int, seq: int) -> dict[str, np.ndarray]:
    """--input NAME=FILE.npy or NAME=SHAPE (random); inputs not given are made up (batch x seq)."""
    from moeify.runtime import example_feed
    from moeify.runtime.session import onnx_input_dtype, random_input

    feed = example_feed(session, batch=batch, seq=seq)
    inputs = {i.name: i for i in session.get_inputs()}
    names = list(inputs)
    rng = np.random.default_rng(0)
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            if len(names) != 1:
                raise MoeifyError(f"--input {item!r}: write NAME=FILE.npy or NAME=SHAPE; "
                                  f"inputs: {', '.join(names)}")
            name, value = names[0], item
        if name not in names:
            raise MoeifyError(f"--input {item!r}: the model has no input {name!r}; "
                              f"inputs: {', '.join(names)}")
        if value.endswith(".npy"):
            if not Path(value).is_file():
                raise MoeifyError(f"--input {item!r}: file {value} not found")
            feed[name] = np.load(value)
        else:
            feed[name] = random_input(name, parse_shape(value), onnx_input_dtype(inputs[name]), 2, rng)
    return feed


def _session(model: str, threads: int | None, provider: str | None):
    from moeify.runtime import make_session

    providers = None if provider is None else [provider] + (["CPUExecutionProvider"]
                                                            if provider != "CPUExecutionProvider" else [])
    return make_session(model, providers=providers, threads=threads)


# --- commands ------------------------------------------------------------------------------------------

@click.command("export")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="The .onnx file to write (with --genai: the folder).")
@click.option("--target", type=click.Choice(["ort", "portable"]), default="ort", show_default=True,
              help="ort: ONNX Runtime's fused com.microsoft.MoE where it applies; "
                   "portable: standard ops only.")
@click.option("--input-spec", "input_specs", multiple=True, metavar="[NAME:]SHAPE[:DTYPE]",
              help="Example input, repeatable (e.g. input_ids:2x16:int64, or 2x16x512). Default: from the "
                   "model's config (transformers models) or the callable's example.")
@click.option("--fp16", is_flag=True, help="Export in float16.")
@click.option("--static", is_flag=True, help="Fixed input shapes (default: dynamic batch and sequence axes).")
@click.option("--arch", metavar="MODULE:CALLABLE",
              help="Builds the model for a weights-only file (state_dict .pt or .safetensors).")
@click.option("--trust-pickle", is_flag=True,
              help="Allow loading a full pickled module (.pt from torch.save(model)); this runs code stored "
                   "in the file.")
@click.option("--genai", is_flag=True,
              help="Write an ONNX Runtime GenAI folder (KV cache, generation) instead.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int4"]), default="fp32",
              show_default=True, help="With --genai: fp16 (CUDA), or int8/int4 weights (QMoE experts).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="With --genai: the execution provider to build for.")
@click.option("--tokenizer", type=click.Path(file_okay=False), help="With --genai: the folder with the "
              "tokenizer files (default: MODEL when it has them).")
@click.option("--genai-experts", type=click.Choice(["auto", "fused", "loop"]), default="auto", show_default=True,
              help="With --genai: experts as com.microsoft.MoE/QMoE (fused) or as one dense MLP per expert "
                   "over its tokens (loop); auto: loop at int4/int8 and at fp32 from model width 1024, "
                   "else fused.")
@click.option("--force", is_flag=True, help="With --genai: replace an existing output folder.")
@click.option("--genai-route", type=click.Choice(["auto", "builder", "own"]), default="auto",
              show_default=True,
              help="With --genai: builder (ONNX Runtime GenAI's builder + MoE surgery: LLaMA, Mistral, "
                   "Qwen2, Qwen3), own (moeify's export with explicit KV: other causal LMs), auto (builder "
                   "where it can).")
@examples("""
moeify export tiny_llama-moe8 -o tiny_llama-moe8.onnx
moeify export moe -o moe-genai --genai --precision int4 --tokenizer HF_DIR
moeify export tiny_llama-moe8 -o model.onnx --target portable --fp16
moeify export mypkg.models:build -o model.onnx --input-spec x:2x16x512
""")
def export_command(model: str, output: str, target: str, input_specs: tuple[str, ...], fp16: bool,
                   static: bool, arch: str | None, trust_pickle: bool, genai: bool, precision: str,
                   provider: str, tokenizer: str | None, genai_experts: str, force: bool,
                   genai_route: str) -> None:
    """Export MODEL to ONNX: module:callable, a Hugging Face folder, a moeify folder or a weights file."""
    import torch

    if genai:
        from moeify.cli.genai_export import export_genai_command

        return export_genai_command(model, output, precision, provider, tokenizer, arch, trust_pickle, force,
                                    genai_route, experts_op=genai_experts)

    from moeify.lowering.export import export_onnx

    for spec in input_specs:  # fail on a typo before loading the model
        parse_input_spec(spec)
    module, example = load_model_ref(model, arch=arch, trust_pickle=trust_pickle)
    if input_specs:
        vocab = getattr(getattr(module, "config", None), "vocab_size", None)
        example = example_from_specs(input_specs, vocab)
    with _console().status(f"exporting {model} ({target}) ..."):
        result = export_onnx(module, example, output, target=target, dynamic=not static,
                             dtype=torch.float16 if fp16 else torch.float32)
    table = Table(title=f"{result.path}  ({result.target}, {result.dtype})")
    for column in ("MoE layer", "ONNX op", "why"):
        table.add_column(column)
    for name, op in result.layers.items():
        table.add_row(name, op, result.reasons.get(name, ""))
    console = _console()
    if result.layers:
        console.print(table)
    size = Path(output).stat().st_size / 1024**2
    console.print(f"wrote {output} ({size:.1f} MB): {len(result.layers)} MoE layer(s)")


@click.command("run")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input", "inputs", multiple=True, metavar="NAME=FILE.npy|NAME=SHAPE",
              help="An input, repeatable; inputs not given are random (see --batch/--seq).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--seq", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads.")
@click.option("--provider", help="Execution provider (default: CUDA when usable, else CPU).")
@click.option("--save", type=click.Path(dir_okay=False), help="Write the outputs to this .npz file.")
@examples("""
moeify run tiny_llama-moe8.onnx
moeify run model.onnx --input input_ids=ids.npy --save outputs.npz
moeify run model.onnx --batch 4 --seq 128 --threads 2
""")
def run_command(model: str, inputs: tuple[str, ...], batch: int, seq: int, threads: int | None,
                provider: str | None, save: str | None) -> None:
    """Run an ONNX model once with ONNX Runtime and summarise its outputs."""
    from moeify.runtime import run

    session = _session(model, threads, provider)
    feed = parse_run_inputs(session, inputs, batch, seq)
    outputs = run(session, feed)
    table = Table(title=f"{model} on {session.get_providers()[0]}")
    for column in ("output", "shape", "dtype", "mean", "std", "first values"):
        table.add_column(column)
    for name, value in outputs.items():
        flat = value.reshape(-1)
        numeric = np.issubdtype(value.dtype, np.number) and flat.size > 0
        table.add_row(name, "x".join(map(str, value.shape)) or "scalar", str(value.dtype),
                      f"{flat.astype(np.float64).mean():.4g}" if numeric else "",
                      f"{flat.astype(np.float64).std():.4g}" if numeric else "",
                      " ".join(f"{v:.4g}" for v in flat[:4].astype(np.float64)) if numeric else "")
    _console().print(table)
    if save:
        np.savez(save, **outputs)
        _console().print(f"wrote {save}")


@click.command("bench")
@click.argument("model", type=click.Path())
@click.option("--runs", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--seq", default=128, show_default=True, type=click.IntRange(min=1),
              help="Sequence length (a GenAI folder: prompt tokens).")
@click.option("--new-tokens", default=32, show_default=True, type=click.IntRange(min=1),
              help="A GenAI folder: tokens decoded per run.")
@click.option("--provider", help="Execution provider (default: CUDA when usable, else CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@examples("""
moeify bench tiny_llama-moe8.onnx
moeify bench model.onnx --runs 100 --threads 2 --seq 512
moeify bench model.onnx --json
moeify bench moe-genai --seq 256 --new-tokens 64    # a GenAI folder: prefill ms, decode tok/s
""")
def bench_command(model: str, runs: int, warmup: int, threads: int | None, batch: int, seq: int,
                  new_tokens: int, provider: str | None, as_json: bool) -> None:
    """Latency percentiles and throughput of an ONNX model in ONNX Runtime, or of a GenAI folder
    (prefill of a --seq prompt, then --new-tokens decoded, per run)."""
    from moeify.cli.genai_bench import bench_genai_command, is_genai_folder
    from moeify.runtime import bench, example_feed

    if is_genai_folder(model):
        return bench_genai_command(model, runs, warmup, threads, batch, seq, new_tokens, provider, as_json)
    if Path(model).is_dir():
        raise MoeifyError(f"{model} is a folder without genai_config.json; bench an .onnx file or a GenAI "
                          "folder (moeify export MODEL -o DIR --genai)")
    session = _session(model, threads, provider)
    result = bench(session, example_feed(session, batch=batch, seq=seq), runs=runs, warmup=warmup)
    if as_json:
        click.echo(json.dumps({"model": model, "provider": session.get_providers()[0], "batch": batch,
                               "seq": seq, **result.to_dict()}))
        return
    table = Table(title=f"{model}: batch {batch} x seq {seq}, {runs} runs on {session.get_providers()[0]}"
                        + (f", {threads} threads" if threads else ""))
    for column in ("p50 ms", "p90 ms", "p99 ms", "mean ms", "runs/s", "tokens/s"):
        table.add_column(column, justify="right")
    table.add_row(f"{result.p50_ms:.2f}", f"{result.p90_ms:.2f}", f"{result.p99_ms:.2f}",
                  f"{result.mean_ms:.2f}", f"{result.runs_per_s:.1f}", f"{result.tokens_per_s:,.0f}")
    _console().print(table)


COMMANDS = (export_command, run_command, bench_command)

__all__ = ["COMMANDS", "bench_command", "export_command", "run_command"]
