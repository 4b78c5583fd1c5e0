"""`moeify demo`: the whole job on a model that ships with moeify, printing what each step measured."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from moeify.cli.common import check_k, debug_option, dir_size, examples, human_bytes, human_count, out_console


@click.command("demo")
@click.option("--experts", type=click.IntRange(min=1), default=8, show_default=True, metavar="N")
@click.option("--k", type=click.IntRange(min=1), default=2, show_default=True, metavar="K")
@click.option("-o", "--output", type=click.Path(path_type=Path), metavar="DIR",
              help="Keep what the demo writes in DIR (default: a temporary directory, removed at the end).")
@debug_option
@examples("""
moeify demo
moeify demo --experts 4 --k 1 -o demo-out
""")
def demo(experts: int, k: int, output: Path | None) -> None:
    """Build a tiny LLaMA (moeify.zoo:tiny_llama, seed 0, no download), convert it, verify it, save and
    reload it, and export it as a Hugging Face Mixtral checkpoint."""
    k = check_k(k, experts)
    if output is not None:
        from moeify.io.atomic import check_destination

        check_destination(output, force=False)
        output.mkdir(parents=True)
        _demo(experts, k, output)
        return
    with tempfile.TemporaryDirectory(prefix="moeify-demo-") as tmp:
        _demo(experts, k, Path(tmp))


def _step(console, n: int, total: int, text: str) -> None:
    console.print(f"\n[bold]{n}/{total} {text}[/bold]")


def _demo(experts: int, k: int, workdir: Path) -> None:
    import torch

    import moeify
    from moeify.cli.summary import conversion_table, ffn_rows, totals_line
    from moeify.cli.verify import load_table
    from moeify.compare import compare_outputs, example_inputs, run_model
    from moeify.report import count_params
    from moeify.zoo import tiny_llama

    console = out_console()
    steps = 6
    _step(console, 1, steps, "build the dense model: moeify.zoo:tiny_llama (LLaMA, seed 0)")
    t = time.perf_counter()
    dense = tiny_llama()
    before = count_params(dense)
    console.print(f"{type(dense).__name__}: {before:,} parameters, built in {time.perf_counter() - t:.2f}s")

    _step(console, 2, steps, "find its FFNs (moeify inspect)")
    rows = ffn_rows(dense)
    for row in rows:
        console.print(f"  {row['path']}: {row['d_model']} -> {row['d_ff']}, {row['activation']}"
                      f"{' (gated)' if row['gated'] else ''}, {human_count(row['parameters'])} parameters")

    _step(console, 3, steps, f"convert: {experts} experts, top-{k} routing, experts copied from the FFN")
    t = time.perf_counter()
    moe = moeify.convert(dense, experts=experts, k=k, router="topk", init="copy", seed=0)
    convert_s = time.perf_counter() - t
    report = moeify.conversion_report(moe)
    console.print(conversion_table(report))
    console.print(totals_line(report))
    console.print(f"conversion took {convert_s:.2f}s")

    _step(console, 4, steps, "verify: dense and converted on the same token ids (moeify verify)")
    inputs = example_inputs(dense, batch=2, seq=32, seed=0)
    dense_out = run_model(dense, inputs)
    moe_out = run_model(moe, inputs)
    worst = max(compare_outputs(dense_out, moe_out), key=lambda d: d.max_abs)
    console.print(f"largest |dense - converted| over the {worst.name}: {worst.max_abs:.2e} "
                  f"(copied experts + renormalised top-k keep the function)")
    console.print(load_table(moeify.routing_stats(moe)))

    _step(console, 5, steps, "save and reload (moeify.save / moeify.load)")
    out = workdir / f"tiny_llama-moe{experts}"
    t = time.perf_counter()
    moeify.save(moe, out, source="moeify.zoo:tiny_llama")
    save_s = time.perf_counter() - t
    t = time.perf_counter()
    again = moeify.load(out)
    load_s = time.perf_counter() - t
    diff = max(d.max_abs for d in compare_outputs(moe_out, run_model(again, inputs)))
    console.print(f"wrote {out} ({human_bytes(dir_size(out))}) in {save_s:.2f}s; reloaded in {load_s:.2f}s; "
                  f"largest difference after reload: {diff:.2e}")

    _step(console, 6, steps, "export as a Hugging Face Mixtral checkpoint and load it with transformers")
    import transformers

    from moeify.cli.common import quiet_transformers
    from moeify.io.hf_export import export_hf

    quiet_transformers()

    hf_dir = workdir / f"tiny_llama-mixtral{experts}"
    export_hf(moe, hf_dir, "mixtral")
    mixtral = transformers.MixtralForCausalLM.from_pretrained(str(hf_dir), local_files_only=True).eval()
    with torch.no_grad():
        hf_logits = mixtral(**inputs).logits
    diff = float((hf_logits - moe_out.logits).abs().max())
    console.print(f"{type(mixtral).__name__} from {hf_dir}: largest logit difference to moeify's model "
                  f"{diff:.2e}")
    console.print(f"\n[bold]done.[/bold] the same from the shell: moeify convert moeify.zoo:tiny_llama "
                  f"--experts {experts} --k {k} && "
                  f"moeify verify moeify.zoo:tiny_llama tiny_llama-moe{experts}")
