"""Conversion cost: time and peak memory of `moeify convert` on a ~300M-parameter LLaMA, next to saving it.

    python benchmarks/convert.py            # LLaMA-architecture, ~300M parameters, 8 experts (a few minutes)
    python benchmarks/convert.py --quick    # a small LLaMA: smoke test, seconds

Each measurement runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own:
  save-dense  build the dense model, then time `moeify.save(dense)` (safetensors; the baseline)
  convert     build the dense model, then time what `moeify convert` does: find the FFNs, convert in place
              (copy init, top-2 routing), write safetensors + recipe
The model is built from a config with random weights (no download); building it is not timed. Peak RSS
includes the dense model, so the bound to compare with is "dense weights + output".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, also when not installed

CONFIGS = {
    # 18 layers x (attention 4.2M + SwiGLU FFN 8.7M) + embeddings and head 2 x 32.8M = 297M parameters
    "full": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=18,
                 num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                 tie_word_embeddings=False),
    "quick": dict(vocab_size=1000, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                  tie_word_embeddings=False),
}


def build(size: str):
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIGS[size]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # real values in every page (uninitialised memory would not count in RSS)
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(mode: str, size: str, experts: int, out: str) -> dict:
    import transformers

    import moeify
    from moeify.cli.progress import convert_with_progress

    _ = transformers.LlamaForCausalLM  # resolve the lazy import before measuring the runtime's memory
    rss_runtime = peak_rss_bytes()
    model = build(size)
    dense_params = sum(p.numel() for p in model.parameters())
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_before = peak_rss_bytes()
    result = {"mode": mode, "dense_parameters": dense_params, "dense_bytes": dense_bytes}
    start = time.perf_counter()
    if mode == "save-dense":
        moeify.save(model, out, source={"kind": "unknown"})
    else:
        model = convert_with_progress(model, dict(experts=experts, k=2, init="copy", router="topk", seed=0))
        result["convert_s"] = time.perf_counter() - start
        write_start = time.perf_counter()
        moeify.save(model, out, source={"kind": "unknown"})
        result["write_s"] = time.perf_counter() - write_start
        result["moe_parameters"] = sum(p.numel() for p in model.parameters())
    result["total_s"] = time.perf_counter() - start
    result["output_bytes"] = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["rss_after_build_bytes"] = rss_before
    result["rss_runtime_bytes"] = rss_runtime
    return result


def run_child(mode: str, size: str, experts: int, workdir: Path) -> dict:
    out = workdir / mode
    command = [sys.executable, __file__, "--child", mode, "--size", size, "--experts", str(experts),
               "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gb(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, for a smoke test")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.size, args.experts, args.out)))
        return
    size = "quick" if args.quick else "full"
    with tempfile.TemporaryDirectory(prefix="moeify-bench-", dir=os.environ.get("TMPDIR")) as tmp:
        dense = run_child("save-dense", size, args.experts, Path(tmp))
        moe = run_child("convert", size, args.experts, Path(tmp))
    print(f"moeify convert benchmark: LLaMA ({size}), {dense['dense_parameters'] / 1e6:.0f}M parameters "
          f"(fp32 {gb(dense['dense_bytes'])}) -> {args.experts} experts, top-2, copy init: "
          f"{moe['moe_parameters'] / 1e6:.0f}M parameters; {os.cpu_count()} CPUs")
    print(f"{'':28}{'time':>10}{'peak RSS':>12}{'output':>12}")
    print(f"{'save dense (baseline)':28}{dense['total_s']:>9.2f}s{gb(dense['peak_rss_bytes']):>12}"
          f"{gb(dense['output_bytes']):>12}")
    print(f"{'convert + write':28}{moe['total_s']:>9.2f}s{gb(moe['peak_rss_bytes']):>12}"
          f"{gb(moe['output_bytes']):>12}")
    print(f"{'  of which convert':28}{moe['convert_s']:>9.2f}s")
    print(f"{'  of which write':28}{moe['write_s']:>9.2f}s")
    ratio = moe["total_s"] / max(dense["total_s"], 1e-9)
    bound = dense["dense_bytes"] + moe["output_bytes"]
    print(f"ratio convert+write / save dense: {ratio:.1f}x (the output is "
          f"{moe['output_bytes'] / max(dense['output_bytes'], 1):.1f}x larger)")
    print(f"peak RSS {gb(moe['peak_rss_bytes'])} = runtime (python, torch, transformers) "
          f"{gb(moe['rss_runtime_bytes'])} + {gb(moe['peak_rss_bytes'] - moe['rss_runtime_bytes'])} for the "
          f"model; bound dense weights + output = {gb(bound)}")

if __name__ == "__main__":
    main()
