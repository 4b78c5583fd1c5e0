"""`moeify verify`: does the converted model compute what the dense one did, and how is the load spread?"""

from __future__ import annotations

import json

import click
from rich.table import Table

from moeify.cli.common import debug_option, examples, load_source, out_console, source_options


def load_table(stats: dict) -> Table:
    """One row per MoE layer: tokens routed, share of work per expert, dropped share."""
    table = Table(title="expert load (share of routed tokens per expert)", title_justify="left")
    for col, justify in (("layer", "left"), ("tokens", "right"), ("load per expert", "left"),
                         ("min / max", "right"), ("dropped", "right")):
        table.add_column(col, justify=justify)
    for name, s in stats.items():
        load = s.load
        shares = (" ".join(f"{100 * float(x):.0f}" for x in load) + " %") if len(load) <= 16 else "(many)"
        table.add_row(name, str(s.num_tokens), shares,
                      f"{100 * float(load.min()):.1f}% / {100 * float(load.max()):.1f}%",
                      f"{100 * s.dropped_fraction:.1f}%")
    return table


def stats_json(stats: dict) -> dict:
    return {name: {"tokens": s.num_tokens, "load": [round(float(x), 6) for x in s.load],
                   "dropped_fraction": s.dropped_fraction} for name, s in stats.items()}


@click.command("verify")
@click.argument("dense")
@click.argument("converted")
@click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True,
              help="Example inputs: batch size.")
@click.option("--seq-len", type=click.IntRange(min=1), default=32, show_default=True,
              help="Example inputs: tokens per sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the example inputs.")
@click.option("--atol", type=click.FloatRange(min=0), metavar="TOL",
              help="Fail (exit 1) when the largest difference exceeds TOL. Default: only report.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout instead of tables.")
@source_options
@debug_option
@examples("""
moeify verify moeify.zoo:tiny_llama tiny_llama-moe8
moeify verify ./all-MiniLM-L6-v2 minilm-moe8 --atol 1e-4
moeify verify model.pt model-moe64 --trust-pickle --seq-len 128
""")
def verify(dense: str, converted: str, batch: int, seq_len: int, seed: int, atol: float | None, as_json: bool,
           arch: str | None, trust_pickle: bool) -> None:
    """Run DENSE and CONVERTED on the same example inputs and compare.

    Reports the largest absolute difference per output and the expert load of every MoE layer
    (from `moeify.routing_stats`). CONVERTED is a moeify output directory, a .pt (with --trust-pickle)
    or a Hugging Face checkpoint written with --format mixtral/qwen2_moe/qwen3_moe.
    --arch applies to DENSE.
    """
    import moeify
    from moeify.compare import compare_outputs, example_inputs, run_model
    from moeify.errors import MoeifyError

    dense_model = load_source(dense, arch, trust_pickle, "dense model")[0].model
    moe_model = load_source(converted, None, trust_pickle, "converted model")[0].model
    inputs = example_inputs(dense_model, batch=batch, seq=seq_len, seed=seed)
    diffs = compare_outputs(run_model(dense_model, inputs), run_model(moe_model, inputs))
    stats = moeify.routing_stats(moe_model)
    worst = max(diffs, key=lambda d: d.max_abs)
    ok = atol is None or worst.max_abs <= atol
    if as_json:
        data = {"max_abs_difference": worst.max_abs, "output": worst.name,
                "outputs": {d.name: {"max_abs": d.max_abs, "max_reference": d.max_ref} for d in diffs},
                "routing": stats_json(stats), "inputs": {k: list(v.shape) for k, v in inputs.items()}}
        if atol is not None:
            data["atol"], data["passed"] = atol, ok
        click.echo(json.dumps(data, indent=2))
    else:
        console = out_console()
        shapes = ", ".join(f"{k.strip('_')} {tuple(v.shape)}" for k, v in inputs.items())
        console.print(f"example inputs: {shapes} (seed {seed})")
        table = Table(title="outputs", title_justify="left")
        for col in ("output", "max |dense - converted|", "max |dense|"):
            table.add_column(col, justify="left" if col == "output" else "right")
        for d in diffs:
            table.add_row(d.name, f"{d.max_abs:.3g}", f"{d.max_ref:.3g}")
        console.print(table)
        console.print(f"largest difference: {worst.max_abs:.3g} ({worst.name}, "
                      f"relative {worst.relative:.2g})")
        if stats:
            console.print(load_table(stats))
        else:
            console.print("no moeify MoE layer ran in CONVERTED (e.g. a Hugging Face export): no load to "
                          "show")
    if not ok:
        raise MoeifyError(f"largest difference {worst.max_abs:.3g} exceeds --atol {atol:g}")
