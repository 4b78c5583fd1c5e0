"""Rows and tables built from the passes' records (find_ffns, explain_ffns, conversion_report)."""

from __future__ import annotations

from rich.table import Table
from torch import nn

from moeify.cli.common import human_count


def ffn_rows(model: nn.Module) -> list[dict]:
    """One JSON-able row per FFN found: path, widths, activation, parameters."""
    import moeify

    return [{"path": m.name, "d_model": m.d_model, "d_ff": m.d_ff, "activation": m.activation,
             "gated": m.gated, "bias": m.bias, "parameters": m.dense_params} for m in moeify.find_ffns(model)]


def rejected_rows(model: nn.Module) -> list[dict]:
    import moeify

    return [{"path": r.name, "reason": r.reason} for r in moeify.explain_ffns(model)]


def conversion_table(report) -> Table:
    table = Table(title=report.summary, title_justify="left")
    columns = ("module", "d_model -> d_ff", "experts x width", "k", "params before", "after",
               "active / token")
    for col in columns:
        if col == "module":
            table.add_column(col, overflow="fold")
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for f in report.ffns:
        table.add_row(f.name or "<model>", f"{f.d_model} -> {f.d_ff}", f"{f.num_experts} x {f.expert_d_ff}",
                      str(f.k), human_count(f.params_before), human_count(f.params_after),
                      human_count(f.active_params_per_token))
    return table


def totals_line(report) -> str:
    return (f"model: {human_count(report.params_before)} -> {human_count(report.params_after)} parameters "
            f"({report.params_after / max(report.params_before, 1):.2f}x), "
            f"{human_count(report.active_params_per_token)} active per token")
