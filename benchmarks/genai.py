"""Generation in ONNX Runtime GenAI: the builder's dense LLaMA against moeify's upcycled E=8 top-1 / top-2.

    python benchmarks/genai.py                 # LLaMA d=512, 4 layers, vocab 1000, 128-token prompts
    python benchmarks/genai.py --d-model 2048  # the issue's second size
    python benchmarks/genai.py --quick         # d=64, 2 layers: smoke test

For fp32 and int4: the builder's dense folder, then the MoE folders made from it (`moe_folder_from_dense`:
experts copied from the dense MLP, so the skeleton *is* the dense model and one builder run per precision
serves them all), each with the experts fused (com.microsoft.MoE / QMoE) and as a loop of dense MLPs
(moeify.genai.expert_loop). Per folder, measured in turns (--repeats rounds, every folder once per round,
so load changes hit all alike): prefill ms of the prompt and decode tok/s of --new greedy tokens (medians),
greedy agreement with the fp32 dense tokens (fraction of positions equal), folder size.
Random weights from a config, a byte-level tokenizer; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, also when not installed


def build_dense(folder: Path, d_model: int, layers: int):
    from tests.genai.tiny import tiny_llama_folder

    heads = max(2, d_model // 64)
    return tiny_llama_folder(
        folder,
        vocab_size=1000,
        hidden_size=d_model,
        intermediate_size=d_model * 11 // 4 // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=1024,
    )


def measure_once(folder: Path, prompt: list[int], new: int) -> dict:
    """One turn on one folder: load it, warm up (first runs allocate and pre-pack), time one prefill of the
    prompt and one greedy decode of `new` tokens, unload (big fp32 folders do not all fit in memory)."""
    import numpy as np
    import onnxruntime_genai as og

    from moeify.genai.generate import generate

    model = og.Model(str(folder))
    generate(model, prompt, max_new_tokens=min(new, 8))
    generator = og.Generator(model, og.GeneratorParams(model))
    start = time.perf_counter()
    generator.append_tokens(np.asarray(prompt, dtype=np.int32)[None])
    prefill_ms = (time.perf_counter() - start) * 1e3
    del generator
    run = generate(model, prompt, max_new_tokens=new)
    del model
    return {"prefill_ms": prefill_ms, "decode_tok_s": run.decode_tokens_per_s, "tokens": run.tokens}


def measure_in_turns(folders: dict, prompt: list[int], new: int, repeats: int) -> dict:
    """Every folder measured once per round, `repeats` rounds, so that a change in the machine's load hits
    every folder alike; medians per folder."""
    turns = {name: [] for name in folders}
    for _ in range(repeats):
        for name, folder in folders.items():
            turns[name].append(measure_once(folder, prompt, new))
    results = {}
    for name, runs in turns.items():
        size = sum(f.stat().st_size for f in folders[name].iterdir() if f.is_file())
        results[name] = {
            "prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "tokens": runs[0]["tokens"],
            "mb": size / 1024**2,
        }
    return results


def size_parser(description: str) -> argparse.ArgumentParser:
    """The options both GenAI benchmarks take: model size, prompt and new tokens, rounds, --quick."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="d=64, 2 layers, short prompt: a smoke test")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens per decode run")
    parser.add_argument("--repeats", type=int, default=3)
    return parser


def parse_sizes(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed options, with --quick's small sizes applied."""
    args = parser.parse_args()
    if args.quick:
        args.d_model, args.layers, args.prompt, args.new, args.repeats = 64, 2, 16, 8, 1
    return args


def main() -> None:
    parser = size_parser(__doc__)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--experts-op", nargs="+", default=["fused", "loop"], choices=["fused", "loop"],
                        help="the expert lowerings to measure: com.microsoft.MoE/QMoE (fused) and/or one dense "
                        "MLP per expert over its tokens (loop)")
    args = parse_sizes(parser)

    import torch
    from rich.console import Console
    from rich.table import Table

    import moeify
    from moeify.genai.builder import run_builder
    from moeify.genai.export import moe_folder_from_dense

    console = Console(highlight=False, width=120)
    prompt = torch.randint(3, 256, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    with tempfile.TemporaryDirectory(prefix="moeify-bench-genai-") as scratch:
        scratch = Path(scratch)
        dense = build_dense(scratch / "hf", args.d_model, args.layers)
        moes = {k: moeify.convert(dense, experts=args.experts, k=k, init="copy") for k in (1, 2)}
        for precision in ("fp32", "int4"):
            console.print(f"building the {precision} dense folder ...")
            dense_dir = scratch / f"dense-{precision}"
            run_builder(scratch / "hf", dense_dir, precision, "cpu", scratch / "cache")
            folders = {"dense": dense_dir}
            for k, moe in moes.items():
                for op in args.experts_op:
                    folders[f"E={args.experts} k={k} {op}"] = moe_folder_from_dense(
                        moe, dense_dir, scratch / f"moe-k{k}-{op}-{precision}", precision=precision,
                        experts_op=op,
                    )
            console.print(f"measuring {', '.join(folders)} at {precision}, in turns ...")
            for name, result in measure_in_turns(folders, prompt, args.new, args.repeats).items():
                rows.append((name, precision, result))
    reference = rows[0][2]["tokens"]  # fp32 dense
    base = {p: r for n, p, r in rows if n == "dense"}
    table = Table(
        title=f"ONNX Runtime GenAI, LLaMA d={args.d_model}, {args.layers} layers, vocab 1000: prompt "
        f"{args.prompt} tokens, {args.new} new tokens, CPU, median of {args.repeats} rounds in turns"
    )
    for column in (
        "model",
        "precision",
        "prefill ms",
        "x dense",
        "decode tok/s",
        "x dense",
        "greedy = fp32",
        "MB",
    ):
        table.add_column(column, justify="left" if column in ("model", "precision") else "right")
    for name, precision, r in rows:
        b = base[precision]
        agree = sum(a == c for a, c in zip(r["tokens"], reference, strict=False)) / max(1, len(reference))
        table.add_row(
            name,
            precision,
            f"{r['prefill_ms']:.1f}",
            f"{r['prefill_ms'] / b['prefill_ms']:.2f}",
            f"{r['decode_tok_s']:.1f}",
            f"{r['decode_tok_s'] / b['decode_tok_s']:.2f}",
            f"{agree:.0%}",
            f"{r['mb']:.1f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
