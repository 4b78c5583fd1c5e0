"""`moeify inspect`: the FFN blocks moeify finds in a model, and what a conversion would cost."""

from __future__ import annotations

import json

import click
from rich.table import Table

from moeify.cli.common import (
    check_k,
    debug_option,
    examples,
    human_count,
    load_source,
    out_console,
    source_options,
)
from moeify.cli.summary import ffn_rows, rejected_rows


@click.command("inspect")
@click.argument("model")
@click.option("--experts", type=click.IntRange(min=1), metavar="N",
              help="Also show total and active parameters after converting to N experts.")
@click.option("--k", type=click.IntRange(min=1), metavar="K",
              help="Experts per token (with --experts).  [default: 2, or N when N < 2]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout instead of tables.")
@click.option("-v", "--verbose", is_flag=True, help="Also list rejected candidates and why.")
@source_options
@debug_option
@examples("""
moeify inspect moeify.zoo:tiny_llama
moeify inspect ./all-MiniLM-L6-v2 --experts 8 --k 2
moeify inspect model.pt --trust-pickle -v
moeify inspect weights.safetensors --arch mypkg.models:build --json
""")
def inspect(model: str, experts: int | None, k: int | None, as_json: bool, verbose: bool, arch: str | None,
            trust_pickle: bool) -> None:
    """List the feed-forward blocks (FFNs) of MODEL that moeify can convert.

    One row per FFN: module path, widths (d_model -> d_ff), activation and parameters. With --experts,
    the model is converted on PyTorch's meta device (shapes only: no memory, nothing written) to report
    the parameters after conversion and those active per token.
    """
    import moeify
    from moeify.report import count_params

    k = check_k(k, experts)
    loaded, _ = load_source(model, arch, trust_pickle)
    net = loaded.model
    total_before = count_params(net)
    found = ffn_rows(net)
    rejected = rejected_rows(net) if verbose else []
    silent_rules = _near_misses(net) if verbose else []
    after = None
    if experts is not None and found:
        report = moeify.conversion_report(_convert_on_meta(net, experts, k))
        after = {"experts": experts, "k": k, "converted": len(report.converted),
                 "total_parameters": report.params_after, "active_parameters": report.active_params_per_token}

    if as_json:
        data = {"model": model, "parameters": total_before, "ffns": found}
        if verbose:
            data["rejected"] = rejected
            data["near_misses"] = silent_rules
        if experts is not None:
            data["after_conversion"] = after
        click.echo(json.dumps(data, indent=2))
        return

    console = out_console()
    console.print(f"{model}: {type(net).__name__}, {total_before:,} parameters")
    table = Table(title="FFNs found", title_justify="left")
    for col, justify in (("module", "left"), ("d_model -> d_ff", "right"), ("activation", "left"),
                         ("parameters", "right")):
        table.add_column(col, justify=justify)
    for row in found:
        act = row["activation"] + (" (gated)" if row["gated"] else "")
        table.add_row(row["path"] or "<model>", f"{row['d_model']} -> {row['d_ff']}", act,
                      human_count(row["parameters"]))
    if found:
        console.print(table)
    ffn_params = sum(r["parameters"] for r in found)
    console.print(f"{len(found)} FFN(s), {human_count(ffn_params)} of {human_count(total_before)} parameters "
                  f"({100 * ffn_params / max(total_before, 1):.0f}%) in FFNs")
    moe_layers = sum(isinstance(m, moeify.MoELayer) for m in net.modules())
    if moe_layers:
        console.print(f"{moe_layers} MoE layer(s): this model is already converted")
    elif not found:
        console.print("no FFN found" + ("" if verbose else "; run with -v to see the rejected candidates"))
    if verbose:
        rej = Table(title="rejected candidates", title_justify="left")
        rej.add_column("module")
        rej.add_column("reason")
        for row in rejected:
            rej.add_row(row["path"] or "<model>", row["reason"])
        console.print(rej if rejected else "no rejected candidates")
        for line in silent_rules:
            console.print(line, markup=False, highlight=False)
    if after is not None:
        console.print(
            f"after --experts {experts} --k {k}: {human_count(after['total_parameters'])} parameters "
            f"({after['total_parameters'] / max(total_before, 1):.2f}x), "
            f"{human_count(after['active_parameters'])} active per token")


def _near_misses(net) -> list[str]:
    """Per FFN rule that matched nowhere in the model, what came closest (moeify.passes.rules.near_miss)."""
    from moeify.passes.capture import capture
    from moeify.passes.rules.near_miss import near_misses

    return near_misses(capture(net))


def _convert_on_meta(net, experts: int, k: int):
    """Convert for the parameter counts only: on the meta device the experts take no memory (64 experts
    of a large model would not fit otherwise)."""
    import torch

    import moeify

    net = net.to("meta")
    with torch.device("meta"):
        return moeify.convert(net, moeify.ConvertConfig(experts=experts, k=k, init="none"), inplace=True)

