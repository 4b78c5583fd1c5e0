"""Conversion cost at checkpoint scale: peak memory and time of streaming `moeify convert` and of
`moeify.load`, next to copying the output's bytes.

    python benchmarks/convert.py                    # d=2048, d_ff=5632, 4 layers, bf16 (~0.7 GB in)
    python benchmarks/convert.py --layers 22        # TinyLlama's shape, 1.1 B parameters (~13 GB out)
    python benchmarks/convert.py --quick            # a small LLaMA: smoke test, seconds

A synthetic LLaMA-architecture checkpoint (config.json + bf16 safetensors shards of random values) is
written tensor by tensor, so making it needs no RAM. Each measurement then runs in a fresh subprocess, so
its peak RSS (ru_maxrss) is its own:
  copy        copy the moeify output's files (the floor: reading and writing those bytes)
  convert     `moeify convert SRC -e E --k 2 --init copy` (streamed; moeify format)
  mixtral     the same with `--format mixtral`
  memory      the in-memory path: load the dense model, `moeify.convert`, `moeify.save`
  load        `moeify.load(OUT)` of the moeify output
  runtime     python + torch + transformers + moeify imported, nothing else (what every row pays)
Peak RSS is the process's; "work peak" is the step's own: the peak during it over the RSS it started at
(Linux: /proc/self/clear_refs resets the peak), since importing transformers peaks above the conversion.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, also when not installed

SHAPES = {
    "full": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4),
    "quick": dict(vocab_size=1000, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                  num_key_value_heads=4),
}


def write_checkpoint(directory: Path, shape: dict, layers: int, shard_bytes: int) -> int:
    """A LLaMA checkpoint of random bf16 values, one tensor in memory at a time; returns its bytes."""
    import torch
    import transformers

    from moeify.io.lazy_source import hf_structure
    from moeify.io.shard_writer import ShardWriter, Slot

    directory.mkdir(parents=True)
    config = transformers.LlamaConfig(**shape, num_hidden_layers=layers, tie_word_embeddings=False,
                                      max_position_embeddings=2048, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    structure, _ = hf_structure(directory)
    slots = [Slot(n, tuple(p.shape), torch.bfloat16) for n, p in structure.named_parameters()]
    writer = ShardWriter(directory, slots, shard_bytes)
    gen = torch.Generator().manual_seed(0)
    for slot in slots:
        writer.write(slot.name, (torch.randn(slot.shape, generator=gen) * 0.02).to(torch.bfloat16))
    writer.files()
    return sum(s.nbytes for s in slots)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _proc_status(key: str) -> int | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> int | None:
    """Reset the peak RSS (VmHWM) to the current RSS, which is returned (Linux 4.0+; None elsewhere): the
    imports' own peak (transformers' is above 1 GiB) would otherwise hide the work's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_status("VmRSS")


def child(mode: str, src: str, out: str, experts: int) -> dict:
    import torch  # noqa: F401  (the runtime: imported before the clock starts)
    import transformers

    import moeify
    from moeify.io.streaming import convert_checkpoint

    _ = transformers.LlamaForCausalLM, transformers.MixtralForCausalLM
    before = reset_peak_rss()
    start = time.perf_counter()
    if mode == "convert":
        convert_checkpoint(Path(src), Path(out), experts=experts, k=2, init="copy")
    elif mode == "mixtral":
        convert_checkpoint(Path(src), Path(out), fmt="mixtral", experts=experts, k=2, init="copy")
    elif mode == "memory":
        from moeify.io.sources import load_hf_dir

        model = load_hf_dir(Path(src)).model
        moeify.save(moeify.convert(model, experts=experts, k=2, init="copy"), Path(out))
    elif mode == "load":
        model = moeify.load(out)
        sum(float(p.sum()) for p in model.parameters())  # touch every weight
    elif mode == "copy":
        shutil.copytree(src, out)
    seconds = time.perf_counter() - start
    hwm = _proc_status("VmHWM")
    work = hwm - before if before is not None and hwm is not None else None
    return {"mode": mode, "seconds": seconds, "peak_rss": peak_rss_bytes(), "work_peak": work}


def run_child(mode: str, src: Path, out: Path, experts: int) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--src", str(src), "--out", str(out),
               "--experts", str(experts)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model, for a smoke test")
    parser.add_argument("--layers", type=int, help="decoder layers (default 4; 2 with --quick)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--dir", type=Path, help="where to write (default: a temporary directory, removed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.src, args.out, args.experts)))
        return
    shape = SHAPES["quick" if args.quick else "full"]
    layers = args.layers or (2 if args.quick else 4)
    with tempfile.TemporaryDirectory(prefix="moeify-bench-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        made = time.perf_counter()
        dense = write_checkpoint(tmp / "src", shape, layers, 256 * 1024**2 if not args.quick else 200_000)
        made = time.perf_counter() - made
        rows = {"runtime": run_child("none", tmp / "src", tmp / "none", args.experts)}
        rows["convert"] = run_child("convert", tmp / "src", tmp / "moe", args.experts)
        out_bytes = size_of(tmp / "moe")
        rows["copy"] = run_child("copy", tmp / "moe", tmp / "moe-copy", args.experts)
        shutil.rmtree(tmp / "moe-copy")
        rows["mixtral"] = run_child("mixtral", tmp / "src", tmp / "mixtral", args.experts)
        mixtral_bytes = size_of(tmp / "mixtral")
        shutil.rmtree(tmp / "mixtral")
        rows["memory"] = run_child("memory", tmp / "src", tmp / "memory", args.experts)
        shutil.rmtree(tmp / "memory")
        rows["load"] = run_child("load", tmp / "src", tmp / "moe", args.experts)
    runtime = rows["runtime"]["peak_rss"]
    copy_s = max(rows["copy"]["seconds"], 1e-9)
    print(f"moeify convert benchmark: LLaMA d={shape['hidden_size']} d_ff={shape['intermediate_size']} "
          f"{layers} layers, bf16, {gib(dense)} in (written in {made:.0f}s) -> {args.experts} experts, "
          f"top-2, copy: {gib(out_bytes)} out (mixtral {gib(mixtral_bytes)}); {os.cpu_count()} CPUs")
    print(f"{'':30}{'time':>9}{'x copy':>8}{'peak RSS':>11}{'over runtime':>14}{'work peak':>11}")
    for name, label in (("runtime", "runtime (imports)"), ("copy", "copy output bytes"),
                        ("convert", "convert (moeify format)"), ("mixtral", "convert --format mixtral"),
                        ("memory", "in memory (load+convert+save)"), ("load", "moeify.load")):
        r = rows[name]
        ratio = f"{r['seconds'] / copy_s:.1f}x" if name in ("convert", "mixtral", "memory") else ""
        seconds = f"{r['seconds']:.1f}s" if name != "runtime" else ""
        work = gib(r["work_peak"]) if r.get("work_peak") is not None and name != "runtime" else ""
        print(f"{label:30}{seconds:>9}{ratio:>8}{gib(r['peak_rss']):>11}{gib(r['peak_rss'] - runtime):>14}"
              f"{work:>11}")
    print(f"load: model {gib(out_bytes)}; peak over runtime {gib(rows['load']['peak_rss'] - runtime)}")
    print("work peak: the peak RSS during the step over the RSS when it started (imports done)")


if __name__ == "__main__":
    main()
