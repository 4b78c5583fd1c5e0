"""Generation speed of own-route GenAI folders (decoders the builder does not know) against transformers.

    python benchmarks/genai_own_route.py                # GPT-2 d=512, 4 layers, 128-token prompt
    python benchmarks/genai_own_route.py --quick        # d=64, 2 layers: smoke test

A GPT-2 (Conv1D FFN, learned positions: ONNX Runtime GenAI's builder refuses it) with random weights,
converted to E=8 top-1 with copied experts, exported by moeify's own route (`export_genai(route="own")`) at
fp32 and int4. Side by side, per contender, measured in turns (--repeats rounds, each contender once per
round, medians): prefill ms of the prompt and decode tok/s of --new greedy tokens, for

  transformers dense / MoE   eager PyTorch with a DynamicCache: one forward of the prompt, then one forward
                             per new token (argmax), the same loop GenAI runs
  GenAI MoE fp32 / int4      the own-route folders in onnxruntime_genai

and whether each one's greedy tokens equal transformers' on the MoE model. The own route's attention is the
model's own ops (no fused kernel), so this says what serving through it buys over running transformers, not
how it compares with the builder route (benchmarks/genai.py). Nothing is downloaded.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, also when not installed


def torch_generate(model, prompt: list[int], new: int) -> dict:
    """Prefill ms, decode tok/s and the new tokens of a greedy KV-cached loop in eager PyTorch."""
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        ids = torch.tensor([prompt])  # [1, S]
        cache = DynamicCache()
        start = time.perf_counter()
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits  # [1, S, V]
        prefill_ms = (time.perf_counter() - start) * 1e3
        tokens = []
        start = time.perf_counter()
        for _ in range(new):
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits
        decode_s = time.perf_counter() - start
        return {"prefill_ms": prefill_ms, "decode_tok_s": new / decode_s, "tokens": tokens}


def main() -> None:
    from genai import measure_once, parse_sizes, size_parser  # benchmarks/ is on sys.path as a script

    args = parse_sizes(size_parser(__doc__))

    import torch
    import transformers as T
    from rich.console import Console
    from rich.table import Table

    import moeify
    from moeify.genai import export_genai
    from tests.genai.tiny import save_byte_tokenizer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=256, n_embd=args.d_model, n_layer=args.layers,
                          n_head=max(2, args.d_model // 64), n_positions=1024, bos_token_id=1, eos_token_id=2)
    dense = T.GPT2LMHeadModel(config).eval()
    moe = moeify.convert(dense, experts=8, k=1, init="copy").eval()
    prompt = torch.randint(3, 256, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    console = Console(highlight=False, width=170)
    with tempfile.TemporaryDirectory(prefix="moeify-bench-own-route-") as scratch:
        scratch = Path(scratch)
        save_byte_tokenizer(scratch / "tokenizer")
        folders = {}
        for precision in ("fp32", "int4"):
            console.print(f"exporting the {precision} own-route folder ...")
            folders[f"GenAI MoE {precision}"] = export_genai(moe, scratch / precision, precision=precision,
                                                            tokenizer_dir=scratch / "tokenizer", route="own")
        steps = {"transformers dense": lambda: torch_generate(dense, prompt, args.new),
                 "transformers MoE": lambda: torch_generate(moe, prompt, args.new)}
        for name, folder in folders.items():
            steps[name] = lambda f=folder: measure_once(f, prompt, args.new)
        console.print(f"measuring {', '.join(steps)} in turns ...")
        turns = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                turns[name].append(step())
        sizes = {name: sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1024**2
                 for name, folder in folders.items()}
    reference = turns["transformers MoE"][0]["tokens"]
    base = {key: statistics.median(r[key] for r in turns["transformers MoE"])
            for key in ("prefill_ms", "decode_tok_s")}
    table = Table(title=f"GPT-2 d={args.d_model}, {args.layers} layers, E=8 k=1 (copied experts), own GenAI "
                        f"route: prompt {args.prompt} tokens, {args.new} new tokens, CPU, median of "
                        f"{args.repeats} rounds in turns")
    for column in ("contender", "prefill ms", "x transformers MoE", "decode tok/s", "x transformers MoE",
                   "greedy = transformers MoE", "MB"):
        table.add_column(column, justify="left" if column == "contender" else "right")
    for name, runs in turns.items():
        prefill = statistics.median(r["prefill_ms"] for r in runs)
        decode = statistics.median(r["decode_tok_s"] for r in runs)
        agree = sum(a == b for a, b in zip(runs[0]["tokens"], reference, strict=False))
        agree /= max(1, len(reference))
        table.add_row(name, f"{prefill:.1f}", f"{prefill / base['prefill_ms']:.2f}", f"{decode:.1f}",
                      f"{decode / base['decode_tok_s']:.2f}", f"{agree:.0%}",
                      f"{sizes[name]:.1f}" if name in sizes else "")
    console.print(table)


if __name__ == "__main__":
    main()
